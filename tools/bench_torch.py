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
      [--device cpu|cuda] [--threads 2] [--json FILE] [--model-impl auto|hf|plain]
  custom workload: --prompt-len/--chosen-len/--rejected-len.
  python tools/bench_torch.py --attention-only --sdpa-backend flash|cudnn|efficient|math [--device cuda]
      [--seq-lens 256,512,1024,2048] [--batch 8] [--heads 12] [--head-dim 64] [--precision bf16] [--json FILE]
      times causal scaled_dot_product_attention alone (forward, and forward + backward) with PyTorch pinned to one
      backend (torch.nn.attention.sdpa_kernel): the peers of our attention kernels (docs/performance.md).
  python tools/bench_torch.py --check-hf [--device cpu|cuda] [--checkpoint DIR] [--json FILE]
      builds the same random weights (or loads DIR) in transformers' GPT2LMHeadModel and in the plain model, compares logits and
      gradients (float64 and float32), exits 1 above the tolerances.

The model: transformers' GPT2LMHeadModel when transformers is importable (--model-impl auto, the default) or
--model-impl hf; otherwise, or with --model-impl plain, the plain-PyTorch GPT-2 of tools/torch_gpt2.py (same
parameters, same computation; it uses F.scaled_dot_product_attention). The run prints which one it used and the
JSON records it as "model_impl".

Standard library + torch (+ transformers, optional).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt2  # noqa: E402

try:
    import transformers
except ImportError:  # the plain model is used
    transformers = None

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


def resolve_model_impl(choice):
    if choice == "auto":
        return "hf" if transformers is not None else "plain"
    if choice == "hf" and transformers is None:
        print("--model-impl hf: transformers is not importable here; use --model-impl plain", file=sys.stderr)
        sys.exit(2)
    return choice


def describe_impl(impl):
    if impl == "hf":
        return f"transformers {transformers.__version__} GPT2LMHeadModel"
    why = "transformers not importable" if transformers is None else "--model-impl plain"
    return f"plain PyTorch GPT-2 (tools/torch_gpt2.py; {why})"


def model_factory(impl, shape, attn_impl="sdpa"):
    """(a function returning a new randomly initialised model, its config) for `impl` and shape
    {vocab_size, n_positions, n_layer, n_embd, n_head}."""
    if impl == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                         tie_word_embeddings=True, bos_token_id=shape["vocab_size"] - 1,
                         eos_token_id=shape["vocab_size"] - 1, **shape)
        return (lambda: GPT2LMHeadModel(cfg)), cfg
    cfg = torch_gpt2.GPT2Config(**shape)
    return (lambda: torch_gpt2.GPT2LMHeadModel(cfg, attn_impl)), cfg


# --check-hf tolerances: the largest |plain - HF| of a tensor divided by the largest |HF| of it.
#  float64: both models evaluate the same formulas with different kernels and summation orders, so they differ by
#   accumulated float64 round-off, about 1e-16 times the depth of the computation (measured: about 1e-15); 1e-10 is
#   far above that and far below any formula difference (erf vs tanh GELU, a wrong scale or mask: > 1e-4).
#  float32: the same with unit round-off 6e-8, grown through dot products of up to 4C terms and the LayerNorm and
#   softmax backward of each layer (measured: about 1e-6); 1e-4 leaves a 10x-100x margin.
CHECK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def check_hf(a):
    """Same random weights in transformers' GPT2LMHeadModel and the plain model: logits (real positions only) and
    the gradient of every parameter of sum_r w_r * (completion log-prob of row r), w random, compared tensor by
    tensor. Returns the exit code."""
    if transformers is None:
        print("--check-hf needs transformers (pip install transformers)", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    # Small but not tile-friendly: V and C not powers of two, 3 layers, rows of different lengths.
    shape = dict(vocab_size=317, n_positions=64, n_layer=3, n_embd=96, n_head=4)
    if a.checkpoint:  # both models load the checkpoint: HF with from_pretrained, the plain one with its own reader
        c = torch_gpt2.GPT2Config.from_json_file(os.path.join(a.checkpoint, "config.json"))
        shape = dict(vocab_size=c.vocab_size, n_positions=c.n_positions, n_layer=c.n_layer, n_embd=c.n_embd,
                     n_head=c.n_head)
        if c.n_positions < 41:
            print(f"--checkpoint: n_positions {c.n_positions} < 41, the check's row length", file=sys.stderr)
            return 2
    new_hf, _ = model_factory("hf", shape)
    g = torch.Generator().manual_seed(a.seed)
    B, T = 4, 41
    row_len = [41, 36, 23, 9]
    prompt_len = [12, 5, 20, 3]
    ids = torch.randint(0, shape["vocab_size"], (B, T), generator=g)
    attn = torch.zeros(B, T, dtype=torch.long)
    lmask = torch.zeros(B, T - 1)
    for r in range(B):
        attn[r, :row_len[r]] = 1
        lmask[r, prompt_len[r] - 1:row_len[r] - 1] = 1.0
    w = torch.randn(B, generator=g)
    print(f"check-hf: transformers {transformers.__version__}, torch {torch.__version__}, device {a.device}, "
          f"shape {shape}, rows {row_len}, weights {a.checkpoint or 'random (HF init, seed ' + str(a.seed) + ')'}")
    failed = False
    report = []
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(a.seed)
        if a.checkpoint:
            hf = transformers.GPT2LMHeadModel.from_pretrained(a.checkpoint).to(dev, dtype)
        else:
            hf = new_hf().to(dev, dtype)
        hf.eval()  # no dropout (the probabilities are 0 anyway)
        for attn_impl in ("sdpa", "math"):
            if a.checkpoint:
                plain = torch_gpt2.load_checkpoint(a.checkpoint, dev, dtype, attn_impl)
            else:
                plain = torch_gpt2.GPT2LMHeadModel(torch_gpt2.GPT2Config(**shape), attn_impl).to(dev, dtype)
                missing, unexpected = plain.load_state_dict(hf.state_dict(), strict=False)
                unexpected = [k for k in unexpected if not k.endswith((".attn.bias", ".attn.masked_bias"))]
                if missing or unexpected:
                    print(f"  state_dict mismatch: missing {missing}, unexpected {unexpected}")
                    return 1
            outs = {}
            for name, m in (("hf", hf), ("plain", plain)):
                m.zero_grad(set_to_none=True)
                d_ids, d_attn, d_lmask = ids.to(dev), attn.to(dev), lmask.to(dev, dtype)
                logits = m(input_ids=d_ids, attention_mask=d_attn).logits
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tok = torch.gather(logp, 2, d_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                seq = (tok * d_lmask).sum(-1)
                (seq * w.to(dev, dtype)).sum().backward()
                grads = {k: p.grad.detach().clone() for k, p in m.named_parameters()}
                outs[name] = (logits.detach()[attn.to(dev).bool()], seq.detach(), grads)
            tol = CHECK_TOL[dtype]
            worst = ("", 0.0, 0.0)

            def cmp(what, x, ref):
                nonlocal worst
                err = (x - ref).abs().max().item()
                rel = err / max(ref.abs().max().item(), 1e-30)
                if rel > worst[2]:
                    worst = (what, err, rel)
                return err, rel

            l_err, l_rel = cmp("logits", outs["plain"][0], outs["hf"][0])
            s_err, s_rel = cmp("seq_logp", outs["plain"][1], outs["hf"][1])
            g_rel = 0.0
            for k, gref in outs["hf"][2].items():
                if k not in outs["plain"][2]:
                    print(f"  gradient of '{k}' missing in the plain model")
                    return 1
                g_rel = max(g_rel, cmp(f"grad {k}", outs["plain"][2][k], gref)[1])
            ok = worst[2] <= tol
            failed |= not ok
            dname = str(dtype).replace("torch.", "")
            print(f"  {dname:8s} attn={attn_impl:5s} logits max abs {l_err:.3e} (rel {l_rel:.3e}); seq log-prob max "
                  f"abs {s_err:.3e} (rel {s_rel:.3e}); gradients max rel {g_rel:.3e}; worst {worst[0]} "
                  f"abs {worst[1]:.3e} rel {worst[2]:.3e}; tol {tol:.0e}: {'ok' if ok else 'FAIL'}")
            report.append(dict(dtype=dname, attn_impl=attn_impl, logits_max_abs=l_err, logits_max_rel=l_rel,
                               seq_logp_max_abs=s_err, grad_max_rel=g_rel, worst=worst[0], worst_rel=worst[2],
                               tol=tol, ok=ok))
    print("check-hf:", "FAIL" if failed else "PASS")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"check": "plain GPT-2 vs transformers GPT2LMHeadModel", "checkpoint": a.checkpoint,
                       "torch": torch.__version__,
                       "transformers": transformers.__version__, "device": a.device, "shape": shape,
                       "results": report, "pass": not failed}, f, indent=2)
    return 1 if failed else 0


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def bench_attention(a):
    """--attention-only: causal SDPA forward and forward + backward at each T, PyTorch pinned to one backend.

    Layout [B, H, T, d] (what SDPA takes), q, k, v drawn N(0, 1) once per T; dout N(0, 1). A pinned backend that
    cannot run a shape raises in PyTorch; that T is reported as an error, not silently run on another backend.
    FLOPs follow flash-attention's convention for causal attention: forward 4 * B * H * T^2 * d / 2, backward
    2.5 x forward; the TFLOP/s columns use them.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[a.sdpa_backend]
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    try:
        seq_lens = [int(x) for x in a.seq_lens.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"--seq-lens: expected a comma-separated list of integers, got '{a.seq_lens}'")
    if not seq_lens or min(seq_lens) < 1 or a.batch < 1 or a.heads < 1 or a.head_dim < 1:
        sys.exit("--seq-lens, --batch, --heads and --head-dim must be positive")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        for _ in range(a.warmup):
            fn()
        sync()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), times

    rows = []
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    for T in seq_lens:
        shape = (a.batch, a.heads, T, a.head_dim)
        q, k, v, dout = (torch.randn(shape, generator=g).to(dev, dtype) for _ in range(4))
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        fwd_flops = 4.0 * a.batch * a.heads * T * T * a.head_dim / 2
        row = {"T": T}
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def fwd_bwd():
                    out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                    out.backward(dout)
                    qg.grad = kg.grad = vg.grad = None

                tf, tf_all = timed(fwd)
                tfb, tfb_all = timed(fwd_bwd)
            row.update({"forward_s": tf, "forward_times_s": tf_all, "forward_backward_s": tfb,
                        "forward_backward_times_s": tfb_all, "backward_s": tfb - tf,
                        "forward_tflops": fwd_flops / tf / 1e12,
                        "forward_backward_tflops": 3.5 * fwd_flops / tfb / 1e12})
            print(f"T={T:5d} {a.sdpa_backend}: forward {tf * 1e3:.3f} ms ({row['forward_tflops']:.1f} TFLOP/s), "
                  f"forward+backward {tfb * 1e3:.3f} ms ({row['forward_backward_tflops']:.1f} TFLOP/s)")
        except RuntimeError as e:  # the pinned backend refused the shape or the device
            row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"T={T:5d} {a.sdpa_backend}: not run: {row['error']}")
        rows.append(row)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": machine_info(),
           "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
           "device": a.device, "mode": "attention-only", "sdpa_backend": a.sdpa_backend, "causal": True,
           "precision": a.precision, "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
           "warmup": a.warmup, "steps": a.steps,
           "flops_convention": "forward 4*B*H*T^2*d/2 (causal), backward 2.5x forward", "results": rows}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if any("error" in r for r in rows) else 0


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
    ap.add_argument("--model-impl", choices=["auto", "hf", "plain"], default="auto",
                    help="auto: transformers' GPT2LMHeadModel when importable, else the plain model "
                         "(tools/torch_gpt2.py); hf / plain: that one")
    ap.add_argument("--check-hf", action="store_true",
                    help="compare the plain model with transformers' GPT2LMHeadModel (logits and gradients on the "
                         "same random weights, float64 and float32) and exit: 0 agree, 1 differ")
    ap.add_argument("--checkpoint", default=None,
                    help="--check-hf: load both models from this HF checkpoint directory (e.g. `dpo init`'s) "
                         "instead of random weights")
    ap.add_argument("--attention-only", action="store_true",
                    help="time causal scaled_dot_product_attention alone (forward; forward + backward) at each "
                         "--seq-lens T and exit: 0 all ran, 1 the pinned backend refused one")
    ap.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default="flash",
                    help="--attention-only: the one SDPA backend PyTorch may use (torch.nn.attention.sdpa_kernel)")
    ap.add_argument("--seq-lens", default="256,512,1024,2048", help="--attention-only: sequence lengths T")
    ap.add_argument("--batch", type=int, default=8, help="--attention-only: batch size B")
    ap.add_argument("--heads", type=int, default=12, help="--attention-only: heads H")
    ap.add_argument("--head-dim", type=int, default=64, help="--attention-only: head dimension d")
    a = ap.parse_args()

    if a.attention_only:
        sys.exit(bench_attention(a))
    if a.check_hf:
        sys.exit(check_hf(a))
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
    impl = resolve_model_impl(a.model_impl)
    print(f"model: {describe_impl(impl)}")
    new_model, cfg = model_factory(impl, dict(vocab_size=50257, n_positions=1024, **s))
    model = new_model().to(dev)
    model.train()
    # unique parameters: the LM head is tied to wte, so it is counted once
    n_params = sum(p.numel() for p in model.parameters())
    ref_model = None
    if a.reference == "live":
        ref_model = new_model().to(dev)
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
        "torch": torch.__version__,
        "transformers": transformers.__version__ if impl == "hf" else None, "model_impl": impl,
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
    print(f"{a.shape} {a.workload} P={P} ref={a.reference} compile={a.compile} dev={a.device} model={impl}: "
          f"median {med*1e3:.1f} ms/step (min {min(times)*1e3:.1f}, max {max(times)*1e3:.1f}), {res['tokens_per_s']:.1f} tok/s, {res['pairs_per_s']:.3f} pairs/s, "
          f"{res['gflops_per_s']:.2f} GFLOP/s, peak {peak_mb:.0f} MiB, N={n_params}, T={T:.1f}, "
          f"warmup {[round(x, 3) for x in warm_times]} s")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
