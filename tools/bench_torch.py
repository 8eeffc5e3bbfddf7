#!/usr/bin/env python3
"""PyTorch / HF transformers reference harness for one full DPO optimizer step.

Times what a DPO trainer does per step on synthetic preference pairs:
  concat chosen+rejected (2P rows, right-padded, attention_mask) -> policy forward ->
  log-softmax + gather of next-token log-probs summed over completion tokens ->
  sigmoid DPO loss (beta 0.1) vs precomputed (fixed random) or live (no_grad forward)
  reference log-probs -> backward -> AdamW step (lr 1e-6) -> zero_grad.

Usage:
  python tools/bench_torch.py --shape small|gpt2-124m --workload hh|tldr|custom \
      --pairs P --steps N --warmup W [--compile] [--reference precomputed|live] \
      [--device cpu|cuda] [--threads 2] [--json FILE]
  custom workload: --prompt-len/--chosen-len/--rejected-len.

Standard library + torch + transformers only.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    "small": dict(n_layer=6, n_embd=384, n_head=6),
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12),
}
WORKLOADS = {
    "hh": (150, 90, 70),     # prompt, chosen, rejected
    "tldr": (512, 35, 35),
}


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "nproc": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --length-spread lognormal: the quantiles (k + 0.5)/16 of a log-normal with sigma 0.4 and mean 1, indexed as in
# train/bench.cpp (pair_lengths), so both tools build batches of identical lengths.
LOGNORMAL_QUANTILES = [0.4382, 0.5449, 0.6163, 0.6767, 0.7322, 0.7859, 0.8396, 0.8946,
                       0.9525, 1.0150, 1.0843, 1.1638, 1.2593, 1.3826, 1.5639, 1.9447]


def pair_lengths(prompt_len, chosen_len, rejected_len, spread, i):
    if spread == "none":
        return prompt_len, chosen_len, rejected_len

    def at(mean, k):
        return max(1, int(math.floor(mean * LOGNORMAL_QUANTILES[k % 16] + 0.5)))
    return at(prompt_len, i), at(chosen_len, 5 * i + 3), at(rejected_len, 11 * i + 7)


def build_batch(P, prompt_len, chosen_len, rejected_len, vocab, seed, device, spread="none"):
    """Rows 0..P-1 chosen, P..2P-1 rejected; right-padded to the longest row."""
    g = torch.Generator().manual_seed(seed)
    lens = [pair_lengths(prompt_len, chosen_len, rejected_len, spread, i) for i in range(P)]
    row_lens = [pl + cl for pl, cl, _ in lens] + [pl + rl for pl, _, rl in lens]
    Tmax = max(row_lens)
    ids = torch.zeros(2 * P, Tmax, dtype=torch.long)
    attn = torch.zeros(2 * P, Tmax, dtype=torch.long)
    # loss mask over target positions: target index t (token ids[:, t+1]) counts if
    # prompt_len <= t+1 < row_len
    lmask = torch.zeros(2 * P, Tmax - 1, dtype=torch.float32)
    for i in range(P):
        pl, cl, rl = lens[i]
        prompt = torch.randint(0, vocab, (pl,), generator=g)
        ch = torch.randint(0, vocab, (cl,), generator=g)
        rj = torch.randint(0, vocab, (rl,), generator=g)
        for r, comp in ((i, ch), (P + i, rj)):
            n = pl + comp.numel()
            ids[r, :pl] = prompt
            ids[r, pl:n] = comp
            attn[r, :n] = 1
            lmask[r, pl - 1:n - 1] = 1.0
    return ids.to(device), attn.to(device), lmask.to(device), row_lens


def seq_logps(model, ids, attn, lmask):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * lmask).sum(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--workload", choices=["hh", "tldr", "custom"], default="hh")
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--chosen-len", type=int, default=90)
    ap.add_argument("--rejected-len", type=int, default=70)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reference", choices=["precomputed", "live"], default="precomputed")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None)
    ap.add_argument("--length-spread", choices=["none", "lognormal"], default="none",
                    help="lognormal: per-pair lengths from the fixed quantile table dpo bench uses")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: torch.autocast(bfloat16) around the forward passes (fp32 master weights, AMP)")
    a = ap.parse_args()

    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    dev = torch.device(a.device)
    load0 = list(os.getloadavg())  # other processes distort CPU timings; recorded in the JSON
    torch.manual_seed(a.seed)

    if a.workload == "custom":
        pl, cl, rl = a.prompt_len, a.chosen_len, a.rejected_len
    else:
        pl, cl, rl = WORKLOADS[a.workload]

    s = SHAPES[a.shape]
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_layer=s["n_layer"], n_embd=s["n_embd"],
                     n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg).to(dev)
    model.train()
    # unique parameters: the LM head is tied to wte, so it is counted once
    n_params = sum(p.numel() for p in model.parameters())
    ref_model = None
    if a.reference == "live":
        ref_model = GPT2LMHeadModel(cfg).to(dev)
        ref_model.load_state_dict(model.state_dict())
        ref_model.eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)

    policy = torch.compile(model) if a.compile else model
    ref = (torch.compile(ref_model) if a.compile else ref_model) if ref_model is not None else None

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    P = a.pairs
    ids, attn, lmask, row_lens = build_batch(P, pl, cl, rl, cfg.vocab_size, a.seed, dev, a.length_spread)
    g = torch.Generator().manual_seed(a.seed + 1)
    ref_pre = (-100.0 * torch.rand(2 * P, generator=g) - 50.0).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            lp = seq_logps(policy, ids, attn, lmask).float()
            if ref is not None:
                with torch.no_grad():
                    rlp = seq_logps(ref, ids, attn, lmask).float()
            else:
                rlp = ref_pre
        delta = (lp[:P] - rlp[:P]) - (lp[P:] - rlp[P:])
        loss = -F.logsigmoid(a.beta * delta).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_times = []
    for _ in range(a.warmup):
        sync(); t0 = time.perf_counter()
        step()
        sync(); warm_times.append(time.perf_counter() - t0)
    times = []
    for _ in range(a.steps):
        sync(); t0 = time.perf_counter()
        loss = step()
        sync(); times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    real_tokens = sum(row_lens)
    T = real_tokens / len(row_lens)
    L, d = s["n_layer"], s["n_embd"]
    coef = 16 if a.reference == "live" else 12
    flops = coef * P * T * (n_params + L * d * T)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "torch.cuda.max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        peak_kind = "ru_maxrss (process peak RSS)"

    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine_info(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": a.device, "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "shape": a.shape, "n_layer": L, "n_embd": d, "n_head": s["n_head"], "n_params": n_params,
        "workload": a.workload, "prompt_len": pl, "chosen_len": cl, "rejected_len": rl, "length_spread": a.length_spread,
        "pairs": P, "rows": 2 * P, "padded_len": ids.shape[1], "real_tokens_per_step": real_tokens,
        "mean_row_len": T, "reference": a.reference, "compile": a.compile, "precision": a.precision, "beta": a.beta, "lr": a.lr,
        "warmup": a.warmup, "steps": a.steps,
        "warmup_times_s": warm_times, "step_times_s": times,
        "median_step_s": med, "min_step_s": min(times), "max_step_s": max(times), "tokens_per_s": real_tokens / med, "pairs_per_s": P / med,
        "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
        "flops_per_step": flops,
        "flops_formula": f"{coef}*P*T*(N + L*d*T)",
        "gflops_per_s": flops / med / 1e9, "last_loss": loss.detach().item(),
        "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
    }
    print(f"{a.shape} {a.workload} P={P} ref={a.reference} compile={a.compile} dev={a.device}: "
          f"median {med*1e3:.1f} ms/step (min {min(times)*1e3:.1f}, max {max(times)*1e3:.1f}), {res['tokens_per_s']:.1f} tok/s, {res['pairs_per_s']:.3f} pairs/s, "
          f"{res['gflops_per_s']:.2f} GFLOP/s, peak {peak_mb:.0f} MiB, N={n_params}, T={T:.1f}, "
          f"warmup {[round(x, 3) for x in warm_times]} s")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
