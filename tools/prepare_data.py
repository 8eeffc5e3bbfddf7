#!/usr/bin/env python3
"""Turns TRL's conversational preference data into dpo's token-id records, with the model's own chat template.

Input: JSONL, one row per line, in one of TRL's two conversational preference forms (a message is
{"role": str, "content": str}):
  explicit prompt   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  implicit prompt   {"chosen": [messages], "rejected": [messages]}
In the implicit form the prompt is the messages chosen and rejected share at their start, and the completions are
the rest (TRL's extract_prompt). Optional "score_chosen" / "score_rejected" (ODPO) are copied through; other
fields are ignored.

Output: JSONL {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]} (plus the scores), which `dpo train`
reads as token-id records (docs/training.md, "Chat data"). For each row, as TRL 1.x's DPOTrainer tokenizes
conversational data:
  prompt_ids       the chat template applied to the prompt messages with add_generation_prompt=True (or, when the
                   prompt ends with an assistant message, continue_final_message=True, as TRL does), tokenized
                   without added special tokens (the template writes its own BOS, if any);
  chosen_ids       the template applied to prompt + chosen, tokenized the same way, minus the prompt's tokens;
  rejected_ids     the same for prompt + rejected.
The full conversation's tokens must start with the prompt's tokens; a row where they do not (a template that
renders the prompt differently alone, or a token merging across the boundary) is an error naming the line. TRL
instead starts the completion where the two diverge, with a warning.

--max-length N applies the part of dpo's truncation (truncation: trl1, the default) that removes rows: a row whose
prompt alone has N or more tokens is dropped and counted, as `dpo train` with max_length N drops it. Longer rows
are written whole and counted: the trainer cuts each prompt + completion to max_length when it loads them (after
appending EOS), so cutting here would differ from what it does.

Needs HF transformers (and its tokenizers and jinja2); the tokenizer is read from a local directory only.
Exit status: 0 on success, 2 on bad input (the message names the file, line and field), 1 on other errors.
"""
import argparse
import json
import math
import os
import sys


class InputError(Exception):
    pass


def check_messages(value, where):
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: expected a non-empty list of messages {{\"role\": ..., \"content\": ...}}, "
                         f"got {json.dumps(value)[:80]}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(f"{where}[{i}]: a message must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InputError(f"{where}[{i}]: field '{key}' must be a string")


def split_row(row, where):
    """(prompt, chosen, rejected) message lists of a row in either form."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise InputError(f"{where}: missing field '{key}'")
        check_messages(row[key], f"{where}: field '{key}'")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        check_messages(row["prompt"], f"{where}: field 'prompt'")
        return row["prompt"], chosen, rejected
    # Implicit prompt (TRL's extract_prompt): the messages both lists start with.
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise InputError(f"{where}: implicit prompt: 'chosen' and 'rejected' share no first message, so there is no "
                         "prompt (give a 'prompt' field)")
    if k == len(chosen) or k == len(rejected):
        raise InputError(f"{where}: implicit prompt: after their {k} shared messages, 'chosen' or 'rejected' has no "
                         "message left to be its completion")
    return chosen[:k], chosen[k:], rejected[k:]


def render(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def encode(tok, text):
    # What apply_chat_template(tokenize=True) does: the rendered text holds its special tokens already.
    return tok(text, add_special_tokens=False)["input_ids"]


def convert_row(tok, row, where):
    prompt, chosen, rejected = split_row(row, where)
    last = prompt[-1]["role"]
    if last in ("user", "tool"):
        prompt_kwargs = {"add_generation_prompt": True}
    elif last == "assistant":
        prompt_kwargs = {"add_generation_prompt": False, "continue_final_message": True}
    else:
        raise InputError(f"{where}: the prompt's last message has role '{last}'; expected user or tool (the "
                         "template adds the generation prompt) or assistant (the completion continues it), as TRL")
    try:
        prompt_ids = encode(tok, render(tok, prompt, **prompt_kwargs))
        out = {"prompt_ids": prompt_ids}
        for key, completion in (("chosen", chosen), ("rejected", rejected)):
            full = encode(tok, render(tok, prompt + completion))
            if full[:len(prompt_ids)] != prompt_ids:
                n = 0
                while n < min(len(full), len(prompt_ids)) and full[n] == prompt_ids[n]:
                    n += 1
                raise InputError(
                    f"{where}: the templated prompt + '{key}' does not start with the templated prompt's tokens "
                    f"(they differ from token {n}: prompt {tok.decode(prompt_ids[n:n + 8])!r} vs conversation "
                    f"{tok.decode(full[n:n + 8])!r}); the chat template renders the prompt differently alone, or a "
                    "token merges across the boundary")
            ids = full[len(prompt_ids):]
            if not ids:
                raise InputError(f"{where}: field '{key}': the templated completion has no tokens")
            out[f"{key}_ids"] = ids
    except InputError:
        raise
    except Exception as e:  # a template error (jinja2 raise_exception, a missing variable, ...)
        raise InputError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from e
    for key in ("score_chosen", "score_rejected"):
        if key in row:
            v = row[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"{where}: field '{key}' must be a finite number")
            out[key] = v
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Convert TRL conversational preference JSONL (lists of {role, content} messages) into dpo "
                    "token-id records with the model's chat template.",
        epilog="Example: prepare_data.py --tokenizer models/qwen2-0.5b-instruct --input prefs.jsonl "
               "--output prefs.ids.jsonl --max-length 1024")
    ap.add_argument("--tokenizer", required=True,
                    help="directory with tokenizer.json and the chat template (tokenizer_config.json or "
                         "chat_template.jinja): the model's directory, read with AutoTokenizer, local files only")
    ap.add_argument("--input", required=True, help="conversational preference JSONL")
    ap.add_argument("--output", required=True, help="token-id records JSONL to write")
    ap.add_argument("--max-length", type=int, default=0,
                    help="drop (and count) rows whose prompt alone has >= this many tokens, as `dpo train` with "
                         "this max_length does; 0: drop nothing")
    ap.add_argument("--chat-template", default=None,
                    help="a Jinja chat template file to use instead of the tokenizer's")
    args = ap.parse_args(argv)
    if args.max_length < 0:
        raise InputError(f"--max-length: must be >= 0, got {args.max_length}")

    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"prepare_data.py needs HF transformers (pip install transformers): {e}")
    if not os.path.isdir(args.tokenizer):
        raise InputError(f"--tokenizer {args.tokenizer}: not a directory (give the model's directory, with "
                         "tokenizer.json and its chat template)")
    try:
        tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    except Exception as e:
        raise InputError(f"--tokenizer {args.tokenizer}: cannot load a tokenizer: {type(e).__name__}: {e}") from e
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                tok.chat_template = f.read()
        except OSError as e:
            raise InputError(f"--chat-template {args.chat_template}: {e.strerror}") from e
    if not tok.chat_template:
        raise InputError(f"--tokenizer {args.tokenizer}: the tokenizer has no chat template (give --chat-template)")

    kept = dropped = long_rows = 0
    records = []
    try:
        f = open(args.input, encoding="utf-8")
    except OSError as e:
        raise InputError(f"--input {args.input}: {e.strerror}") from e
    with f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"{args.input}: not UTF-8: {e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{args.input}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e}") from e
        rec = convert_row(tok, row, where)
        if args.max_length and len(rec["prompt_ids"]) >= args.max_length:
            dropped += 1
            continue
        if args.max_length and len(rec["prompt_ids"]) + max(len(rec["chosen_ids"]),
                                                            len(rec["rejected_ids"])) > args.max_length:
            long_rows += 1
        records.append(rec)
        kept += 1
    if not records:
        raise InputError(f"{args.input}: no record to write")
    with open(args.output, "w", encoding="utf-8") as out:
        for rec in records:
            out.write(json.dumps(rec, separators=(",", ":")) + "\n")
    msg = f"wrote {args.output}: {kept} records"
    if args.max_length:
        msg += (f"; {dropped} dropped (prompt alone >= {args.max_length} tokens); {long_rows} longer than "
                f"{args.max_length} tokens, to be cut by the trainer")
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
