#!/usr/bin/env bash
# What the profilers can do on this machine (docs/profiling.md), in under a minute:
#
#   tools/profile_probe.sh OUTFILE [CMD ARGS...]
#
# Writes "key: value" lines to OUTFILE (and prints them):
#   - the GPU (nvidia-smi -L), or "none" and every GPU check marked "not run (no GPU)";
#   - where nsys and ncu are (PATH, then /usr/local/cuda/bin, /opt/nvidia/nsight-systems/*/bin,
#     /opt/nvidia/nsight-compute/*, /usr/local/cuda/nsight-*), and their versions;
#   - whether ncu can read a hardware counter: ncu --metrics sm__cycles_elapsed.avg on the first kernel CMD runs
#     after cudaProfilerStart (--profile-from-start off: ncu_capture_range tells whether CMD's capture range
#     worked), or, when that profiled nothing, on CMD's first kernel (ncu_counters).
#     CMD defaults to a one-step tiny `dpo bench` from build-gpu/ (or build/).
# Never changes clocks (--clock-control none), never resets or reconfigures the GPU, needs no root. Every step has
# a timeout. Exit status 0 whenever OUTFILE was written, whatever it says.
set -uo pipefail

OUTFILE=${1:-}
[ -n "$OUTFILE" ] || { echo "usage: tools/profile_probe.sh OUTFILE [CMD ARGS...]" >&2; exit 2; }
shift
cd "$(dirname "$0")/.." || exit 2
: >"$OUTFILE" || { echo "profile_probe: cannot write $OUTFILE" >&2; exit 2; }
START=$(date +%s)

put() { printf '%s: %s\n' "$1" "$2" | tee -a "$OUTFILE"; }
# One line: the first N lines of a command's output, joined with " | ".
oneline() { head -n "${1:-3}" | tr -d '\r' | paste -sd '|' - | sed 's/|/ | /g'; }

put probe_date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
put host "$(uname -n) ($(uname -m))"

# --- GPU --------------------------------------------------------------------------------------------------------
gpu=none
if command -v nvidia-smi >/dev/null 2>&1; then
  list=$(timeout -k 2 10 nvidia-smi -L 2>&1)
  if printf '%s\n' "$list" | grep -q '^GPU [0-9]'; then
    gpu=$(printf '%s\n' "$list" | oneline 4)
    put driver "$(timeout -k 2 10 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | oneline 1)"
  else
    gpu="none (nvidia-smi -L: $(printf '%s\n' "$list" | oneline 1))"
  fi
else
  gpu="none (no nvidia-smi)"
fi
put gpu "$gpu"

# --- the tools --------------------------------------------------------------------------------------------------
# find_tool NAME: every distinct executable NAME on PATH and in the usual install places, one per line.
find_tool() {
  local name=$1 c
  {
    command -v "$name" 2>/dev/null
    for c in /usr/local/cuda/bin/"$name" /usr/local/cuda-*/bin/"$name" \
             /opt/nvidia/nsight-systems/*/bin/"$name" /opt/nvidia/nsight-systems/*/target-linux-x64/"$name" \
             /opt/nvidia/nsight-compute/*/"$name" /usr/local/cuda/nsight-systems-*/bin/"$name" \
             /usr/local/cuda/nsight-compute-*/"$name" /usr/lib/nsight-systems/bin/"$name" \
             /usr/lib/nsight-compute/"$name" /usr/bin/"$name"; do
      [ -x "$c" ] && readlink -f "$c"
    done
  } 2>/dev/null | awk 'NF && !seen[$0]++'
}

NCU=""
for tool in nsys ncu; do
  paths=$(find_tool "$tool")
  if [ -z "$paths" ]; then
    put "$tool" "not found (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-*, /usr/local/cuda/nsight-*)"
    continue
  fi
  if command -v "$tool" >/dev/null 2>&1; then where="on PATH"; else where="not on PATH"; fi
  put "$tool" "$(printf '%s\n' "$paths" | paste -sd ' ' -) ($where)"
  first=$(printf '%s\n' "$paths" | head -n 1)
  ver=$(timeout -k 2 15 "$first" --version 2>&1)
  v=$(printf '%s\n' "$ver" | grep -i 'version' | oneline 2)
  put "${tool}_version" "${v:-$(printf '%s\n' "$ver" | oneline 2)}"
  [ "$tool" = ncu ] && NCU=$first
done

# --- can ncu read a counter? ------------------------------------------------------------------------------------
if [ $# -gt 0 ]; then
  CMD=("$@")
else
  DPO=""
  for b in build-gpu/dpo build/dpo; do [ -x "$b" ] && { DPO=$b; break; }; done
  CMD=("${DPO:-build-gpu/dpo}" bench --device cuda --shape tiny --workload custom --prompt-len 16 --chosen-len 8
       --rejected-len 8 --pairs 1 --steps 1 --warmup 0)
fi
put counter_target "${CMD[*]}"
case "$gpu" in
  none*) put ncu_counters "not run (no GPU)" ;;
  *)
    if [ -z "$NCU" ]; then
      put ncu_counters "not run (ncu not found)"
    elif [ ! -x "${CMD[0]}" ] && ! command -v "${CMD[0]}" >/dev/null 2>&1; then
      put ncu_counters "not run (target ${CMD[0]} is not an executable)"
    else
      # run_ncu SECONDS [ncu options...]: ncu reading one counter on the first kernel profiled; output in $log.
      log=$(mktemp "${TMPDIR:-/tmp}/profile_probe.XXXXXX")
      run_ncu() {
        local t=$1
        shift
        timeout -k 5 "$t" "$NCU" --clock-control none --launch-count 1 --metrics sm__cycles_elapsed.avg --csv \
            "$@" "${CMD[@]}" >"$log" 2>&1
      }
      # classify EXIT SECONDS: one line for what ncu said.
      classify() {
        if grep -q 'ERR_NVGPUCTRPERM' "$log"; then
          echo "no permission (ERR_NVGPUCTRPERM: performance counters are restricted to admin users here)"
        elif grep -q '"sm__cycles_elapsed.avg"' "$log"; then
          line=$(grep '"sm__cycles_elapsed.avg"' "$log" | head -n 1)
          echo "ok ($(printf '%s\n' "$line" | awk -F'","' '{print $5 ": " $NF " cycles"}' | tr -d '"'))"
        elif grep -qi 'no kernels were profiled' "$log"; then
          echo "no kernel profiled"
        elif [ "$1" = 124 ] || [ "$1" = 137 ]; then
          echo "timed out after ${2}s"
        else
          echo "failed (exit $1)"
        fi
      }
      left=$((55 - ($(date +%s) - START)))
      [ "$left" -gt 40 ] && left=40
      if [ "$left" -lt 10 ]; then
        put ncu_counters "not run (out of time)"
      else
        # First inside the target's capture range only (what docs/profiling.md recommends)...
        run_ncu "$left" --profile-from-start off
        rc=$?
        res=$(classify "$rc" "$left")
        if [ "${res#ok}" != "$res" ]; then cap="ok (a kernel after cudaProfilerStart was profiled)"
        elif [ "$res" = "no kernel profiled" ]; then cap="no kernel between cudaProfilerStart and cudaProfilerStop"
        else cap="not known ($res)"; fi
        put ncu_capture_range "$cap"
        # ... and, when that profiled nothing, from the start, to still learn about the counters.
        if [ "$res" = "no kernel profiled" ]; then
          left=$((55 - ($(date +%s) - START)))
          if [ "$left" -ge 10 ]; then
            run_ncu "$left"
            rc=$?
            res=$(classify "$rc" "$left")
          fi
        fi
        put ncu_counters "$res"
        put ncu_output "$(grep -i '==PROF==\|==ERROR==\|==WARNING==\|error' "$log" | oneline 6)"
      fi
      rm -f "$log"
    fi
    ;;
esac
put probe_seconds "$(( $(date +%s) - START ))"
exit 0
