# The few commands a newcomer needs. Each is one cargo command; see README.md.
.PHONY: run test test-postgres lint ci bench fuzz hardening hardening-quick

run:            ## start the whole mesh on the embedded default (./data)
	cargo run --release -p estate-mesh -- --data-dir ./data

test:           ## all tests on SQLite
	cargo test --workspace

test-postgres:  ## all tests on the local PostgreSQL + Redis
	ESTATE_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
	ESTATE_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test --workspace

lint:           ## formatting and clippy as CI runs them
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

ci:             ## exactly what CI runs
	bash .ci/run

bench:          ## every benchmark (release build, ~10 min); raw output in bench-results/
	bash tools/bench.sh

fuzz:           ## every fuzz target for 10 minutes each (cargo fuzz, stable); FUZZ_SECONDS=… to change
	bash tools/fuzz.sh $${FUZZ_SECONDS:-600}

hardening:      ## every hardening run: fuzz 300 s/target, the suites on SQLite and PostgreSQL + Redis, load on separate processes (~60 min)
	bash tools/hardening.sh

hardening-quick: ## fuzz 30 s/target and the suites on SQLite (~10 min)
	bash tools/hardening.sh --quick
