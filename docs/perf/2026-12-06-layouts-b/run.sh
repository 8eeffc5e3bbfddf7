#!/usr/bin/env bash
# A longer repeat of docs/perf/2026-12-06-layouts (8 timed steps instead of 3, three rounds) for the layouts against
# padded, since the 3-step runs there spread by 30%. dpo bench only (PyTorch eager is in the earlier series).
# Run from the repository root on an otherwise idle machine, after building `build/`.
set -euo pipefail
D=docs/perf/2026-12-06-layouts-b
export OMP_WAIT_POLICY=passive
log() { echo "$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) $*" | tee -a "$D/runs.log"; }
{ lscpu; echo; grep -m1 flags /proc/cpuinfo; git rev-parse HEAD; } >"$D/machine.txt" 2>&1
common=(--shape small --workload hh --length-spread lognormal --pairs 8 --steps 8 --warmup 1 --threads 2)
for round in 1 2 3; do
  log "round $round dpo padded"
  ./build/dpo bench "${common[@]}" --json "$D/dpo-padded-run$round.json" >"$D/dpo-padded-run$round.txt"
  for layout in packed prefix_shared; do
    log "round $round dpo $layout 2048"
    ./build/dpo bench "${common[@]}" --batch-layout "$layout" --max-tokens-per-row 2048 \
      --json "$D/dpo-$layout-2048-run$round.json" >"$D/dpo-$layout-2048-run$round.txt"
  done
done
log done
