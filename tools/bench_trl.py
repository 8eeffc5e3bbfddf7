#!/usr/bin/env python3
"""TRL DPOTrainer counterpart of tools/bench_torch.py: times full DPO optimizer steps of TRL's DPOTrainer
(random-init HF GPT-2, the same config and synthetic preference pairs as bench_torch.py).

What runs: trl.DPOTrainer.train() with per_device_train_batch_size = P, gradient accumulation 1,
max_steps = warmup + steps, loss_type sigmoid, beta, learning_rate (constant schedule), no gradient
checkpointing, no eval / saving / logging, report_to none, no dataloader workers, bf16 only with
--precision bf16. Each optimizer step is timed by a TrainerCallback from on_step_begin to on_step_end
(torch.cuda.synchronize() at both ends on cuda): TRL's forward(s), loss, metrics, backward, gradient
clipping, AdamW, LR scheduler, zero_grad. Fetching/collating the next batch happens before on_step_begin and is
not in the step time; step_interval_s (on_step_end to on_step_end) includes it. Warm-up steps are dropped.

Data: bench_torch.build_batch() (same seed, same ids, exact lengths) is turned into text for TRL's own
preprocessing: a word-level tokenizer (PreTrainedTokenizerFast, no merges) whose vocabulary is "t<id>" for
ids 0..50255 and "<|endoftext|>" = 50256 (GPT-2's EOS id), so "t17 t4242" tokenizes to [17, 4242]. TRL 1.x
always appends the EOS token to every completion, so each completion is given its first len-1 ids from
build_batch and TRL's EOS is the last token: row lengths are exactly prompt+chosen / prompt+rejected as in
bench_torch.py, and all ids but the last of each completion are bench_torch.py's. The dataset holds the same P
pairs repeated (warmup + steps) times (one epoch; every batch has identical shapes). Padding id 0 ("t0"),
right padding, as in bench_torch.py. The script checks the collated batch against build_batch before timing.

--reference precomputed: precompute_ref_log_probs=True. TRL then runs a no-grad reference pass over the whole
dataset (batch size P) inside DPOTrainer.__init__; it is timed separately (ref_precompute_s) and is not part of
the step time. --reference live: a frozen copy of the initial policy is passed as ref_model and runs a no-grad
forward in every step.

Usage:
  python tools/bench_trl.py --shape small|gpt2-124m --workload hh|tldr|custom \
      --pairs P --steps N --warmup W [--reference precomputed|live] [--device cpu|cuda] [--threads 2] \
      [--precision fp32|bf16] [--json FILE]
  custom workload: --prompt-len/--chosen-len/--rejected-len.

Needs torch, transformers, trl, datasets, accelerate (pip install trl).
"""
import argparse
import dataclasses
import datetime
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings

# Everything is local: never reach the Hub, and keep TRL's precompute progress bar quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers 5.x renamed gradient -> activation checkpointing; TRL still reads the old alias (harmless).
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torch  # noqa: E402  (SHAPES, WORKLOADS, build_batch, machine_info)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

try:
    import accelerate
    import datasets
    import tokenizers
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as e:  # pragma: no cover
    sys.exit(f"bench_trl.py needs trl, datasets and accelerate ({e}); install with: pip install trl")

EOS = "<|endoftext|>"


def make_tokenizer(vocab_size):
    """Word-level tokenizer: "t<i>" -> i for i < vocab_size-1, EOS -> vocab_size-1 (GPT-2: 50256)."""
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab[EOS] = vocab_size - 1
    tk = tokenizers.Tokenizer(WordLevel(vocab=vocab, unk_token=EOS))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token="t0", unk_token=EOS)
    assert tok.eos_token_id == vocab_size - 1 and tok.pad_token_id == 0
    return tok


def to_text(ids):
    return " ".join(f"t{int(i)}" for i in ids)


PHASES = ("forward_loss", "backward", "grad_norm_clip", "optimizer", "scheduler_zero_grad")


class StepTimer(TrainerCallback):
    """Times each optimizer step from on_step_begin to on_step_end. With phases=True it also marks the end of
    compute_loss (policy forward + reference forward if live + loss + TRL's metrics), of training_step (+ backward),
    on_pre_optimizer_step (+ gradient norm/clipping), on_optimizer_step (+ AdamW); the rest is LR scheduler and
    zero_grad. On cuda every mark synchronizes, which removes CPU/GPU overlap, so phases are opt-in there."""

    def __init__(self, cuda, phases):
        self.cuda = cuda
        self.phases = phases
        self.begin = None
        self.marks = []
        self.step_s = []
        self.end_t = []
        self.phase_s = []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.phases and self.begin is not None:
            self._sync()
            self.marks.append(time.perf_counter())

    def on_train_begin(self, args, state, control, **kw):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self.begin = time.perf_counter()
        self.marks = []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.mark()

    def on_optimizer_step(self, args, state, control, **kw):
        self.mark()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        t = time.perf_counter()
        self.step_s.append(t - self.begin)
        self.end_t.append(t)
        if self.phases:
            pts = [self.begin] + self.marks + [t]
            self.phase_s.append(dict(zip(PHASES, [b - a for a, b in zip(pts, pts[1:])]))
                                if len(pts) == len(PHASES) + 1 else None)
        self.begin = None


class TimedDPOTrainer(DPOTrainer):
    """DPOTrainer unchanged, except that the reference precompute pass is timed and the last loss is kept."""

    ref_precompute_s = None
    last_loss = None
    step_timer = None

    def _precompute_ref_logps(self, dataset, name, batch_size):
        cuda = torch.cuda.is_available() and self.args.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        if cuda:
            torch.cuda.synchronize()
        self.ref_precompute_s = (self.ref_precompute_s or 0.0) + time.perf_counter() - t0
        return out

    def compute_loss(self, *args, **kwargs):
        out = super().compute_loss(*args, **kwargs)
        if self.step_timer is not None and self.model.training:
            self.step_timer.mark()
        return out

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.last_loss = loss  # detached; read once at the end, no extra sync per step
        if self.step_timer is not None:
            self.step_timer.mark()
        return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(bench_torch.SHAPES), default="small")
    ap.add_argument("--workload", choices=list(bench_torch.WORKLOADS) + ["custom"], default="hh")
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--chosen-len", type=int, default=90)
    ap.add_argument("--rejected-len", type=int, default=70)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reference", choices=["precomputed", "live"], default="precomputed")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None)
    ap.add_argument("--phases", action="store_true",
                    help="time phases (forward+loss, backward, grad norm, AdamW, rest) on cuda too; they add "
                         "synchronizations there. Always on for cpu, where they cost nothing")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: DPOConfig(bf16=True), i.e. autocast(bfloat16) with fp32 master weights (AMP)")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.pairs < 1:
        sys.exit("--steps >= 1, --warmup >= 0, --pairs >= 1")

    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    cuda = a.device == "cuda"
    load0 = list(os.getloadavg())  # other processes distort CPU timings; recorded in the JSON
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(a.seed)

    if a.workload == "custom":
        pl, cl, rl = a.prompt_len, a.chosen_len, a.rejected_len
    else:
        pl, cl, rl = bench_torch.WORKLOADS[a.workload]
    if pl < 1 or cl < 1 or rl < 1:
        sys.exit("prompt, chosen and rejected lengths must be >= 1 (TRL appends EOS as the last completion token)")

    s = bench_torch.SHAPES[a.shape]
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_layer=s["n_layer"], n_embd=s["n_embd"],
                     n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", tie_word_embeddings=True)
    if pl + max(cl, rl) > cfg.n_positions:
        sys.exit(f"rows of {pl + max(cl, rl)} tokens exceed n_positions {cfg.n_positions}")
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    ref_model = None
    if a.reference == "live":
        ref_model = GPT2LMHeadModel(cfg)
        ref_model.load_state_dict(model.state_dict())
        ref_model.eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)

    # Same batch as bench_torch.py (built on CPU here; TRL moves its own batches to the device).
    P = a.pairs
    ids, attn, lmask, row_lens = bench_torch.build_batch(P, pl, cl, rl, cfg.vocab_size, a.seed, "cpu")
    tok = make_tokenizer(cfg.vocab_size)
    pairs = []
    for i in range(P):
        prompt = ids[i, :pl].tolist()
        chosen = ids[i, pl:pl + cl].tolist()
        rejected = ids[P + i, pl:pl + rl].tolist()
        # Trailing space: TRL tokenizes prompt + chosen as one string. EOS (appended by TRL) replaces the last id.
        pairs.append({"prompt": to_text(prompt) + " ", "chosen": to_text(chosen[:-1]), "rejected": to_text(rejected[:-1])})
    total_steps = a.warmup + a.steps
    rows = pairs * total_steps
    train_ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})

    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    dpo_kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=P,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        num_train_epochs=1,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=a.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=a.reference == "precomputed",
        max_length=None,  # no truncation (rows are at most n_positions, checked above)
        padding_free=False,
        bf16=a.precision == "bf16",
        fp16=False,
        use_cpu=not cuda,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=a.seed,
    )
    # TRL's configs default to gradient (activation) checkpointing on; bench_torch.py does not recompute.
    # transformers >= 5.x renamed the field to activation_checkpointing (the old name is a deprecated alias).
    ckpt_field = ("activation_checkpointing" if "activation_checkpointing" in
                  {f.name for f in dataclasses.fields(DPOConfig)} else "gradient_checkpointing")
    dpo_kwargs[ckpt_field] = False
    args = DPOConfig(**dpo_kwargs)

    timer = StepTimer(cuda, phases=(not cuda) or a.phases)
    t_init = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                              processing_class=tok, callbacks=[timer])
    init_s = time.perf_counter() - t_init
    trainer.step_timer = timer
    trainer.remove_callback(PrinterCallback)  # it would print the end-of-training metrics dict
    if a.device == "cpu":
        torch.set_num_threads(a.threads)

    # Check the batch TRL will train on against bench_torch.build_batch: same shape, same attention mask,
    # same ids except the last completion token (EOS), completion mask = bench_torch's loss mask shifted by one.
    probe = trainer.data_collator([trainer.train_dataset[i] for i in range(P)])
    exp_ids = ids.clone()
    for r, n in enumerate(row_lens):
        exp_ids[r, n - 1] = tok.eos_token_id
    assert probe["input_ids"].shape == ids.shape, (probe["input_ids"].shape, ids.shape)
    assert torch.equal(probe["attention_mask"], attn), "attention mask differs from bench_torch.build_batch"
    assert torch.equal(probe["input_ids"], exp_ids), "token ids differ from bench_torch.build_batch"
    assert torch.equal(probe["completion_mask"][:, 1:].float(), lmask), "completion mask differs"
    if a.reference == "precomputed":
        assert "ref_chosen_logps" in trainer.train_dataset.column_names

    train_out = trainer.train()

    times_all = timer.step_s
    if len(times_all) != total_steps:
        sys.exit(f"expected {total_steps} optimizer steps, timed {len(times_all)}")
    warm_times, times = times_all[:a.warmup], times_all[a.warmup:]
    intervals = [t1 - t0 for t0, t1 in zip(timer.end_t, timer.end_t[1:])][max(a.warmup - 1, 0):]
    if a.warmup == 0:
        intervals = [None] + intervals  # the first step has no previous end

    med = statistics.median(times)
    phase_med = None
    if timer.phases and all(p is not None for p in timer.phase_s[a.warmup:]):
        phase_med = {k: statistics.median(p[k] for p in timer.phase_s[a.warmup:]) for k in PHASES}
    real_tokens = sum(row_lens)
    T = real_tokens / len(row_lens)
    L, d = s["n_layer"], s["n_embd"]
    coef = 16 if a.reference == "live" else 12
    flops = coef * P * T * (n_params + L * d * T)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "torch.cuda.max_memory_allocated (reset at on_train_begin, after the reference precompute)"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        peak_kind = "ru_maxrss (process peak RSS, includes the reference precompute)"
    last_loss = trainer.last_loss.item() if trainer.last_loss is not None else None
    ckpt_on = bool(getattr(model, "is_activation_checkpointing", None) if hasattr(model, "is_activation_checkpointing")
                   else getattr(model, "is_gradient_checkpointing", False))
    ta = trainer.args
    shutil.rmtree(out_dir, ignore_errors=True)

    res = {
        "schema": "dpo-bench-trl-1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": bench_torch.machine_info(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "datasets": datasets.__version__, "accelerate": accelerate.__version__,
        "device": a.device, "threads": torch.get_num_threads() if not cuda else None,
        "shape": a.shape, "n_layer": L, "n_embd": d, "n_head": s["n_head"], "n_params": n_params,
        "workload": a.workload, "prompt_len": pl, "chosen_len": cl, "rejected_len": rl,
        "pairs": P, "rows": 2 * P, "padded_len": int(probe["input_ids"].shape[1]),
        "real_tokens_per_step": real_tokens, "mean_row_len": T, "reference": a.reference, "compile": False,
        "precision": a.precision, "beta": a.beta, "lr": a.lr,
        "warmup": a.warmup, "steps": a.steps,
        "warmup_times_s": warm_times, "step_times_s": times,
        "median_step_s": med, "min_step_s": min(times), "max_step_s": max(times),
        "tokens_per_s": real_tokens / med, "pairs_per_s": P / med,
        "step_interval_s": intervals,
        "phase_median_s": phase_med,
        "phase_times_s": timer.phase_s[a.warmup:] if timer.phases else None,
        "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
        "flops_per_step": flops, "flops_formula": f"{coef}*P*T*(N + L*d*T)",
        "gflops_per_s": flops / med / 1e9, "last_loss": last_loss,
        "ref_precompute_s": trainer.ref_precompute_s,
        "ref_precompute_pairs": len(train_ds) if a.reference == "precomputed" else None,
        "trainer_init_s": init_s, "train_runtime_s": train_out.metrics.get("train_runtime"),
        "trl_settings": {
            "optim": str(getattr(ta.optim, "value", ta.optim)), "weight_decay": ta.weight_decay, "adam_beta1": ta.adam_beta1,
            "adam_beta2": ta.adam_beta2, "adam_epsilon": ta.adam_epsilon, "max_grad_norm": ta.max_grad_norm,
            "lr_scheduler_type": str(getattr(ta.lr_scheduler_type, "value", ta.lr_scheduler_type)), ckpt_field: getattr(ta, ckpt_field),
            "model_checkpointing_active": ckpt_on,
            "bf16": ta.bf16, "loss_type": ta.loss_type, "precompute_ref_log_probs": ta.precompute_ref_log_probs,
            "max_length": ta.max_length, "padding_free": ta.padding_free,
            "pad_to_multiple_of": ta.pad_to_multiple_of, "dataloader_num_workers": ta.dataloader_num_workers,
            "dataloader_pin_memory": ta.dataloader_pin_memory, "attn_implementation": model.config._attn_implementation,
        },
        "data_feed": ("text through TRL's own preprocessing with a word-level tokenizer ('t<id>' words, EOS = 50256); "
                      "ids = bench_torch.build_batch except the last token of each completion, which is TRL's EOS; "
                      f"the same {P} pairs repeated {total_steps} times, one epoch"),
        "step_timing": "on_step_begin -> on_step_end (TrainerCallback), cuda-synchronized; batch fetch excluded",
        "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
    }

    def ms(x):
        return f"{x * 1e3:.1f} ms"

    print(f"TRL {trl.__version__} DPOTrainer | transformers {transformers.__version__} | torch {torch.__version__} | "
          f"device {a.device}" + (f" ({res['threads']} threads)" if not cuda else f" ({res['machine'].get('gpu')})"))
    table = [
        ("shape", f"{a.shape} (L={L}, d={d}, N={n_params})"),
        ("workload", f"{a.workload}: prompt {pl}, chosen {cl}, rejected {rl}; P={P} pairs, {2 * P} rows, "
                     f"padded to {res['padded_len']}, T={T:.1f}"),
        ("reference / precision", f"{a.reference} / {a.precision}"),
        ("steps", f"{a.steps} timed after {a.warmup} warm-up {[round(x, 3) for x in warm_times]} s"),
        ("median step", f"{ms(med)} (min {ms(min(times))}, max {ms(max(times))})"),
        ("step interval (incl. batch fetch)", ", ".join("-" if x is None else ms(x) for x in intervals)),
        ("phases (median)", "-" if phase_med is None else
         ", ".join(f"{k} {ms(v)} ({100 * v / med:.0f}%)" for k, v in phase_med.items())),
        ("tokens/s", f"{res['tokens_per_s']:.1f}"),
        ("pairs/s", f"{res['pairs_per_s']:.3f}"),
        ("GFLOP/s", f"{res['gflops_per_s']:.2f} ({res['flops_formula']})"),
        ("peak memory", f"{peak_mb:.0f} MiB [{peak_kind}]"),
        ("reference precompute", "-" if trainer.ref_precompute_s is None else
         f"{trainer.ref_precompute_s:.3f} s for {len(train_ds)} pairs (not in step time)"),
        ("trainer init", f"{init_s:.3f} s"),
        ("last loss", f"{last_loss:.6f}" if last_loss is not None else "-"),
        ("loadavg start/end", f"{load0[0]:.2f} / {res['loadavg_end'][0]:.2f}"),
    ]
    w = max(len(k) for k, _ in table)
    for k, v in table:
        print(f"  {k:<{w}}  {v}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"  wrote {a.json}")


if __name__ == "__main__":
    main()
