#!/bin/sh
# A/B of the float GELU change: base = the parent commit (b71449a) build, new = this branch's build.
# Usage (from the repository root): sh docs/perf/2026-12-06-small/run_ab.sh <base-build-dir-copy> <out-dir>
# The base directory holds that build's dpo and libdpo_kernels_cpu.a.
BASE=$1; OUT=$2; SRC=$(pwd)
g++ -std=c++20 -O2 -fopenmp -I$SRC docs/perf/2026-12-06-cpuhot/kernel_bench.cpp $BASE/libdpo_kernels_cpu.a -lopenblas -o $OUT/kb-base
g++ -std=c++20 -O2 -fopenmp -I$SRC docs/perf/2026-12-06-cpuhot/kernel_bench.cpp build/libdpo_kernels_cpu.a -lopenblas -o $OUT/kb-new
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=2
for round in 1 2 3; do
  for v in base new; do
    echo "== $v round $round gelu-small, load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/kernel_bench.txt
    $OUT/kb-$v gelu-small 9 >> $OUT/kernel_bench.txt
  done
done
for round in 1 2 3; do
  for v in base new; do
    if [ $v = base ]; then DPO=$BASE/dpo; else DPO=build/dpo; fi
    echo "run $round $v load $(cat /proc/loadavg)" >> $OUT/runs.log
    $DPO bench --shape small --workload hh --pairs 2 --steps 3 --warmup 1 --threads 2 \
      --json $OUT/dpo-small-hh-p2-$v-run$round.json > $OUT/dpo-small-hh-p2-$v-run$round.txt 2>&1
  done
done
echo finished >> $OUT/runs.log
