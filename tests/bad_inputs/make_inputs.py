#!/usr/bin/env python3
"""Writes the input files of the bad-input corpus (tests/bad_inputs/<kind>/...): a tiny valid GPT-2 checkpoint
(1 layer, 1 head, n_embd 8, vocab 257, 32 positions) and broken variants of it, and the JSONL data and YAML
configs named by each kind's cases.txt. Standard library only, deterministic; rerun after editing and commit the
output. The expectations (command line, exit code, message, files that must not exist) live in cases.txt."""
import hashlib
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
V, C, P, L = 257, 8, 32, 1


def put(rel, data):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None, header_extra=None):
    """tensors: [(name, dtype, shape, raw bytes)] -> the file bytes; header_extra edits the header dict."""
    header, off, blob = {}, 0, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blob += raw
    if metadata:
        header["__metadata__"] = metadata
    if header_extra:
        header_extra(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def gpt2_tensors():
    """[(name, dtype, shape, raw)] of the tiny model in HF's order; deterministic small values, LayerNorm gains 1."""
    specs = [("wte.weight", [V, C]), ("wpe.weight", [P, C])]
    for l in range(L):
        p = "h.%d." % l
        specs += [(p + "ln_1.weight", [C]), (p + "ln_1.bias", [C]), (p + "attn.c_attn.weight", [C, 3 * C]),
                  (p + "attn.c_attn.bias", [3 * C]), (p + "attn.c_proj.weight", [C, C]), (p + "attn.c_proj.bias", [C]),
                  (p + "ln_2.weight", [C]), (p + "ln_2.bias", [C]), (p + "mlp.c_fc.weight", [C, 4 * C]),
                  (p + "mlp.c_fc.bias", [4 * C]), (p + "mlp.c_proj.weight", [4 * C, C]), (p + "mlp.c_proj.bias", [C])]
    specs += [("ln_f.weight", [C]), ("ln_f.bias", [C])]
    out, k = [], 0
    for name, shape in specs:
        n = 1
        for d in shape:
            n *= d
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            vals = [1.0] * n
        else:
            vals = [((k + i) * 37 % 17 - 8) / 100.0 for i in range(n)]
        k += n
        out.append((name, "F32", shape, f32(vals)))
    return out


CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_ctx": P,
          "n_embd": C, "n_layer": L, "n_head": 1, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
          "tie_word_embeddings": True, "bos_token_id": V - 1, "eos_token_id": V - 1}


def checkpoint(rel, config=CONFIG, weights=None, config_text=None):
    """A checkpoint directory: config.json (config, or config_text verbatim) and model.safetensors (bytes)."""
    d = os.path.join(HERE, rel)
    shutil.rmtree(d, ignore_errors=True)
    if config is not None or config_text is not None:
        put(rel + "/config.json", config_text if config_text is not None else json.dumps(config, indent=2) + "\n")
    if weights is not None:
        put(rel + "/model.safetensors", weights)


def checksums(rel, self_hash_ok=True):
    """checksums.json as dpo writes it (format dpo-checksums-1; sha256 of the compact, key-sorted file list)."""
    d = os.path.join(HERE, rel)
    files = {}
    for n in sorted(os.listdir(d)):
        with open(os.path.join(d, n), "rb") as f:
            files[n] = hashlib.sha256(f.read()).hexdigest()
    listed = json.dumps(files, separators=(",", ":"), sort_keys=True)
    own = hashlib.sha256(listed.encode()).hexdigest()
    if not self_hash_ok:
        own = own[:-1] + ("0" if own[-1] != "0" else "1")
    put(rel + "/checksums.json", json.dumps({"files": files, "format": "dpo-checksums-1", "sha256": own}, indent=2) + "\n")


def with_config(**changes):
    c = dict(CONFIG)
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def replace(tensors, name, dtype=None, shape=None, raw=None):
    out = []
    for n, dt, sh, r in tensors:
        if n == name:
            out.append((n, dtype or dt, shape or sh, raw if raw is not None else r))
        else:
            out.append((n, dt, sh, r))
    return out


# ---- models and checkpoints ----
T = gpt2_tensors()
GOOD = safetensors(T, {"format": "pt"})
checkpoint("model/good", weights=GOOD)  # its last tensor (ln_f.bias) ends exactly at the end of the file
checkpoint("model/no_config", config=None, weights=GOOD)
checkpoint("model/no_weights")
checkpoint("model/config_not_json", config_text='{"model_type": "gpt2", "n_embd": 8,\n')
checkpoint("model/config_n_embd_string", config=with_config(n_embd="8"), weights=GOOD)
checkpoint("model/config_missing_n_layer", config=with_config(n_layer=None), weights=GOOD)
checkpoint("model/config_model_type", config=with_config(model_type="gemma"), weights=GOOD)
checkpoint("model/config_heads_not_divisor", config=with_config(n_head=3), weights=GOOD)
checkpoint("model/config_untied", config=with_config(tie_word_embeddings=False), weights=GOOD)
checkpoint("model/config_activation", config=with_config(activation_function="relu"), weights=GOOD)
checkpoint("model/st_empty", weights=b"")
checkpoint("model/st_7_bytes", weights=GOOD[:7])
checkpoint("model/st_truncated_one_byte", weights=GOOD[:-1])  # ln_f.bias ends one byte past the data
checkpoint("model/st_truncated_mid_header", weights=GOOD[:40])
hlen = struct.unpack("<Q", GOOD[:8])[0]
checkpoint("model/st_header_length_past_end", weights=struct.pack("<Q", len(GOOD) - 8 + 1) + GOOD[8:])
checkpoint("model/st_header_length_huge", weights=struct.pack("<Q", 2**62) + GOOD[8:])
checkpoint("model/st_header_not_json", weights=struct.pack("<Q", 16) + b"{not json here!}")
checkpoint("model/st_header_array", weights=struct.pack("<Q", 8) + b"[1,2,3] ")


def offsets_past_end(h):
    h["ln_f.bias"]["data_offsets"][1] += 1


checkpoint("model/st_offsets_past_end", weights=safetensors(T, header_extra=offsets_past_end))


def offsets_reversed(h):
    b, e = h["wpe.weight"]["data_offsets"]
    h["wpe.weight"]["data_offsets"] = [e, b]


checkpoint("model/st_offsets_reversed", weights=safetensors(T, header_extra=offsets_reversed))


def offsets_negative(h):
    h["wpe.weight"]["data_offsets"][0] = -4


checkpoint("model/st_offsets_negative", weights=safetensors(T, header_extra=offsets_negative))


def overlap(h):
    h["wpe.weight"]["data_offsets"] = [0, P * C * 4]


checkpoint("model/st_overlap", weights=safetensors(T, header_extra=overlap))


def size_mismatch(h):
    h["ln_f.bias"]["shape"] = [C + 1]


checkpoint("model/st_bytes_vs_shape", weights=safetensors(T, header_extra=size_mismatch))
checkpoint("model/st_dtype_unknown", weights=safetensors(replace(T, "ln_f.bias", dtype="F8_E9")))
checkpoint("model/st_dtype_int", weights=safetensors(replace(T, "ln_f.bias", dtype="I32")))
checkpoint("model/st_wrong_shape", weights=safetensors(replace(T, "wpe.weight", shape=[C, P])))
checkpoint("model/st_missing_tensor", weights=safetensors([t for t in T if t[0] != "ln_f.bias"]))
checkpoint("model/st_unexpected_tensor", weights=safetensors(T + [("h.1.ln_1.weight", "F32", [C], f32([1.0] * C))]))
checkpoint("model/st_lm_head_untied",
           weights=safetensors(T + [("lm_head.weight", "F32", [V, C], f32([0.5] * (V * C)))]))


def metadata_not_string(h):
    h["__metadata__"] = {"format": 3}


checkpoint("model/st_metadata_not_string", weights=safetensors(T, header_extra=metadata_not_string))
# dpo checkpoints: checksums.json lists every file
checkpoint("model/sum_good", weights=GOOD)
checksums("model/sum_good")
checkpoint("model/sum_weight_changed", weights=GOOD)
checksums("model/sum_weight_changed")
changed = bytearray(GOOD)
changed[-5] ^= 0x01  # one bit of ln_f.bias
put("model/sum_weight_changed/model.safetensors", bytes(changed))
checkpoint("model/sum_self_hash", weights=GOOD)
checksums("model/sum_self_hash", self_hash_ok=False)
checkpoint("model/sum_not_json", weights=GOOD)
put("model/sum_not_json/checksums.json", '{"format": "dpo-checksums-1", "files": {\n')
checkpoint("model/sum_state_unlisted", weights=GOOD)
checksums("model/sum_state_unlisted")
put("model/sum_state_unlisted/trainer_state.json", '{"global_step": 1}\n')
checkpoint("model/sum_missing_with_state", weights=GOOD)
put("model/sum_missing_with_state/trainer_state.json", '{"global_step": 1}\n')

# ---- JSONL data ----
GOOD_PAIR = '{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}\n'
data = {
    "good.jsonl": GOOD_PAIR * 4,
    "bad_json_line3.jsonl": GOOD_PAIR * 2 + '{"prompt": "a", "chosen": " b", "rejected": " c"\n' + GOOD_PAIR,
    "missing_rejected_line2.jsonl": GOOD_PAIR + '{"prompt": "a", "chosen": " b"}\n',
    "chosen_number_line1.jsonl": '{"prompt": "a", "chosen": 5, "rejected": " c"}\n',
    "prompt_null_line1.jsonl": '{"prompt": null, "chosen": " b", "rejected": " c"}\n',
    "empty.jsonl": "",
    "blank_lines.jsonl": "\n  \n\t\n",
    "duplicate_key_line2.jsonl": GOOD_PAIR + '{"prompt": "a", "chosen": " b", "rejected": " c", "chosen": " d"}\n',
    "ids_out_of_vocab_line1.jsonl": '{"prompt_ids": [1, 2], "chosen_ids": [3, 257], "rejected_ids": [4]}\n',
    "ids_negative_line1.jsonl": '{"prompt_ids": [1, 2], "chosen_ids": [-1], "rejected_ids": [4]}\n',
    "ids_float_line1.jsonl": '{"prompt_ids": [1, 2.5], "chosen_ids": [3], "rejected_ids": [4]}\n',
    "mixed_forms_line1.jsonl": '{"prompt": "a", "chosen_ids": [3], "rejected": " c"}\n',
    "array_line1.jsonl": '[1, 2, 3]\n',
    "empty_prompt_line1.jsonl": '{"prompt": "", "chosen": " b", "rejected": " c"}\n',
    "empty_chosen_line1.jsonl": '{"prompt": "a", "chosen": "", "rejected": " c"}\n',
    "bad_number_line1.jsonl": '{"prompt": "a", "chosen": " b", "rejected": " c", "x": 1e999}\n',
    "score_string_line2.jsonl": GOOD_PAIR.replace("}", ', "score_chosen": 1, "score_rejected": 0}') +
    '{"prompt": "a", "chosen": " b", "rejected": " c", "score_chosen": "high", "score_rejected": 0}\n',
    "score_missing_line1.jsonl": '{"prompt": "a", "chosen": " b", "rejected": " c"}\n',
    "score_infinite_line1.jsonl": '{"prompt": "a", "chosen": " b", "rejected": " c", "score_chosen": 1e400, "score_rejected": 0}\n',
    "sft_missing_completion_line1.jsonl": '{"prompt": "a", "chosen": " b"}\n',
    # truncation: trl1 drops a record whose prompt alone has >= max_length (32, model/good's n_positions) bytes.
    "prompts_fill_max_length.jsonl": '{"prompt": "%s", "chosen": " b", "rejected": " c"}\n' % ("p" * 32) +
    '{"prompt": "%s", "chosen": " b", "rejected": " c"}\n' % ("q" * 40),
}
for name, text in data.items():
    put("data/" + name, text)
put("data/invalid_utf8_line1.jsonl", b'{"prompt": "a\xff", "chosen": " b", "rejected": " c"}\n')
os.makedirs(os.path.join(HERE, "data", "a_directory.jsonl"), exist_ok=True)
put("data/a_directory.jsonl/.keep", "")

# ---- YAML configs ----
configs = {
    "unknown_key.yaml": "betta: 0.1\n",
    "wrong_type.yaml": "beta: high\n",
    "out_of_range.yaml": "beta: -1\n",
    "learning_rate_huge.yaml": "learning_rate: 1.0e39\n",
    "threads_huge.yaml": "num_threads: 100000\n",
    "duplicate_key.yaml": "beta: 0.1\nmax_steps: 2\nbeta: 0.2\n",
    "two_documents.yaml": "beta: 0.1\n---\nbeta: 0.2\n",
    "not_mapping.yaml": "- beta\n- 0.1\n",
    "invalid_yaml.yaml": "beta: 0.1\nmax_steps: 2\nloss_type: [sigmoid\n",
    "unknown_loss.yaml": "loss_type: sigmoidd\n",
    "list_for_scalar.yaml": "beta: [0.1, 0.2]\n",
    "negative_batch.yaml": "per_device_train_batch_size: -2\n",
    "max_length_over_model.yaml": "max_length: 33\n",
    "trl1_with_max_prompt_length.yaml": "truncation: trl1\nmax_prompt_length: 16\n",
    "keep_end_trl1.yaml": "truncation_mode: keep_end\n",
    "unknown_truncation.yaml": "truncation: trl0\n",
    "constant_with_warmup_steps.yaml": "warmup_steps: 10\n",
}
for name, text in configs.items():
    put("config/" + name, text)
os.makedirs(os.path.join(HERE, "config", "a_directory.yaml"), exist_ok=True)
put("config/a_directory.yaml/.keep", "")
put("cli/a_file", "not a checkpoint\n")
