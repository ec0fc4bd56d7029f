#!/usr/bin/env bash
# Runs every benchmark in release mode and keeps the raw output in
# bench-results/<date>.txt, for updating BENCHMARKS.md by hand (the tables
# there cite these runs). PostgreSQL and Redis runs are skipped when the
# local servers are not reachable. Takes about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PG="${ESTATE_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
REDIS="${ESTATE_BENCH_REDIS:-redis://127.0.0.1:6379}"
mkdir -p bench-results
out="bench-results/$(date -u +%Y-%m-%dT%H%M%SZ).txt"
cargo build --release -p estate-bench
# The facematch baseline (faiss-cpu from PyPI) and the face model (npm).
VENV="${HOME}/.cache/estate-mesh/bench-venv"
if ! "$VENV/bin/python" -c "import faiss, numpy" >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "faiss-cpu==1.15.1" "numpy==2.4.6"
fi
ASSETS="$(tools/fetch-face-assets.sh)"
F=./target/release/facematch-bench
B=./target/release/gate-bench
A=./target/release/audit-bench
[ -n "${CARGO_TARGET_DIR:-}" ] && B="$CARGO_TARGET_DIR/release/gate-bench" && A="$CARGO_TARGET_DIR/release/audit-bench" \
  && F="$CARGO_TARGET_DIR/release/facematch-bench"
{
  echo "# $(date -u) on $(nproc) cores, $(uname -r)"
  echo "## gate, SQLite"; "$B" --seconds 10 --gates 1000 --revocations 20
  echo "## gate, idle streams"; "$B" --seconds 2 --gates 0 --idle-streams 10000
  echo "## audit, SQLite 100k"; "$A" --entries 100000 --sqlite
  echo "## facematch, N = 100000 x 512, vs faiss-cpu"; "$F" --python "$VENV/bin/python" --assets "$ASSETS"
  if pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -u "$REDIS" ping >/dev/null 2>&1; then
    psql "$PG/postgres" -qc "drop database if exists gate_bench" -c "create database gate_bench"
    echo "## gate, PostgreSQL + Redis"
    "$B" --seconds 10 --gates 1000 --revocations 20 --database-url "$PG/gate_bench" --redis-url "$REDIS"
    psql "$PG/postgres" -qc "drop database if exists gate_bench"
    echo "## audit, PostgreSQL 100k"; ESTATE_BENCH_DATABASE_URL="$PG/postgres" "$A" --entries 100000
  else
    echo "## PostgreSQL / Redis not reachable: skipped"
  fi
} 2>&1 | tee "$out"
echo "raw figures in $out"
