#!/usr/bin/env bash
# Every hardening run (fuzzing, abuse, limits, isolation, fault injection,
# load against the distributed mode) in one command, bounded in time.
#
#   tools/hardening.sh          fuzz 300 s per target; the suites on SQLite and
#                               on PostgreSQL + Redis; the load generator against
#                               separate processes, 30 s per phase (≈ 50 min on
#                               2 cores; FUZZ_SECONDS, LOAD_SECONDS to change;
#                               FUZZ_SECONDS=0 skips fuzzing, e.g. after a
#                               separate `tools/fuzz.sh 300`)
#   tools/hardening.sh --quick  fuzz 30 s per target; the suites on SQLite only;
#                               no load (≈ 10 min; .ci/run runs the same checks
#                               as part of `cargo test --workspace`)
#
# PostgreSQL + Redis steps run when the local servers answer
# (ESTATE_HARDENING_PG, ESTATE_HARDENING_REDIS to point elsewhere) and are
# reported as skipped otherwise. Output: hardening-results/<UTC time>.txt,
# with a summary of every step (passed / FAILED / skipped, seconds) at the
# end; the exit status is non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=false
[ "${1:-}" = "--quick" ] && quick=true
PG="${ESTATE_HARDENING_PG:-postgres://postgres@127.0.0.1:5432}"
REDIS="${ESTATE_HARDENING_REDIS:-redis://127.0.0.1:6379}"
mkdir -p hardening-results
out="hardening-results/$(date -u +%Y-%m-%dT%H%M%SZ).txt"
summary=()
failed=0

step() {
  local name="$1"
  shift
  local t0=$SECONDS
  echo "==> $name" | tee -a "$out"
  if "$@" >>"$out" 2>&1; then
    summary+=("passed   $((SECONDS - t0))s  $name")
  else
    summary+=("FAILED   $((SECONDS - t0))s  $name")
    failed=1
  fi
}
skip() { summary+=("skipped       $1"); }

have_pg_redis() {
  pg_isready -q -d "$PG/postgres" 2>/dev/null && redis-cli -u "$REDIS" ping >/dev/null 2>&1
}

# The suites: authentication and authorisation matrices and isolation (abuse, authz, isolation), limits
# and slow clients (limits), PIN bursts and QR replay (credentials), gate
# abuse and the Redis outage (gate), facematch isolation and audit
# (facematch), no egress (no_egress), PostgreSQL crash under load (faults,
# PostgreSQL pass), separate processes with SIGKILL and a PIN burst across
# replicas (processes).
SUITES=(--test abuse --test authz --test idempotency --test isolation --test limits --test credentials --test gate --test facematch
  --test no_egress --test faults --test processes --test process)

echo "# hardening run $(date -u) on $(nproc) cores ($([ "$quick" = true ] && echo quick || echo full))" | tee "$out"
tools/fetch-face-assets.sh >/dev/null 2>&1 || true

if [ "$quick" = true ]; then
  step "fuzzing, 30 s per target" tools/fuzz.sh 30
elif [ "${FUZZ_SECONDS:-300}" = 0 ]; then
  skip "fuzzing (FUZZ_SECONDS=0)"
else
  step "fuzzing, ${FUZZ_SECONDS:-300} s per target" tools/fuzz.sh "${FUZZ_SECONDS:-300}"
fi

step "suites on SQLite" cargo test --workspace --locked "${SUITES[@]}"

if [ "$quick" = true ]; then
  skip "suites on PostgreSQL + Redis (full run only)"
  skip "load against separate processes (full run only)"
elif have_pg_redis; then
  step "suites on PostgreSQL + Redis" env ESTATE_TEST_DATABASE_URL="$PG/postgres" ESTATE_TEST_REDIS_URL="$REDIS" \
    cargo test --workspace --locked "${SUITES[@]}"
  load() {
    cargo build --release --locked -p estate-bench --bin gate-bench || return 1
    cargo build --release --locked --bins -p estate-identity -p estate-credentials -p estate-audit -p estate-gate \
      || return 1
    local bin="${CARGO_TARGET_DIR:-target}/release/gate-bench"
    psql "$PG/postgres" -qc "drop database if exists gate_bench_hardening" -c "create database gate_bench_hardening" \
      || return 1
    "$bin" --processes --seconds "${LOAD_SECONDS:-30}" --gates 0 \
      --database-url "$PG/gate_bench_hardening" --redis-url "$REDIS"
    local rc=$?
    psql "$PG/postgres" -qc "drop database if exists gate_bench_hardening"
    return $rc
  }
  step "load: 90/10 decisions/admin against separate processes (PostgreSQL + Redis)" load
else
  skip "suites on PostgreSQL + Redis (servers not reachable)"
  skip "load against separate processes (servers not reachable)"
fi

{
  echo
  echo "## summary"
  printf '%s\n' "${summary[@]}"
} | tee -a "$out"
echo "full output: $out"
exit $failed
