#!/bin/bash
# Interleaved GEMM timings: each round runs every variant once, in a rotated order, so that load from other
# processes on the (shared) machine spreads over all variants. Output: one JSON line per run in gemm_<d>.jsonl,
# the load average before each run in the "load" field.
# Usage: run_gemm.sh <d> <rounds> <outdir>   (binaries from gemm_shapes.cpp's build lines in /tmp)
d=$1; rounds=$2; out=$3
variants=(auto Prescott Haswell Zen SkylakeX Cooperlake blis)
export OMP_NUM_THREADS=2 BLIS_NUM_THREADS=2
for r in $(seq 1 "$rounds"); do
  n=${#variants[@]}
  for i in $(seq 0 $((n - 1))); do
    v=${variants[$(((i + r) % n))]}
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$v" = blis ]; then j=$(/tmp/gemm_blis blis "$d")
    elif [ "$v" = auto ]; then j=$(env -u OPENBLAS_CORETYPE /tmp/gemm_openblas auto "$d")
    else j=$(OPENBLAS_CORETYPE=$v /tmp/gemm_openblas "$v" "$d"); fi
    echo "$j" | tr -d '\n' | sed "s/^{/{\"round\": $r, \"load\": $load, /" >> "$out/gemm_$d.jsonl"
    echo >> "$out/gemm_$d.jsonl"
  done
done
