#!/bin/bash
# Interleaved `dpo bench` runs: each round runs every variant once, in a rotated order (the machine is shared:
# load from other processes spreads over all variants). The load average before each run is kept in loads.txt.
# Usage: run_bench.sh <dpo binary> <rounds> <outdir>
dpo=$1; rounds=$2; out=$3
variants=(auto Prescott Zen SkylakeX blis)
blis=/usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4
for r in $(seq 1 "$rounds"); do
  n=${#variants[@]}
  for i in $(seq 0 $((n - 1))); do
    v=${variants[$(((i + r) % n))]}
    echo "round $r $v load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/loads.txt"
    args=(bench --shape small --workload hh --pairs 2 --steps 3 --warmup 1 --threads 2
          --json "$out/dpo-small-hh-p2-$v-r$r.json")
    case $v in
      auto) env -u OPENBLAS_CORETYPE OMP_WAIT_POLICY=passive "$dpo" "${args[@]}" ;;
      blis) env -u OPENBLAS_CORETYPE OMP_WAIT_POLICY=passive LD_PRELOAD=$blis BLIS_NUM_THREADS=2 "$dpo" "${args[@]}" ;;
      *) env OPENBLAS_CORETYPE=$v OMP_WAIT_POLICY=passive "$dpo" "${args[@]}" ;;
    esac > "$out/dpo-small-hh-p2-$v-r$r.txt" 2>&1
  done
done
