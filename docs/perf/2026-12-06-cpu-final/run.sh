#!/usr/bin/env bash
# The CPU table of docs/performance.md: dpo bench against PyTorch eager and torch.compile in one session, tools
# interleaved, two rounds. Run from the repository root on an otherwise idle machine, after building `build/`.
set -euo pipefail
D=docs/perf/2026-12-06-cpu-final
export OMP_WAIT_POLICY=passive
log() { echo "$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) $*" | tee -a "$D/runs.log"; }
{ lscpu; echo; grep -m1 flags /proc/cpuinfo; python3 -c "import torch,sys;print('torch',torch.__version__,'python',sys.version.split()[0])"; git rev-parse HEAD; } >"$D/machine.txt" 2>&1
for round in 1 2; do
  log "round $round dpo small"
  ./build/dpo bench --shape small --workload hh --pairs 2 --steps 5 --warmup 1 --threads 2 --json "$D/dpo-small-hh-p2-run$round.json" >"$D/dpo-small-hh-p2-run$round.txt"
  log "round $round torch eager small"
  python3 tools/bench_torch.py --shape small --workload hh --pairs 2 --steps 5 --warmup 1 --threads 2 --json "$D/torch-small-hh-p2-run$round.json" >"$D/torch-small-hh-p2-run$round.txt"
  log "round $round torch compile small"
  python3 tools/bench_torch.py --shape small --workload hh --pairs 2 --steps 5 --warmup 1 --threads 2 --compile --json "$D/torch-small-hh-p2-compile-run$round.json" >"$D/torch-small-hh-p2-compile-run$round.txt" 2>&1
  log "round $round dpo 124m"
  ./build/dpo bench --shape gpt2-124m --workload hh --pairs 1 --steps 5 --warmup 1 --threads 2 --json "$D/dpo-124m-hh-p1-run$round.json" >"$D/dpo-124m-hh-p1-run$round.txt"
  log "round $round torch eager 124m"
  python3 tools/bench_torch.py --shape gpt2-124m --workload hh --pairs 1 --steps 5 --warmup 1 --threads 2 --json "$D/torch-124m-hh-p1-run$round.json" >"$D/torch-124m-hh-p1-run$round.txt"
done
log done
