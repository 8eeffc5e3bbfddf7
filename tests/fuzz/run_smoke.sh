#!/usr/bin/env bash
# A fixed, repeatable fuzz run: FUZZER SEED_DIR RUNS. libFuzzer starts from the committed seeds (read only: new
# inputs go to a scratch corpus), mutates with a fixed seed for RUNS executions, and fails on any crash, sanitizer
# report, uncaught exception, 10 s hang or 2 GiB of memory; the failing input is printed (hex) and kept in the
# scratch folder named in the output.
set -uo pipefail
FUZZER=$1 SEEDS=$2 RUNS=$3
[ -x "$FUZZER" ] && [ -d "$SEEDS" ] || { echo "run_smoke: usage: FUZZER SEED_DIR RUNS" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dpo-fuzz-XXXXXX")
mkdir -p "$WORK/corpus"
"$FUZZER" -runs="$RUNS" -seed=1 -max_len=4096 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$WORK/" "$WORK/corpus" "$SEEDS" 2>&1 | tail -n 40
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then
  for a in "$WORK"/crash-* "$WORK"/leak-* "$WORK"/timeout-* "$WORK"/oom-*; do
    [ -f "$a" ] && { echo "== failing input $a:"; od -A d -t x1 -v "$a" | head -n 40; }
  done
  echo "run_smoke: $(basename "$FUZZER") failed (exit $rc); inputs kept in $WORK"
  exit 1
fi
rm -rf "$WORK"
echo "run_smoke: $(basename "$FUZZER"): $RUNS runs, no failure"
