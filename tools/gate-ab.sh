#!/usr/bin/env bash
# A/B comparison of two gate-bench binaries (two builds of the mesh):
# closed-loop card decisions, the two binaries alternating, and the median
# of each one's rate and CPU per call. This VM's speed swings by up to 2x
# between minutes, so a before/after pair of single runs can show a gain
# that is only the machine changing speed (session 9 did: BENCHMARKS.md).
#
#   tools/gate-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS]
#
# Build each binary with `cargo build --release -p estate-bench --bin
# gate-bench` at the commit to compare and copy it aside first. ROUNDS
# defaults to 4, SECONDS (per run) to 6.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
a="$1" b="$2" rounds="${3:-4}" secs="${4:-6}"
for bin in "$a" "$b"; do
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
runs="$(mktemp)"
trap 'rm -f "$runs"' EXIT
for round in $(seq 1 "$rounds"); do
  for side in A B; do
    bin="$a"
    [ "$side" = B ] && bin="$b"
    line="$("$bin" --profile-decide "$secs" 2>/dev/null | grep 'card decision' || true)"
    [ -n "$line" ] || { echo "round $round $side: no result from $bin" >&2; exit 1; }
    rate="$(echo "$line" | awk '{for (i = 1; i < NF; i++) if ($(i + 1) == "calls/s") print $i}')"
    cpu="$(echo "$line" | awk '{for (i = 1; i < NF; i++) if ($i == "cpu") print $(i + 1)}')"
    echo "round $round $side: $rate decisions/s, $cpu µs CPU per call"
    echo "$side $rate $cpu" >>"$runs"
  done
done
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for side in A B; do
  rate="$(awk -v s="$side" '$1 == s {print $2}' "$runs" | median)"
  cpu="$(awk -v s="$side" '$1 == s {print $3}' "$runs" | median)"
  echo "median $side: $rate decisions/s, $cpu µs CPU per call"
done
ra="$(awk '$1 == "A" {print $2}' "$runs" | median)"
rb="$(awk '$1 == "B" {print $2}' "$runs" | median)"
awk -v a="$ra" -v b="$rb" 'BEGIN {printf "B / A (median rates): %.2f\n", b / a}'
