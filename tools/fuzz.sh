#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60),
# coverage-guided with libFuzzer through cargo fuzz on the stable toolchain
# (no sanitizer: Rust's own checks and the targets' assertions catch
# failures). Corpora persist in ~/.cache/estate-mesh/fuzz-corpus, so longer
# runs on demand continue where CI stopped. A crash stops the script with the
# reproducer's path; fix it and add it as a regression test.
#   tools/fuzz.sh            60 s per target
#   tools/fuzz.sh 3600 bundle  one hour on one target
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(bundle attestation certificate audit_export journal face_input requests)
cache="${HOME}/.cache/estate-mesh"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  if [ ! -x "$cache/cargo-fuzz/bin/cargo-fuzz" ]; then
    cargo install cargo-fuzz --version 0.13.2 --locked --root "$cache/cargo-fuzz"
  fi
  export PATH="$cache/cargo-fuzz/bin:$PATH"
fi
export CARGO_TARGET_DIR="${ESTATE_FUZZ_TARGET_DIR:-$cache/fuzz-target}"
cd fuzz
cargo fuzz build -O -s none
for t in "${targets[@]}"; do
  corpus="$cache/fuzz-corpus/$t"
  mkdir -p "$corpus" "$cache/fuzz-artifacts/$t"
  log="$(mktemp)"
  if ! cargo fuzz run -O -s none "$t" "$corpus" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
      -artifact_prefix="$cache/fuzz-artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $t FAILED; reproducer in $cache/fuzz-artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  cov=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+' | grep -oE '[0-9]+' || echo "?")
  corp=$(find "$corpus" -type f | wc -l)
  printf '%-14s %10s runs in %ss, coverage %s edges, corpus %s inputs\n' "$t" "$runs" "$seconds" "$cov" "$corp"
  rm -f "$log"
done
