#!/usr/bin/env bash
# Per-phase peak memory of dpo bench on the CPU (docs/performance.md, "CPU: peak memory per phase").
# Run from the repository root after building dpo (RelWithDebInfo).
set -euo pipefail
out=${1:-docs/perf/2026-12-06-phase-memory}
for ref in precomputed live; do
  for ck in 0 1; do
    build/dpo bench --shape small --workload hh --pairs 2 --steps 2 --warmup 1 --reference "$ref" \
      --gradient-checkpointing "$ck" --json "$out/small-hh-p2-${ref}_$ck.json" > "$out/small-hh-p2-${ref}_$ck.txt"
  done
done
