"""Summary of the dpo-small-hh-p2-<variant>-r<round>.json files (run_bench.sh): per variant and run, the median step
time, tokens/s, and the forward+backward phases (where the GEMMs are) divided by the optimizer phase of the same
run (AdamW: no BLAS, the same work for every variant), a ratio that cancels most of the share of the CPU the run
got on the shared machine. Usage: python3 summarize_bench.py"""
import glob
import json
import re
import statistics as st

by = {}
for f in sorted(glob.glob("dpo-small-hh-p2-*-r*.json")):
    v, r = re.match(r"dpo-small-hh-p2-(.+)-r(\d+)\.json", f).groups()
    j = json.load(open(f))
    p = j["phase_seconds_median"]
    ratio = (p["policy_forward_fused_head"] + p["backward"]) / p["optimizer"]
    kernels = "BLIS 0.9.0 (LD_PRELOAD)" if v == "blis" else j["cpu_kernels"]["id"]
    by.setdefault(v, []).append((int(r), j["step_seconds_median"], j["tokens_per_second"], ratio, kernels))
print(f"{'variant':<10} {'kernels':<32} {'step s per run':<16} {'tokens/s per run':<18} {'(fwd+bwd)/AdamW per run':<24}"
      f" {'median ratio':>12}")
for v in sorted(by, key=lambda k: st.median(x[3] for x in by[k])):
    runs = sorted(by[v])
    print(f"{v:<10} {runs[0][4]:<32} {', '.join(f'{x[1]:.2f}' for x in runs):<16} "
          f"{', '.join(f'{x[2]:.0f}' for x in runs):<18} {', '.join(f'{x[3]:.1f}' for x in runs):<24}"
          f" {st.median(x[3] for x in runs):>12.1f}")
