"""Summary of gemm_<d>.jsonl (run_gemm.sh): per variant, the step-weighted GEMM time per run (median of each
GEMM's calls, summed with per_step weights) and the same sum over each GEMM's fastest call (less sensitive to
other processes on a shared machine); median and spread over the rounds. Usage: python3 summarize_gemm.py gemm_384.jsonl"""
import json
import statistics as st
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r)
print(f"{'variant':<11} {'library':<44} {'runs':>4}  {'step GEMM s: median':>20} {'min':>7} {'max':>7}"
      f"  {'sum of fastest calls: median':>28} {'min':>7}  load")
order = sorted(by, key=lambda k: st.median(r["step_gemm_s"] for r in by[k]))
for k in order:
    v = by[k]
    s = [r["step_gemm_s"] for r in v]
    f = [sum(g["min_s"] * g["per_step"] for g in r["gemms"]) for r in v]
    lib = v[0]["library"].replace("NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY USE_OPENMP ", "")
    lib = " ".join(w for w in lib.split() if not w.startswith("MAX_THREADS"))
    print(f"{k:<11} {lib[:44]:<44} {len(s):>4}  {st.median(s):>20.3f} {min(s):>7.3f} {max(s):>7.3f}"
          f"  {st.median(f):>28.3f} {min(f):>7.3f}  {min(r['load'] for r in v):.1f}-{max(r['load'] for r in v):.1f}")
print()
names = [g["name"] for g in rows[0]["gemms"]]
print("per GEMM, fastest call over all runs (s): " + " ".join(f"{k}" for k in order))
for i, n in enumerate(names):
    g0 = rows[0]["gemms"][i]
    vals = [min(r["gemms"][i]["min_s"] for r in by[k]) for k in order]
    print(f"  {n:<15} {g0['trans']} M={g0['M']:<6} N={g0['N']:<6} K={g0['K']:<6} x{g0['per_step']:<3}" +
          " ".join(f"{x:8.4f}" for x in vals))
