#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (tests/fuzz/seeds/*): small valid files of each kind and a few near misses,
so that mutations start inside the formats. Standard library only; rerun to regenerate (deterministic)."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(kind, name, data):
    d = os.path.join(HERE, "seeds", kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)] -> the safetensors file bytes."""
    header, off, blob = {}, 0, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blob += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


f32 = lambda *v: struct.pack("<%df" % len(v), *v)
put("safetensors", "f32_2x3", safetensors([("w", "F32", [2, 3], f32(1, -2, 3.5, 0, 1e-3, -7))], {"format": "pt"}))
put("safetensors", "mixed", safetensors([
    ("a", "BF16", [4], struct.pack("<4H", 0x3F80, 0xC000, 0x7FC0, 0x0001)),
    ("b", "F16", [2], struct.pack("<2H", 0x3C00, 0xFC00)),
    ("c", "I64", [2], struct.pack("<2q", -1, 2**40)),
    ("d", "F64", [1], struct.pack("<d", 2.5)),
    ("e", "I32", [0, 3], b"")]))
put("safetensors", "scalar_and_empty_header", safetensors([("s", "F32", [], f32(4.0))]))
put("safetensors", "truncated", safetensors([("w", "F32", [4], f32(1, 2, 3, 4))])[:-3])

prefs = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Say hi", "chosen": " hi there, friend", "rejected": " no", "score_chosen": 9, "score_rejected": 2.5},
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 256], "rejected_ids": [6]},
    {"prompt": "x" * 40, "chosen": "y" * 30, "rejected": "z"},
]
put("jsonl", "prefs", "".join(json.dumps(r) + "\n" for r in prefs))
put("jsonl", "sft", "".join(json.dumps(r) + "\n" for r in [
    {"prompt": "Tell me", "completion": " a story"}, {"prompt_ids": [7, 8], "completion_ids": [9, 256]}]))
put("jsonl", "unicode_blank_lines", '\n{"prompt": "caf\\u00e9 \u00e9", "chosen": " \U0001F600", "rejected": " ?"}\n\n')
put("jsonl", "bad_types", '{"prompt": 3, "chosen": [1], "rejected": null}\n{"prompt": "a"\n')

put("yaml", "dpo", """model: out/sft
train_file: data/prefs.jsonl
out_dir: out/dpo
beta: 0.1
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
learning_rate: 5.0e-7
lr_scheduler_type: cosine
warmup_steps: 10
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
max_length: 256
max_prompt_length: 128
truncation_mode: keep_end
precision: bf16
""")
put("yaml", "sft_flow_style", "{model: base, train_file: sft.jsonl, out_dir: o, num_train_epochs: 2, seed: 7}\n")
put("yaml", "anchors_and_unknown", "base: &b 0.1\nbeta: *b\nbetta: 0.2\nmax_steps: -1\n")
put("yaml", "empty", "")
