#!/usr/bin/env bash
# dpo sample on the CPU, full recompute (OLD binary) against the key/value cache (NEW binary), interleaved.
# Usage: run.sh OLD_DPO NEW_DPO OUT_DIR [REPS]
# Model: a random GPT-2-small-shaped checkpoint (12 layers, 12 heads, width 768, n_positions 1024) with the byte
# tokenizer's vocabulary (257), the tokenizer `dpo sample` uses. Workload like the demo's sampling: prompts from
# the demo's prompt set (12-19 bytes), temperature 1, up to 49 new tokens (kMaxCompletionBytes + 1), 8 sequences
# (2 prompts x 4 samples). Each repetition runs both binaries, in alternating order (ABBA), and records wall time;
# the completions of the two must be identical (same seed, same draws).
set -euo pipefail
old=$1 new=$2 out=$3 reps=${4:-3}
mkdir -p "$out"
model=$(mktemp -d)/gpt2-small-byte
"$new" init --out "$model" --n-layer 12 --n-head 12 --n-embd 768 --vocab-size 257 --n-positions 1024 --seed 1 >/dev/null
args=(sample "$model" -p "the film was" -p "the dialogue seemed" -n 4 --max-new-tokens 49 --seed 7)
export OMP_WAIT_POLICY=passive
csv="$out/times.csv"
echo "rep,binary,seconds,load1_before" >"$csv"
run() {  # NAME BINARY REP
  local t0 t1 load
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  "$2" "${args[@]}" >"$out/out-$1-$3.txt" 2>/dev/null
  t1=$(date +%s.%N)
  echo "$3,$1,$(echo "$t1 - $t0" | bc),$load" >>"$csv"
}
for r in $(seq 1 "$reps"); do
  if [ $((r % 2)) = 1 ]; then run old "$old" "$r"; run new "$new" "$r"; else run new "$new" "$r"; run old "$old" "$r"; fi
  cmp -s "$out/out-old-$r.txt" "$out/out-new-$r.txt" && echo "rep $r: same completions" || echo "rep $r: completions DIFFER"
done
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $old ${args[*]} (and the same with $new)"
  echo "model: dpo init --n-layer 12 --n-head 12 --n-embd 768 --vocab-size 257 --n-positions 1024 --seed 1"
  echo "env: OMP_WAIT_POLICY=passive, OpenMP default threads ($(nproc) cores)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "kernel: $(uname -r)"
} >"$out/machine.txt"
cat "$csv"
