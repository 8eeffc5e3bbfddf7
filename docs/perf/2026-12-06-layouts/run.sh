#!/usr/bin/env bash
# The batch-layout table of docs/performance.md: dpo bench in the padded, packed and prefix_shared layouts against
# PyTorch eager (padded rows, as TRL runs them) on the same pairs (HH-like lengths spread log-normally), tools
# interleaved, two rounds. Run from the repository root on an otherwise idle machine, after building `build/`.
set -euo pipefail
D=docs/perf/2026-12-06-layouts
export OMP_WAIT_POLICY=passive
log() { echo "$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) $*" | tee -a "$D/runs.log"; }
{ lscpu; echo; grep -m1 flags /proc/cpuinfo; python3 -c "import torch,sys;print('torch',torch.__version__,'python',sys.version.split()[0])"; git rev-parse HEAD; } >"$D/machine.txt" 2>&1
common=(--shape small --workload hh --length-spread lognormal --pairs 8 --steps 3 --warmup 1 --threads 2)
for round in 1 2; do
  log "round $round dpo padded"
  ./build/dpo bench "${common[@]}" --json "$D/dpo-padded-run$round.json" >"$D/dpo-padded-run$round.txt"
  for layout in packed prefix_shared; do
    for cap in 512 2048; do  # rows of at most 512 or 2048 token slots
      log "round $round dpo $layout $cap"
      ./build/dpo bench "${common[@]}" --batch-layout "$layout" --max-tokens-per-row "$cap" \
        --json "$D/dpo-$layout-$cap-run$round.json" >"$D/dpo-$layout-$cap-run$round.txt"
    done
  done
  log "round $round dpo padded, LM head over every slot"
  ./build/dpo bench "${common[@]}" --head-compaction off --json "$D/dpo-padded-fullhead-run$round.json" \
    >"$D/dpo-padded-fullhead-run$round.txt"
  log "round $round torch eager"
  python3 tools/bench_torch.py "${common[@]}" --json "$D/torch-eager-run$round.json" >"$D/torch-eager-run$round.txt"
done
log done
