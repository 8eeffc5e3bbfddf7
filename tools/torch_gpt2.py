"""GPT-2 in plain PyTorch, parameter-compatible with transformers' GPT2LMHeadModel.

A small, dependency-free (PyTorch only) GPT-2 for the reference tools (tools/bench_torch.py,
tools/torch_dpo_parity.py) on machines without `transformers`:

  token + position embedding -> n_layer pre-LayerNorm blocks
    (ln_1 -> fused qkv Conv1D -> causal attention with a key padding mask -> c_proj -> residual,
     ln_2 -> c_fc -> GELU (tanh) -> c_proj -> residual)
  -> ln_f -> LM head tied to the token embedding.

Parameter names and shapes are HF's (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight` [C, 3C] in
Conv1D's [in, out] layout, ..., `lm_head.weight` tied to `transformer.wte.weight`), so `state_dict()` loads into
GPT2LMHeadModel and back, and HF / `dpo init` / `dpo train` checkpoints (config.json + model.safetensors) load with
load_checkpoint(). Safetensors files are read and written here directly (the format is an 8-byte header length, a
JSON header and the raw little-endian tensors), so the `safetensors` package is not needed either.

attn_impl:
  "sdpa"  torch.nn.functional.scaled_dot_product_attention with a boolean mask (the fast path).
  "math"  explicit scores -> softmax -> weighted sum, computed in float32 for bf16/fp16 activations (in their
          own dtype for float32/float64) and rounded to the activation dtype once (as the dpo kernels do in bf16; identical to "sdpa" up to rounding in fp32).
Padding: attention_mask [B, T] (1 real, 0 padding) masks padding keys; positions are 0..T-1 in every row (right
padding). A query with no visible key (left padding) may attend to itself, so no row of the softmax is empty and
padded rows stay finite (their outputs are not meaningful).
"""
import json
import math
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F


class GPT2Config:
    """The GPT-2 hyper-parameters this module supports (HF config.json field names)."""

    def __init__(self, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 layer_norm_epsilon=1e-5):
        self.vocab_size = int(vocab_size)
        self.n_positions = int(n_positions)
        self.n_embd = int(n_embd)
        self.n_layer = int(n_layer)
        self.n_head = int(n_head)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, k) <= 0:
                raise ValueError(f"GPT2Config: {k} must be > 0, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @classmethod
    def from_dict(cls, d, where="config"):
        """From an HF GPT-2 config dict; rejects the variants this module does not implement."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{where}: model_type is {d['model_type']!r}, only 'gpt2' is supported")
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if k not in d:
                raise ValueError(f"{where}: missing field '{k}'")
        inner = d.get("n_inner")
        if inner is not None and inner != 4 * d["n_embd"]:
            raise ValueError(f"{where}: n_inner {inner} is not supported (only 4*n_embd)")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function {act!r} is not supported (only the tanh GELU)")
        if d.get("tie_word_embeddings", True) is not True:
            raise ValueError(f"{where}: tie_word_embeddings must be true")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag, False):
                raise ValueError(f"{where}: {flag} = true is not supported")
        if d.get("scale_attn_weights", True) is not True:
            raise ValueError(f"{where}: scale_attn_weights must be true")
        return cls(d["vocab_size"], d["n_positions"], d["n_embd"], d["n_layer"], d["n_head"],
                   d.get("layer_norm_epsilon", 1e-5))

    @classmethod
    def from_json_file(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f), path)

    def to_dict(self):
        """An HF-loadable config.json body (the fields `dpo init` writes)."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_ctx": self.n_positions,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "torch_dtype": "float32",
            "bos_token_id": self.vocab_size - 1, "eos_token_id": self.vocab_size - 1,
        }

    def num_parameters(self):
        C = self.n_embd
        return self.vocab_size * C + self.n_positions * C + self.n_layer * (12 * C * C + 13 * C) + 2 * C


class Conv1D(nn.Module):
    """HF's Conv1D: y = x @ weight + bias with weight [in, out]."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class Attention(nn.Module):
    def __init__(self, cfg, attn_impl):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.attn_impl = attn_impl

    def forward(self, x, mask):
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hs]
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            acc = torch.promote_types(x.dtype, torch.float32)  # float32 for bf16/fp16, else x's own dtype
            qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
            s = (qf @ kf.transpose(-2, -1)) * (1.0 / math.sqrt(C // H))
            s = s.masked_fill(~mask, float("-inf"))
            y = (torch.softmax(s, dim=-1) @ vf).to(x.dtype)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg, attn_impl):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, attn_impl)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg, attn_impl):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, attn_impl) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # [T(query), T(key)]
        mask = mask.view(1, 1, T, T)
        if attention_mask is not None:
            keys = attention_mask.to(torch.bool).view(B, 1, 1, T)
            eye = torch.eye(T, dtype=torch.bool, device=input_ids.device).view(1, 1, T, T)
            mask = (mask & keys) | eye  # a query always sees itself: no empty softmax row under left padding
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)


class CausalLMOutput:
    def __init__(self, logits):
        self.logits = logits


class GPT2LMHeadModel(nn.Module):
    """Drop-in for transformers.GPT2LMHeadModel's training forward: model(input_ids=, attention_mask=).logits."""

    def __init__(self, cfg, attn_impl="sdpa"):
        super().__init__()
        if attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'math', got {attn_impl!r}")
        self.config = cfg
        self.transformer = GPT2Model(cfg, attn_impl)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02, generator=None):
        """GPT-2's initialisation (HF _init_weights): N(0, std) weights and embeddings, N(0, std/sqrt(2 n_layer))
        residual projections, zero biases, LayerNorm 1 / 0."""
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer), generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(self.lm_head(self.transformer(input_ids, attention_mask)))


# --- safetensors ---------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path):
    """{name: CPU tensor} and the metadata dict of a .safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} exceeds the file size")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    for name, e in header.items():
        dt = _ST_DTYPES.get(e["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {e['dtype']}")
        b, end = e["data_offsets"]
        buf = bytearray(data[base + b:base + end])
        numel = math.prod(e["shape"])
        t = torch.frombuffer(buf, dtype=dt) if numel else torch.empty(0, dtype=dt)
        if t.numel() != numel:
            raise ValueError(f"{path}: tensor '{name}' holds {t.numel()} elements, shape {e['shape']} needs {numel}")
        out[name] = t.reshape(e["shape"])
    return out, meta


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: tensor} (contiguous little-endian copies, names sorted) atomically."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def canonical_state(model):
    """{HF name: parameter} without the tied lm_head.weight (each parameter once)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k != "lm_head.weight"}


@torch.no_grad()
def load_tensors(model, tensors, where="weights"):
    """Copies HF-named tensors into `model` (names with or without the 'transformer.' prefix; the attn.bias /
    attn.masked_bias buffers of old checkpoints are ignored; lm_head.weight must equal wte). Raises ValueError
    naming the tensor for a missing, unexpected, duplicated or mis-shaped one."""
    params = canonical_state(model)
    seen = {}
    lm_head = None
    for name, t in tensors.items():
        n = name if name.startswith("transformer.") or name == "lm_head.weight" else "transformer." + name
        if n == "lm_head.weight":
            lm_head = t
            continue
        if n.endswith(".attn.bias") or n.endswith(".attn.masked_bias"):
            continue
        if n not in params:
            raise ValueError(f"{where}: unexpected tensor '{name}' (not a GPT-2 parameter)")
        if n in seen:
            raise ValueError(f"{where}: tensor '{n}' appears twice (with and without prefix)")
        seen[n] = t
    for n, p in params.items():
        if n not in seen:
            raise ValueError(f"{where}: missing tensor '{n}'")
        t = seen[n]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor '{n}' has shape {tuple(t.shape)}, the config expects {tuple(p.shape)}")
        p.copy_(t.to(device=p.device, dtype=p.dtype))
    if lm_head is not None and not torch.equal(lm_head.to(seen["transformer.wte.weight"].dtype),
                                               seen["transformer.wte.weight"]):
        raise ValueError(f"{where}: lm_head.weight differs from wte; only a tied LM head is supported")


def load_checkpoint(path, device="cpu", dtype=torch.float32, attn_impl="sdpa"):
    """A GPT2LMHeadModel from an HF checkpoint directory (config.json + model.safetensors)."""
    cfg = GPT2Config.from_json_file(os.path.join(path, "config.json"))
    model = GPT2LMHeadModel(cfg, attn_impl)
    tensors, _ = read_safetensors(os.path.join(path, "model.safetensors"))
    load_tensors(model, tensors, os.path.join(path, "model.safetensors"))
    return model.to(device=device, dtype=dtype)


def save_checkpoint(model, path):
    """config.json + model.safetensors (F32, 'transformer.'-prefixed names, no lm_head: tied), as `dpo init`."""
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"),
                      {k: v.detach().float() for k, v in canonical_state(model).items()}, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
        f.write("\n")
