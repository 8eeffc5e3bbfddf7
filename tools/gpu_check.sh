#!/usr/bin/env bash
# One-command GPU validation (docs/gpu-validation.md). Runs on the device machine from the repository root,
# with .deps carried (tools/prepare_gpu_deps.sh, run on the dev machine first):
#
#   tools/gpu_check.sh OUTDIR [--quick] [--plan] [--gpus N] [--cpu-tests] [--no-bench] [--bench-compile]
#                             [--system-deps] [--with-mpi] [--budget SECONDS] [--scale N]
#
# The check is a list of phases in tiers; each phase has a time limit (cut to what the budget leaves) and an
# estimate (what it should take on an H100 host with 16 cores; unmeasured until the first GPU run):
#   tier t0, the verdict tier (--quick runs only this; budget 480 s):
#     env        machine facts (card, driver, nvcc, cmake, compiler, OS, deps)                 -> env.txt
#     configure  cmake -G Ninja, sm_90, into build-gpu/ (kept: a later call builds incrementally) -> build.log
#     build      ninja: dpo and the test_cuda_* targets on all cores
#     cuda-t0    ctest -L cuda-t0: every CUDA kernel and the model against the CPU twin, small shapes -> ctest.log
#     train      20 DPO steps, tiny GPT-2, device=cuda vs device=cpu (step-1 log-probs, final loss), the cuda
#                run again through a 1-rank NCCL communicator                                  -> train.log
#     memcheck   compute-sanitizer memcheck over the kernel tests (then 2 training steps if time) -> sanitizer.log
#     racecheck  racecheck over the shared-memory kernels: attention (materialised and flash), log-prob, LayerNorm,
#                reductions
#     initcheck  initcheck over the whole model's forward and backward (small shapes)
#   tier t1 (the full run, default; budget 585 s):
#     cuda-t1    ctest -L cuda-t1: GEMMs at GPT-2 124M shapes, tests past 2^31 elements
#     parity     ~50 DPO steps against a plain PyTorch implementation of the same step, fp32 and bf16,
#                from the same weights and batches (tools/torch_dpo_parity.py)                 -> train.log
#     resume     the train phase's cuda run resumed from its step-10 checkpoint: final weights and optimizer
#                state byte-identical to the uninterrupted run
#     profile    whether nsys/ncu exist and ncu may read counters (tools/profile_probe.sh)      -> in env.txt
#     bench      dpo bench on GPT-2 124M, HH lengths, bf16 and fp32 (bf16 also with attn_implementation flash),
#                the per-kernel table (--kernels, CUPTI), PyTorch eager bf16/fp32 (torch.compile
#                only with --bench-compile: a cold compile does not fit), causal SDPA alone pinned to
#                PyTorch's flash and cuDNN backends (bench_torch.py --attention-only), and our attention alone,
#                eager and flash (dpo bench --attention-only)                                 -> bench.log
#   tier t2 (full run, two or more GPUs only; takes the bench's time): data-parallel training with NCCL across the
#     GPUs (mpirun -np N when a launcher exists) against the 1-GPU run; on one GPU it reports itself as not run.
# --plan prints the phases, tiers, limits and estimates for the chosen mode and checks that the limits add up to
# less than the budget (exit 1 if not), without running anything; --gpus N plans for N GPUs (default: detected).
# Then writes OUTDIR/summary.md (tools/gpu_check_summary.py) and prints it LAST. OUTDIR stays flat with at most
# 8 files (the device tool returns no more); logs over 4 MiB are cut in the middle.
# Exit status: 0 only when everything run passed on a GPU; non-zero otherwise (the summary is always written).
# --system-deps   ignore .deps and use the system's packages (a machine with tools/install_deps.sh done)
# --with-mpi      let CMake look for MPI (off by default: the device image has no MPI)
# --scale N       multiply every phase limit and the default budget by N (a dry run on a 2-core machine: 4)
# Environment: DPO_GPU_BUILD  build folder (default build-gpu)
set -uo pipefail

START=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

OUT=""
cpu_tests=0 system_deps=0 with_mpi=0 budget="" scale=1 bench=1 quick=0 plan_only=0 gpus="" bench_compile=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --plan) plan_only=1 ;;
    --gpus) shift; gpus=${1:-} ;;
    --cpu-tests) cpu_tests=1 ;;
    --system-deps) system_deps=1 ;;
    --with-mpi) with_mpi=1 ;;
    --budget) shift; budget=${1:-} ;;
    --no-bench) bench=0 ;;
    --bench-compile) bench_compile=1 ;;
    --scale) shift; scale=${1:-1} ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option '$1'" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: one OUTDIR only" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
case "$scale" in ''|*[!0-9]*|0) echo "gpu_check: --scale takes a whole number >= 1" >&2; exit 2 ;; esac
case "${budget:-1}" in *[!0-9]*) echo "gpu_check: --budget takes whole seconds" >&2; exit 2 ;; esac
case "${gpus:-1}" in *[!0-9]*) echo "gpu_check: --gpus takes a whole number" >&2; exit 2 ;; esac
if [ "$plan_only" = 0 ] && [ -z "$OUT" ]; then
  echo "usage: tools/gpu_check.sh OUTDIR [--quick] [--plan] [options]   (--help)" >&2; exit 2
fi

# --- the plan: phase tier quick-limit full-limit estimate (seconds, before --scale) --------------------------------
# A limit of 0 means the phase does not run in that mode. RESERVE is kept for the summary. The limits of a mode add
# up to less than its budget (--plan checks it), so a phase that uses its whole limit never starves a later one.
PLAN="
env        t0  20  20   5
configure  t0  45  45  20
build      t0 180 180  90
cuda-t0    t0  60  50  30
train      t0  45  40  20
memcheck   t0  60  45  40
racecheck  t0  25  20  15
initcheck  t0  20  15  10
cuda-t1    t1   0  40  25
parity     t1   0  35  20
resume     t1   0  20  10
profile    t1   0  15   8
bench      t1   0  40  30
multi-gpu  t2   0  40  30
"
QUICK_BUDGET=480 FULL_BUDGET=585 QUICK_RESERVE=15 FULL_RESERVE=10
if [ -z "$gpus" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null; then
    gpus=$(timeout 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
fi
if [ "$quick" = 1 ]; then RESERVE=$((QUICK_RESERVE * scale)); else RESERVE=$((FULL_RESERVE * scale)); fi
if [ -z "$budget" ]; then
  if [ "$quick" = 1 ]; then budget=$((QUICK_BUDGET * scale)); else budget=$((FULL_BUDGET * scale)); fi
fi
# limit_of PHASE: this mode's limit in seconds (scaled); 0 = not run. With two or more GPUs the multi-GPU tier
# takes the bench's time; with fewer it does not run. --no-bench frees the bench's.
limit_of() {
  local name=$1 row l
  row=$(awk -v n="$name" '$1 == n' <<<"$PLAN")
  [ -n "$row" ] || { echo 0; return; }
  if [ "$quick" = 1 ]; then l=$(awk '{print $3}' <<<"$row"); else l=$(awk '{print $4}' <<<"$row"); fi
  case "$name" in
    multi-gpu) [ "${gpus:-0}" -ge 2 ] || l=0 ;;
    bench) { [ "$bench" = 1 ] && [ "${gpus:-0}" -lt 2 ]; } || l=0 ;;
  esac
  echo $((l * scale))
}
print_plan() {
  local name tier q f e l sum=0 n_run=0
  printf 'gpu_check plan: %s run, %s GPU(s), scale %s, budget %ss, reserve %ss for the summary\n' \
    "$([ "$quick" = 1 ] && echo quick || echo full)" "$gpus" "$scale" "$budget" "$RESERVE"
  printf '  %-10s %-4s %8s %10s\n' phase tier "limit s" "estimate s"
  while read -r name tier q f e; do
    [ -n "$name" ] || continue
    l=$(limit_of "$name")
    if [ "$l" = 0 ]; then
      printf '  %-10s %-4s %8s %10s\n' "$name" "$tier" "-" "not run"
    else
      printf '  %-10s %-4s %8s %10s\n' "$name" "$tier" "$l" "$((e * scale))"
      sum=$((sum + l)); n_run=$((n_run + 1))
    fi
  done <<<"$PLAN"
  printf '  sum of limits %ss + reserve %ss = %ss; budget %ss: %s\n' "$sum" "$RESERVE" "$((sum + RESERVE))" "$budget" \
    "$([ $((sum + RESERVE)) -le "$budget" ] && echo "fits" || echo "DOES NOT FIT")"
  [ $((sum + RESERVE)) -le "$budget" ]
}
if [ "$plan_only" = 1 ]; then
  print_plan
  exit $?
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
BUILD=$REPO/${DPO_GPU_BUILD:-build-gpu}
WORK=$BUILD/gpu-check          # intermediate files; OUTDIR gets only the final ≤ 8 files
DEADLINE=$((START + budget))
JOBS=$(nproc 2>/dev/null || echo 4)

mkdir -p "$WORK"
rm -rf "$WORK"/*.tsv "$WORK"/*.xml "$WORK"/*.txt "$WORK"/*.json "$WORK"/verdict
for f in env.txt build.log ctest.log junit.xml sanitizer.log train.log bench.log summary.md; do
  rm -f "$OUT/$f"
done
PHASES=$WORK/phases.tsv FACTS=$WORK/facts.tsv
: >"$PHASES"; : >"$FACTS"

log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }
# phase_done NAME STATUS SECONDS NOTE   (STATUS: ok | FAIL | timeout | skipped | unavailable | not run)
phase_done() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$PHASES"; log "phase $1: $2 (${3}s) ${4:-}"; }
# allow PHASE: seconds the phase may use: its planned limit, cut to what the overall budget leaves.
allow() {
  local want left
  want=$(limit_of "$1")
  left=$((DEADLINE - RESERVE - $(date +%s)))
  if [ "$want" -lt "$left" ]; then echo "$want"; else echo $((left > 0 ? left : 0)); fi
}
# secs N: N seconds scaled (sub-limits inside a phase)
secs() { echo $(($1 * scale)); }
# tmo SECONDS CMD...: timeout that also kills the command's children; 124 on timeout.
tmo() { timeout -k 5 "$1" "${@:2}"; }
status_of() { case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo "FAIL" ;; esac; }
print_plan | tee "$WORK/plan.txt"
fact mode "$([ "$quick" = 1 ] && echo 'quick (tier t0)' || echo 'full (tiers t0, t1; t2 with 2+ GPUs)')"

# --- environment ---------------------------------------------------------------------------------------------------
t0=$(date +%s)
deps_mode=system
if [ "$system_deps" = 0 ] && [ -f "$REPO/.deps/env.sh" ]; then
  export DPO_DEPS_LIBDIR=$BUILD/deps-lib
  # shellcheck source=/dev/null
  if source "$REPO/.deps/env.sh"; then
    deps_mode=".deps"
  else
    deps_mode="system (.deps/env.sh failed)"
  fi
elif [ "$system_deps" = 0 ]; then
  deps_mode="system (no .deps carried; run tools/prepare_gpu_deps.sh and carry .deps)"
fi
# nvcc: PATH, else the usual toolkit folder.
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13*/bin /opt/cuda/bin; do
    [ -x "$d/nvcc" ] && { export PATH="$PATH:$d"; break; }
  done
fi
NVCC=$(command -v nvcc || true)
CUDA_ROOT=""
[ -n "$NVCC" ] && CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ]; then
  for c in "$CUDA_ROOT/bin/compute-sanitizer" "$CUDA_ROOT/compute-sanitizer/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && { SANITIZER=$c; break; }
  done
fi

have_gpu=0
gpu_line="none"
if command -v nvidia-smi >/dev/null; then
  if q=$(tmo 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1) \
     && [ -n "$q" ]; then
    have_gpu=1
    gpu_line=$(echo "$q" | head -n1)
  else
    gpu_line="none (nvidia-smi: $(echo "$q" | head -n1))"
  fi
else
  gpu_line="none (nvidia-smi not found)"
fi

# cuDNN / NCCL: the toolkit folder or the system first (CMake finds those itself); else PyTorch's pip wheels
# (site-packages/nvidia/{cudnn,nccl}), passed to CMake as the folder of the header and the library file
# (DPO_<NAME>_INCLUDE_DIR, DPO_<NAME>_LIB: cmake/DpoCudaExtras.cmake checks both and fails on half a pair).
extra_cmake=()
find_cuda_extra() {  # NAME HEADER LIBNAME CMAKE-PREFIX
  local name=$1 hdr=$2 lib=$3 var=$4 d
  for d in "$CUDA_ROOT/include" "$CUDA_ROOT/targets/x86_64-linux/include" /usr/include /usr/include/x86_64-linux-gnu; do
    if [ -n "$d" ] && [ -f "$d/$hdr" ]; then fact "$name" "$d/$hdr"; return 0; fi
  done
  command -v python3 >/dev/null || { fact "$name" "not found (no python3 to search pip wheels)"; return 0; }
  local found
  found=$(python3 - "$hdr" "$lib" 2>/dev/null <<'PY'
import glob, os, sys
hdr, lib = sys.argv[1], sys.argv[2]
for p in sys.path:
    for h in sorted(glob.glob(os.path.join(p, "nvidia", "**", "include", hdr), recursive=True)):
        libdir = os.path.join(os.path.dirname(os.path.dirname(h)), "lib")
        libs = sorted(glob.glob(os.path.join(libdir, lib + ".so*")))
        if libs:
            print(os.path.dirname(h)); print(libs[0]); sys.exit(0)
PY
)
  if [ -n "$found" ]; then
    local inc libf
    inc=$(echo "$found" | sed -n 1p); libf=$(echo "$found" | sed -n 2p)
    extra_cmake+=("-D${var}_INCLUDE_DIR=$inc" "-D${var}_LIB=$libf")
    LD_LIBRARY_PATH="$(dirname "$libf")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    fact "$name" "$inc (pip wheel), library $libf"
  else
    fact "$name" "not found (toolkit, /usr/include, pip wheels)"
  fi
}
if [ -n "$CUDA_ROOT" ]; then
  find_cuda_extra cudnn cudnn.h libcudnn DPO_CUDNN
  find_cuda_extra nccl nccl.h libnccl DPO_NCCL
fi

# Commit: git when the copy has .git, else the COMMIT written by tools/prepare_gpu_deps.sh.
if command -v git >/dev/null && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  n=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l)
  commit="$(git -C "$REPO" rev-parse HEAD)$([ "$n" -gt 0 ] && echo " + $n uncommitted paths")"
elif [ -f "$REPO/.deps/COMMIT" ]; then
  commit="$(head -n1 "$REPO/.deps/COMMIT") [from .deps/COMMIT]"
elif [ -f "$REPO/COMMIT" ]; then
  commit="$(head -n1 "$REPO/COMMIT") [from COMMIT]"
else
  commit="unknown (no .git, no .deps/COMMIT)"
fi

first_line() { "$@" 2>&1 | grep -v '^\s*$' | head -n1; }
fact date "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
fact host "$(hostname 2>/dev/null || echo '?'), $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo 2>/dev/null)"
# shellcheck disable=SC1091
fact os "$( (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || uname -s), kernel $(uname -r), glibc $(ldd --version 2>/dev/null | head -n1 | awk '{print $NF}')"
fact card "$gpu_line"
fact have_gpu "$have_gpu"
fact commit "$commit"
fact nvcc "$([ -n "$NVCC" ] && (nvcc --version | grep -i release | sed 's/.*release/release/') || echo 'not found')"
fact cmake "$(first_line cmake --version)"
fact ninja "$(first_line ninja --version)"
fact cxx "$(first_line "${CXX:-c++}" --version)"
fact python3 "$(first_line python3 --version)"
fact compute_sanitizer "${SANITIZER:-not found}"
fact deps "$deps_mode"
fact budget "${budget}s; cpu tests $([ "$cpu_tests" = 1 ] && echo on || echo off)"

{
  echo "# gpu_check environment ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo; echo "## facts"; cat "$FACTS"
  echo; echo "## nvidia-smi -L"; tmo 20 nvidia-smi -L 2>&1 || true
  echo; echo "## nvidia-smi"; tmo 20 nvidia-smi 2>&1 || true
  echo; echo "## nvcc --version"; nvcc --version 2>&1 || true
  echo; echo "## cmake --version"; cmake --version 2>&1 || true
  echo; echo "## compiler"; "${CXX:-c++}" --version 2>&1 | head -n2 || true
  echo; echo "## compute-sanitizer --version"; [ -n "$SANITIZER" ] && tmo 20 "$SANITIZER" --version 2>&1 || echo "not found"
  echo; echo "## deps: $deps_mode"
  if [ "$deps_mode" = .deps ]; then
    echo "carried libraries the host lacks (on LD_LIBRARY_PATH via $DPO_DEPS_LIBDIR): ${DPO_DEPS_SHADOWED:-none}"
    echo "MANIFEST:"; cat "$REPO/.deps/MANIFEST" 2>/dev/null
  fi
  echo; echo "## environment"
  echo "PATH=$PATH"; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; echo "CMAKE_PREFIX_PATH=${CMAKE_PREFIX_PATH:-}"
  echo "PKG_CONFIG_LIBDIR=${PKG_CONFIG_LIBDIR:-}"; echo "extra CMake arguments:${extra_cmake[*]:- none}"
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}"
} >"$OUT/env.txt" 2>&1
phase_done env ok $(( $(date +%s) - t0 )) "$gpu_line"

# --- configure -----------------------------------------------------------------------------------------------------
configured=0 built=0
t0=$(date +%s)
mode_key="$deps_mode|mpi=$with_mpi|${extra_cmake[*]}|$REPO"
if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/gpu-check-mode" 2>/dev/null)" != "$mode_key" ]; then
  log "build-gpu was configured differently; starting it afresh"
  find "$BUILD" -mindepth 1 -maxdepth 1 ! -name gpu-check ! -name deps-lib -exec rm -rf {} +
fi
cmake_args=(-S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDPO_ENABLE_CUDA=ON
            -DDPO_CUDA_ARCHITECTURES=90 -DDPO_BUILD_TESTS=ON)
[ "$with_mpi" = 1 ] || cmake_args+=(-DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)
[ "$deps_mode" = .deps ] && cmake_args+=("${DPO_DEPS_CMAKE_ARGS[@]}")
cmake_args+=("${extra_cmake[@]}")
lim=$(allow configure)
{ echo "== configure (limit ${lim}s): cmake ${cmake_args[*]}"; } >"$OUT/build.log"
if [ "$lim" -lt 10 ]; then
  phase_done configure skipped 0 "out of time"
else
  tmo "$lim" cmake "${cmake_args[@]}" >>"$OUT/build.log" 2>&1
  rc=$?
  note=""
  if [ $rc = 0 ]; then
    configured=1
    echo "$mode_key" >"$BUILD/gpu-check-mode"
    if grep -q 'dpo: CUDA enabled' "$OUT/build.log"; then note="CUDA enabled, sm_90"
    else note="CUDA NOT enabled: $(grep -m1 'dpo: nvcc not found' "$OUT/build.log" || echo 'see build.log')"; fi
    for k in CMAKE_CUDA_COMPILER CMAKE_CXX_COMPILER DPO_OPENBLAS_LIB DPO_CUDNN_LIB DPO_CUDNN_INCLUDE_DIR DPO_NCCL_LIB \
             DPO_NCCL_INCLUDE_DIR yaml-cpp_DIR GTest_DIR \
             OPENSSL_CRYPTO_LIBRARY pkgcfg_lib_CAIRO_cairo; do
      grep -E "^$k(:[A-Z]+)?=" "$BUILD/CMakeCache.txt" | head -n1
    done >"$WORK/cache.txt"
    { echo; echo "## CMake cache (selected)"; cat "$WORK/cache.txt"; } >>"$OUT/env.txt"
  else
    note="$(grep -m1 -E 'CMake Error|Could NOT find|not found' "$OUT/build.log" | cut -c1-160)"
  fi
  phase_done configure "$(status_of $rc)" $(( $(date +%s) - t0 )) "$note"
fi
if grep -q 'dpo: CUDA enabled' "$OUT/build.log"; then fact cuda_enabled 1; else fact cuda_enabled 0; fi

# --- build ---------------------------------------------------------------------------------------------------------
t0=$(date +%s)
targets=()
if [ "$cpu_tests" = 0 ]; then
  targets=(dpo)
  for src in "$REPO"/tests/test_cuda_*.cpp; do
    [ -f "$src" ] && grep -q 'dpo: CUDA enabled' "$OUT/build.log" && targets+=("$(basename "$src" .cpp)")
  done
fi
lim=$(allow build)
if [ "$configured" = 0 ]; then
  phase_done build skipped 0 "not configured"
elif [ "$lim" -lt 10 ]; then
  phase_done build skipped 0 "out of time"
else
  echo "== build (limit ${lim}s, -j$JOBS): ${targets[*]:-all targets}" >>"$OUT/build.log"
  if [ ${#targets[@]} -gt 0 ]; then
    tmo "$lim" cmake --build "$BUILD" -j"$JOBS" --target "${targets[@]}" >>"$OUT/build.log" 2>&1
  else
    tmo "$lim" cmake --build "$BUILD" -j"$JOBS" >>"$OUT/build.log" 2>&1
  fi
  rc=$?
  [ $rc = 0 ] && built=1
  note=""
  [ $rc != 0 ] && note="$(grep -m1 -E 'FAILED:|error:|Error:|undefined reference' "$OUT/build.log" | cut -c1-200)"
  [ $rc = 0 ] && note="$(grep -c -i 'warning' "$OUT/build.log") warning lines; targets: ${targets[*]:-all}"
  phase_done build "$(status_of $rc)" $(( $(date +%s) - t0 )) "$note"
fi

# --- ctest helper --------------------------------------------------------------------------------------------------
run_ctest() {  # LABEL LIMIT JOBS -> junit-LABEL.xml
  local label=$1 lim=$2 jobs=$3 stop rc
  stop=$(date -d "@$(( $(date +%s) + lim - 5 ))" +%H:%M:%S)
  echo "== ctest -L $label (limit ${lim}s, -j$jobs, stop-time $stop)" >>"$OUT/ctest.log"
  tmo $((lim + 10)) ctest --test-dir "$BUILD" -L "^${label}\$" --output-on-failure -j"$jobs" --no-label-summary \
      --stop-time "$stop" --output-junit "$WORK/junit-$label.xml" >>"$OUT/ctest.log" 2>&1
  rc=$?
  echo "== ctest -L $label exit $rc" >>"$OUT/ctest.log"
  return $rc
}

# --- cuda tests, tier t0 -------------------------------------------------------------------------------------------
: >"$OUT/ctest.log"
cuda_tier() {  # TIER PHASE JOBS   (t1 runs fewer at once: its tests past 2^31 elements take GiBs of device memory
              # each and skip, which fails the tier, when the card lacks it)
  local tier=$1 phase=$2 jobs=$3 lim rc t0
  t0=$(date +%s)
  lim=$(allow "$phase")
  if [ "$(limit_of "$phase")" = 0 ]; then
    return 0
  elif [ "$built" = 0 ]; then
    phase_done "$phase" skipped 0 "not built"
  elif [ "$lim" -lt 10 ]; then
    phase_done "$phase" skipped 0 "out of time"
  else
    run_ctest "cuda-$tier" "$lim" "$jobs"
    rc=$?
    phase_done "$phase" "$(status_of $rc)" $(( $(date +%s) - t0 )) "ctest -L cuda-$tier; see CUDA tests below"
  fi
}
cuda_tier t0 cuda-t0 8

# --- training: cuda vs cpu ------------------------------------------------------------------------------------------
TRAIN=$WORK/train
: >"$OUT/train.log"
: >"$WORK/train.tsv"
json_num() { grep -o "\"$2\":[^,}]*" "$1" | sed -n "${3:-1}p" | cut -d: -f2; }  # FILE KEY [LINE|$]
# The same 20-step run for every device; the cuda run also saves at step 10 for the resume phase.
train_args() {  # OUT_DIR DEVICE REFCACHE
  echo model="$TRAIN/base" train_file="$TRAIN/prefs.jsonl" out_dir="$1" device="$2" max_steps=20 \
    per_device_train_batch_size=4 learning_rate=2e-4 logging_steps=1 max_length=96 max_prompt_length=48 seed=1 \
    save_steps=10 ref_cache_dir="$3"
}
train_one() {  # LABEL LIMIT   (LABEL: cpu, cuda, or cuda-nccl = cuda with DPO_FORCE_NCCL=1)
  local label=$1 lim=$2 dev=${1%%-*} t rc run note="" force=0
  [ "$label" = cuda-nccl ] && force=1
  run=$TRAIN/run-$label
  rm -rf "$run" "$TRAIN/refcache-$label"
  echo "== dpo train device=$dev DPO_FORCE_NCCL=$force (limit ${lim}s)" >>"$OUT/train.log"
  t=$(date +%s)
  # shellcheck disable=SC2046
  DPO_FORCE_NCCL=$force tmo "$lim" "$BUILD/dpo" train $(train_args "$run" "$dev" "$TRAIN/refcache-$label") \
      --plain >>"$OUT/train.log" 2>&1
  rc=$?
  t=$(( $(date +%s) - t ))
  echo "== dpo train $label exit $rc (${t}s)" >>"$OUT/train.log"
  local m=$run/metrics.jsonl steps="" lp1="" loss1="" lossN=""
  if [ -f "$m" ]; then
    steps=$(wc -l <"$m")
    lp1=$(json_num "$m" 'logps/chosen' 1); loss1=$(json_num "$m" loss 1); lossN=$(json_num "$m" loss '$')
  fi
  if [ $rc != 0 ]; then
    note=$(grep -E 'error|Error|what\(\)' "$OUT/train.log" | tail -n1 | cut -c1-200)
    [ $rc = 124 ] && note="timed out after ${lim}s"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$rc" "$t" "${steps:-0}" "${lp1:-}" "${loss1:-}" "${lossN:-}" "$note" \
    >>"$WORK/train.tsv"
  return $rc
}
t0=$(date +%s)
lim=$(allow train)
cuda_train_ok=0
if [ "$built" = 0 ] || [ ! -x "$BUILD/dpo" ]; then
  phase_done train skipped 0 "dpo not built"
elif [ "$lim" -lt 15 ]; then
  phase_done train skipped 0 "out of time"
else
  rm -rf "$TRAIN"; mkdir -p "$TRAIN"
  # 48 preference pairs of a toy sentiment language (deterministic).
  pos=(good great fine lovely superb charming) neg=(bad awful poor dull boring clumsy) noun=(film movie plot cast story)
  for i in $(seq 0 47); do
    a=${pos[$((i % 6))]} b=${pos[$(((i * 5 + 1) % 6))]} c=${neg[$(((i * 7) % 6))]} d=${neg[$(((i + 3) % 6))]}
    n=${noun[$((i % 5))]}
    printf '{"prompt": "review %d: the %s was", "chosen": " %s and %s, really %s.", "rejected": " %s and %s, really %s."}\n' \
      "$i" "$n" "$a" "$b" "$a" "$c" "$d" "$c"
  done >"$TRAIN/prefs.jsonl"
  train_end=$(( $(date +%s) + lim ))
  if ! tmo 30 "$BUILD/dpo" init --out "$TRAIN/base" --n-layer 2 --n-head 2 --n-embd 64 --vocab-size 257 \
      --n-positions 128 --seed 1 >>"$OUT/train.log" 2>&1; then
    phase_done train FAIL $(( $(date +%s) - t0 )) "dpo init failed (train.log)"
  else
    train_one cuda $(( lim * 2 / 5 )) && cuda_train_ok=1
    left=$(( train_end - $(date +%s) ))
    train_one cpu $(( left * 2 / 3 ))
    left=$(( train_end - $(date +%s) ))
    [ $cuda_train_ok = 1 ] && [ "$left" -ge 5 ] && train_one cuda-nccl "$left"
    phase_done train "$([ $cuda_train_ok = 1 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "see Training below"
  fi
fi

# --- compute-sanitizer: memcheck, racecheck, initcheck --------------------------------------------------------------
# Each tool is its own phase with its own limit; every run is a line of sanitizer.tsv (phase, run, result, errors,
# seconds, gtest passed, failed, skipped). Tests that touch more than 2^31 elements are left out (minutes under a
# sanitizer; they run in cuda-t1).
: >"$WORK/sanitizer.tsv"
: >"$OUT/sanitizer.log"
# The t1 tests (tests/CMakeLists.txt DPO_CUDA_T1_PATTERNS): past 2^31 elements, GPT-2 124M LM head and model.
BIG="*Past32Bit*:*Beyond2Pow*:*Huge*:*lm_head*:*CudaPaddedGpt2*"
sanitize_one() {  # PHASE TOOL NAME LIMIT CMD...
  local phase=$1 tool=$2 name=$3 l=$4 t rc errs res extra=()
  shift 4
  [ "$tool" = racecheck ] && extra=(--racecheck-report all)
  echo "== [$phase] $name (limit ${l}s): $*" >>"$OUT/sanitizer.log"
  t=$(date +%s)
  tmo "$l" "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 86 --print-limit 30 "$@" >"$WORK/san-one.log" 2>&1
  rc=$?
  t=$(( $(date +%s) - t ))
  cat "$WORK/san-one.log" >>"$OUT/sanitizer.log"
  errs=$(grep -o 'ERROR SUMMARY: [0-9]*' "$WORK/san-one.log" | tail -n1 | awk '{print $3}')
  if [ -z "$errs" ] && [ "$tool" = racecheck ]; then
    errs=$(grep -o 'RACECHECK SUMMARY: [0-9]* hazard' "$WORK/san-one.log" | tail -n1 | awk '{print $3}')
  fi
  local passed failed skipped
  passed=$(grep -o '\[  PASSED  \] [0-9]*' "$WORK/san-one.log" | tail -n1 | awk '{print $4}')
  failed=$(grep -o '^\[  FAILED  \] [A-Za-z][^ ]*' "$WORK/san-one.log" | sort -u | wc -l)
  skipped=$(grep -o '\[  SKIPPED \] [0-9]* test' "$WORK/san-one.log" | tail -n1 | awk '{print $4}')
  if [ $rc = 124 ] || [ $rc = 137 ]; then res=timeout
  elif [ -z "$errs" ]; then res="no report (exit $rc)"
  elif [ "$errs" != 0 ]; then res=ERRORS
  elif [ $rc != 0 ]; then res="FAIL (exit $rc)"
  elif [ "${skipped:-0}" != 0 ] && [ "${passed:-0}" = 0 ]; then res=skipped
  else res=clean; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$name" "$res" "${errs:-?}" "$t" "${passed:-}" "${failed:-}" \
    "${skipped:-}" >>"$WORK/sanitizer.tsv"
}
# sanitizer_phase PHASE TOOL  RUN...   each RUN is "NAME|BINARY|GTEST_FILTER" (binary relative to build-gpu/; an
# empty filter runs a dpo command line given in the binary field instead)
sanitizer_phase() {
  local phase=$1 tool=$2 lim t0 end run name bin filter l n_err bad st
  shift 2
  [ "$(limit_of "$phase")" = 0 ] && return 0
  t0=$(date +%s)
  lim=$(allow "$phase")
  if [ "$built" = 0 ]; then phase_done "$phase" skipped 0 "not built"; return 0; fi
  if [ "$have_gpu" = 0 ]; then phase_done "$phase" unavailable 0 "not run: no CUDA device"; return 0; fi
  if [ -z "$SANITIZER" ]; then phase_done "$phase" unavailable 0 "not run: compute-sanitizer not found"; return 0; fi
  if [ "$lim" -lt 10 ]; then phase_done "$phase" skipped 0 "out of time"; return 0; fi
  end=$(( t0 + lim ))
  for run in "$@"; do
    IFS='|' read -r name bin filter <<<"$run"
    l=$(( end - $(date +%s) ))
    if [ "$l" -lt 5 ]; then
      printf '%s\t%s\tnot run (time)\t?\t0\t\t\t\n' "$phase" "$name" >>"$WORK/sanitizer.tsv"; continue
    fi
    if [ -n "$filter" ]; then
      if [ ! -x "$BUILD/$bin" ]; then
        printf '%s\t%s\tnot run (no %s)\t?\t0\t\t\t\n' "$phase" "$name" "$bin" >>"$WORK/sanitizer.tsv"; continue
      fi
      sanitize_one "$phase" "$tool" "$name" "$l" "$BUILD/$bin" --gtest_filter="$filter" --gtest_brief=1
    else
      # shellcheck disable=SC2086
      sanitize_one "$phase" "$tool" "$name" "$l" $bin
    fi
  done
  n_err=$(awk -F'\t' -v p="$phase" '$1 == p && $4 ~ /^[0-9]+$/ {s += $4} END {print s + 0}' "$WORK/sanitizer.tsv")
  bad=$(awk -F'\t' -v p="$phase" '$1 == p && $3 != "clean" {n++} END {print n + 0}' "$WORK/sanitizer.tsv")
  runs=$(awk -F'\t' -v p="$phase" '$1 == p {n++} END {print n + 0}' "$WORK/sanitizer.tsv")
  st=ok
  if [ "$n_err" != 0 ] || [ "$bad" != 0 ] || [ "$runs" = 0 ]; then st=FAIL; fi
  phase_done "$phase" "$st" $(( $(date +%s) - t0 )) "$n_err errors; $bad of $runs runs not clean"
}
mc_runs=()
for b in test_cuda_kernels_a test_cuda_kernels_b test_cuda_bf16 test_cuda_backend test_cuda_shapes test_cuda_runtime \
    test_cuda_pair_loss test_cuda_optim_step test_cuda_graphs test_cuda_attention_spans test_cuda_layout_kernels \
    test_cuda_layouts test_cuda_gather test_cuda_checkpointing; do
  mc_runs+=("$b|tests/$b|-$BIG")
done
mc_runs+=("fusion|tests/test_cuda_fusion|CudaFusion.*:-*Gpt2Step*")
mc_runs+=("flash attention|tests/test_cuda_flash|CudaFlash.*:-*T4096*:*LongRows*")
mc_runs+=("flash in the backend|tests/test_cuda_flash_model|CudaFlashModel.KeymaskSpans*:CudaFlashModel.BackendFlashOps*")
mc_runs+=("Llama-family kernels|tests/test_cuda_llama_kernels|CudaLlama.*")
if [ "$cuda_train_ok" = 1 ]; then
  rm -rf "$TRAIN/run-san" "$TRAIN/refcache-san"
  mc_runs+=("dpo train device=cuda (2 steps)|$BUILD/dpo train model=$TRAIN/base train_file=$TRAIN/prefs.jsonl out_dir=$TRAIN/run-san device=cuda max_steps=2 per_device_train_batch_size=4 learning_rate=2e-4 max_length=96 max_prompt_length=48 ref_cache_dir=$TRAIN/refcache-san --plain|")
fi
sanitizer_phase memcheck memcheck "${mc_runs[@]}"
# racecheck: the kernels that share memory between threads of a block (block reductions, tiles).
sanitizer_phase racecheck racecheck \
  "attention, log-prob (fp32)|tests/test_cuda_kernels_b|CudaAttention.*:CudaLogprob.*-$BIG" \
  "LayerNorm, encoder backward, sum of squares (fp32)|tests/test_cuda_kernels_a|CudaLayerNorm.*:CudaEncoder.Backward*:CudaElementwise.SumSquares*-$BIG" \
  "attention, log-prob, LayerNorm (bf16)|tests/test_cuda_bf16|CudaBf16Ops.Attention*:CudaBf16Ops.Logprob*:CudaBf16Ops.LayerNorm*" \
  "flash attention forward (bf16)|tests/test_cuda_flash|CudaFlash.ForwardHeadDim*" \
  "flash attention backward (bf16)|tests/test_cuda_flash|CudaFlash.BackwardHeadDim64*" \
  "RMSNorm (fp32, bf16)|tests/test_cuda_llama_kernels|CudaLlama.RmsNorm*"
# initcheck: a device read of memory nothing wrote, over the whole model (small shapes).
sanitizer_phase initcheck initcheck \
  "GPT-2 forward + backward vs CPU (fp32)|tests/test_cuda_backend|CudaBackend.Gpt2LogprobsAndGradientsMatchCpu" \
  "dpo bench, tiny shape, 1 step|$BUILD/dpo bench --device cuda --shape tiny --steps 1 --warmup 0|"

# --- tier t1 --------------------------------------------------------------------------------------------------------
cuda_tier t1 cuda-t1 3

# parity: ~50 DPO steps against a plain PyTorch implementation of the same step (tools/torch_dpo_parity.py).
if [ "$(limit_of parity)" != 0 ]; then
  t0=$(date +%s)
  lim=$(allow parity)
  PLOG=$OUT/train.log   # OUTDIR holds at most 8 files: the parity runs go into train.log
  echo "== parity phase" >>"$PLOG"
  if [ "$built" = 0 ] || [ ! -x "$BUILD/dpo" ]; then
    phase_done parity skipped 0 "dpo not built"
  elif [ "$lim" -lt 15 ]; then
    phase_done parity skipped 0 "out of time"
  elif [ ! -f "$REPO/tools/torch_dpo_parity.py" ]; then
    phase_done parity "not run" 0 "tools/torch_dpo_parity.py is missing"
  elif ! python3 -c 'import torch' >/dev/null 2>&1; then
    phase_done parity unavailable 0 "not run: python3 cannot import torch"
  else
    dev=cuda; [ "$have_gpu" = 1 ] || dev=cpu
    prc=0
    for prec in fp32 bf16; do
      l=$(( t0 + lim - $(date +%s) ))
      [ "$l" -ge 5 ] || { echo "== $prec: not run (time)" >>"$PLOG"; prc=124; continue; }
      echo "== tools/torch_dpo_parity.py --precision $prec --our-device $dev --device $dev (limit ${l}s)" >>"$PLOG"
      PYTHONUNBUFFERED=1 tmo "$l" python3 "$REPO/tools/torch_dpo_parity.py" --dpo "$BUILD/dpo" --work "$WORK/parity-$prec" \
          --precision "$prec" --our-device "$dev" --device "$dev" --json "$WORK/parity-$prec.json" \
          >>"$PLOG" 2>&1
      r=$?
      echo "== $prec exit $r" >>"$PLOG"
      [ $r = 0 ] || prc=$r
    done
    phase_done parity "$(status_of $prc)" $(( $(date +%s) - t0 )) "our step vs plain PyTorch, fp32 and bf16 (train.log)"
  fi
fi

# resume: the cuda run of the train phase, resumed from its step-10 checkpoint in a copy of its out_dir, must end
# with byte-identical weights and optimizer state (the CUDA kernels are deterministic).
if [ "$(limit_of resume)" != 0 ]; then
  t0=$(date +%s)
  lim=$(allow resume)
  full=$TRAIN/run-cuda/checkpoints/step-20
  if [ "$cuda_train_ok" = 0 ] || [ ! -f "$full/model.safetensors" ]; then
    phase_done resume skipped 0 "no finished cuda training run to resume"
  elif [ "$lim" -lt 5 ]; then
    phase_done resume skipped 0 "out of time"
  else
    rm -rf "$TRAIN/run-resume"
    cp -r "$TRAIN/run-cuda" "$TRAIN/run-resume"
    rm -rf "$TRAIN/run-resume/checkpoints/step-20"
    echo "== resume on cuda from step-10 (limit ${lim}s)" >>"$OUT/train.log"
    # shellcheck disable=SC2046
    tmo "$lim" "$BUILD/dpo" train $(train_args "$TRAIN/run-resume" cuda "$TRAIN/refcache-cuda") --plain \
        --resume "$TRAIN/run-resume/checkpoints/step-10" >>"$OUT/train.log" 2>&1
    rc=$?
    res=$TRAIN/run-resume/checkpoints/step-20
    if [ $rc != 0 ]; then
      phase_done resume "$(status_of $rc)" $(( $(date +%s) - t0 )) "resumed run exit $rc (train.log)"
    elif cmp -s "$full/model.safetensors" "$res/model.safetensors" && \
         cmp -s "$full/optimizer.safetensors" "$res/optimizer.safetensors"; then
      phase_done resume ok $(( $(date +%s) - t0 )) "step-20 weights and optimizer state byte-identical"
    else
      phase_done resume FAIL $(( $(date +%s) - t0 )) "resumed step-20 differs from the uninterrupted run"
    fi
  fi
fi

# profile: can Nsight be used on this machine (docs/profiling.md)?
if [ "$(limit_of profile)" != 0 ]; then
  t0=$(date +%s)
  lim=$(allow profile)
  if [ ! -f "$REPO/tools/profile_probe.sh" ]; then
    phase_done profile "not run" 0 "tools/profile_probe.sh is missing"
  elif [ "$lim" -lt 5 ]; then
    phase_done profile skipped 0 "out of time"
  else
    # The probe runs a one-step tiny bench under ncu (--clock-control none) to see whether counters can be read.
    tmo "$lim" bash "$REPO/tools/profile_probe.sh" "$WORK/profile.txt" "$BUILD/dpo" bench --device cuda --shape tiny \
        --workload custom --prompt-len 16 --chosen-len 8 --rejected-len 8 --pairs 1 --steps 1 --warmup 0 \
        >"$WORK/profile-run.log" 2>&1
    rc=$?
    { echo; echo "## profilers (tools/profile_probe.sh, exit $rc)"; cat "$WORK/profile.txt" 2>/dev/null
      cat "$WORK/profile-run.log"; } >>"$OUT/env.txt"
    pnote=$(awk -F': ' '$1 == "nsys" || $1 == "ncu" || $1 == "ncu_counters" {printf "%s%s: %s", sep, $1, $2; sep = "; "}' \
            "$WORK/profile.txt" 2>/dev/null | cut -c1-200)
    phase_done profile "$(status_of $rc)" $(( $(date +%s) - t0 )) "${pnote:-no probe output}"
  fi
fi

# --- cpu tests (optional) ------------------------------------------------------------------------------------------
if [ "$cpu_tests" = 1 ]; then
  t0=$(date +%s)
  lim=$(( DEADLINE - RESERVE - $(date +%s) ))
  if [ "$built" = 0 ]; then
    phase_done cpu-tests skipped 0 "not built"
  elif [ "$lim" -lt 20 ]; then
    phase_done cpu-tests skipped 0 "out of time"
  else
    OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} run_ctest cpu "$lim" "$JOBS"
    rc=$?
    phase_done cpu-tests "$(status_of $rc)" $(( $(date +%s) - t0 )) "see CPU tests below"
  fi
fi

# --- benchmark (short mode) ----------------------------------------------------------------------------------------
# One GPT-2 124M DPO step at HH-like lengths: dpo bench on the GPU (bf16 first: the configuration the targets are
# for), then the PyTorch harness in eager mode on the same batch. Raw JSON of each run goes into bench.log.
if [ "$(limit_of bench)" != 0 ]; then
  t0=$(date +%s)
  lim=$(allow bench)
  : >"$OUT/bench.log"
  if [ "$built" = 0 ] || [ ! -x "$BUILD/dpo" ]; then
    phase_done bench skipped 0 "dpo not built"
  elif [ "$lim" -lt 20 ]; then
    phase_done bench skipped 0 "out of time"
  else
    brc=0
    bench_end=$(( t0 + lim ))
    left() { echo $(( bench_end - $(date +%s) )); }
    bench_args=(--shape gpt2-124m --workload hh --pairs 8 --steps 5 --warmup 2)
    for prec in bf16 fp32; do
      l=$(left); [ "$l" -ge 5 ] || { echo "== dpo bench $prec: not run (time)" >>"$OUT/bench.log"; continue; }
      echo "== dpo bench --device cuda ${bench_args[*]} --precision $prec (limit ${l}s)" >>"$OUT/bench.log"
      tmo "$((l / 2 > 5 ? l / 2 : l))" "$BUILD/dpo" bench --device cuda "${bench_args[@]}" --precision "$prec" \
          --json "$WORK/bench-dpo-$prec.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-dpo-$prec.json" >>"$OUT/bench.log" 2>/dev/null
    done
    # The fusions (docs/architecture.md, "Fusions"): bf16 with every fusion (the GELU epilogues too) and with none,
    # against the default run above; then the larger batch (32 pairs), where launch overhead matters less.
    # flash: the same step with attn_implementation flash (opt-in; docs/gpu-validation.md point 10).
    for variant in all none big flash; do
      l=$(left); [ "$l" -ge 8 ] || { echo "== dpo bench bf16 $variant: not run (time)" >>"$OUT/bench.log"; continue; }
      vargs=("${bench_args[@]}"); fus=""
      case $variant in
        all|none) fus=$variant ;;
        big) vargs=(--shape gpt2-124m --workload hh --pairs 32 --steps 3 --warmup 1) ;;
        flash) vargs+=(--attn-implementation flash) ;;
      esac
      echo "== DPO_FUSIONS=$fus dpo bench --device cuda ${vargs[*]} --precision bf16 (limit $((l / 3))s)" >>"$OUT/bench.log"
      DPO_FUSIONS=$fus tmo "$((l / 3))" "$BUILD/dpo" bench --device cuda "${vargs[@]}" --precision bf16 \
          --json "$WORK/bench-dpo-bf16-$variant.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-dpo-bf16-$variant.json" >>"$OUT/bench.log" 2>/dev/null
    done
    # The per-kernel table (CUPTI activity records over the timed steps; docs/profiling.md).
    l=$(left)
    if [ "$l" -ge 10 ]; then
      echo "== dpo bench --device cuda ${bench_args[*]} --precision bf16 --kernels (limit $((l / 3))s)" >>"$OUT/bench.log"
      tmo "$((l / 3))" "$BUILD/dpo" bench --device cuda --shape gpt2-124m --workload hh --pairs 8 --steps 3 --warmup 1 \
          --precision bf16 --kernels --json "$WORK/bench-kernels.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-kernels.json" >>"$OUT/bench.log" 2>/dev/null
    fi
    runs=(eager:bf16 eager:fp32)
    [ "$bench_compile" = 1 ] && runs+=(compile:bf16)
    for run in "${runs[@]}"; do
      IFS=: read -r mode prec <<<"$run"
      extra=(); [ "$mode" = compile ] && extra=(--compile)
      l=$(left); [ "$l" -ge 5 ] || { echo "== torch $mode $prec: not run (time)" >>"$OUT/bench.log"; continue; }
      echo "== tools/bench_torch.py --device cuda ${bench_args[*]} ${extra[*]} --precision $prec (limit ${l}s)" >>"$OUT/bench.log"
      tmo "$l" python3 "$REPO/tools/bench_torch.py" --device cuda "${bench_args[@]}" "${extra[@]}" \
          --precision "$prec" --json "$WORK/bench-torch-$mode-$prec.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-torch-$mode-$prec.json" >>"$OUT/bench.log" 2>/dev/null
    done
    # The attention peers (issue: flash attention): causal SDPA alone, PyTorch pinned to its flash and to its cuDNN
    # backend, bf16, B 8, 12 heads of 64, T 256-2048 (tools/bench_torch.py --attention-only).
    for sdpa in flash cudnn; do
      l=$(left); [ "$l" -ge 5 ] || { echo "== torch attention $sdpa: not run (time)" >>"$OUT/bench.log"; continue; }
      echo "== tools/bench_torch.py --attention-only --sdpa-backend $sdpa --device cuda --precision bf16 (limit $((l / 4 > 5 ? l / 4 : l))s)" >>"$OUT/bench.log"
      tmo "$((l / 4 > 5 ? l / 4 : l))" python3 "$REPO/tools/bench_torch.py" --attention-only --sdpa-backend "$sdpa" \
          --device cuda --precision bf16 --steps 10 --warmup 3 --json "$WORK/bench-torch-attention-$sdpa.json" \
          >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-torch-attention-$sdpa.json" >>"$OUT/bench.log" 2>/dev/null
    done
    # Our attention alone at two of the peers' lengths, eager and flash (dpo bench --attention-only, CUDA events).
    l=$(left)
    if [ "$l" -ge 5 ]; then
      echo "== dpo bench --attention-only --device cuda --seq-lens 512,2048 --steps 5 --warmup 2 (limit ${l}s)" >>"$OUT/bench.log"
      tmo "$l" "$BUILD/dpo" bench --attention-only --device cuda --seq-lens 512,2048 --steps 5 --warmup 2 \
          --json "$WORK/bench-dpo-attention.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-dpo-attention.json" >>"$OUT/bench.log" 2>/dev/null
    else
      echo "== dpo bench --attention-only: not run (time)" >>"$OUT/bench.log"
    fi
    phase_done bench "$([ $brc = 0 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "bench.log: dpo bench (eager, flash), PyTorch eager, SDPA flash/cuDNN attention, attention alone"
  fi
fi

# --- tier t2: several GPUs -------------------------------------------------------------------------------------------
# Data-parallel training across every GPU of the machine against the 1-GPU cuda run of the train phase: plain
# (bucketed all-reduce overlapped with the backward) and ZeRO-1 (reduce-scatter). Needs an MPI launcher (the
# trainer's ranks are processes); the device image has none unless one is carried.
if [ "$quick" = 0 ]; then
  t0=$(date +%s)
  if [ "${gpus:-0}" -lt 2 ]; then
    phase_done multi-gpu "not run" 0 "this machine has ${gpus:-0} GPU(s); the tier needs 2 or more"
  else
    lim=$(allow multi-gpu)
    MPIRUN=$(command -v mpirun || true)
    if [ -z "$MPIRUN" ]; then
      phase_done multi-gpu "not run" 0 "$gpus GPUs but no mpirun on this machine (configure --with-mpi and carry a launcher)"
    elif [ "$cuda_train_ok" = 0 ]; then
      phase_done multi-gpu skipped 0 "the 1-GPU cuda training failed"
    elif [ "$lim" -lt 15 ]; then
      phase_done multi-gpu skipped 0 "out of time"
    else
      mrc=0
      for variant in plain zero1; do
        extra=(); [ "$variant" = zero1 ] && extra=(zero_stage=1)
        run=$TRAIN/run-mgpu-$variant
        rm -rf "$run" "$TRAIN/refcache-mgpu-$variant"
        echo "== mpirun -np $gpus dpo train device=cuda ${extra[*]}" >>"$OUT/train.log"
        # shellcheck disable=SC2046
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 tmo $(( (t0 + lim - $(date +%s)) / 2 )) \
          "$MPIRUN" -np "$gpus" "$BUILD/dpo" train $(train_args "$run" cuda "$TRAIN/refcache-mgpu-$variant") \
          "${extra[@]}" --plain >>"$OUT/train.log" 2>&1 || mrc=1
        lossN=$(json_num "$run/metrics.jsonl" loss '$' 2>/dev/null)
        printf '%s\t%s\t\t\t\t\t%s\t\n' "cuda-x$gpus-$variant" "$mrc" "${lossN:-}" >>"$WORK/train.tsv"
      done
      phase_done multi-gpu "$([ $mrc = 0 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "see Training below"
    fi
  fi
fi

# --- summary -------------------------------------------------------------------------------------------------------
total=$(( $(date +%s) - START ))
fact total_seconds "$total"
cut_log() {  # FILE: keep the first 256 KiB and the last 3.75 MiB of a log over 4 MiB
  local f=$1 max=$((4 * 1024 * 1024)) head=$((256 * 1024)) size
  [ -f "$f" ] || return 0
  size=$(stat -c %s "$f")
  [ "$size" -gt "$max" ] || return 0
  { head -c "$head" "$f"; printf '\n\n[... gpu_check: %d bytes cut ...]\n\n' $((size - max)); tail -c $((max - head)) "$f"; } >"$f.cut"
  mv "$f.cut" "$f"
}
for f in build.log ctest.log sanitizer.log train.log bench.log env.txt; do cut_log "$OUT/$f"; done

verdict=FAIL
if command -v python3 >/dev/null && python3 "$REPO/tools/gpu_check_summary.py" "$WORK" "$OUT" "$BUILD"; then
  verdict=$(cat "$WORK/verdict" 2>/dev/null || echo FAIL)
else
  {
    echo "# GPU check summary (fallback: tools/gpu_check_summary.py did not run)"
    echo; echo "**Result: FAIL** (no summary script)"; echo
    echo '```'; cat "$FACTS"; echo; cat "$PHASES"; echo; cat "$WORK/train.tsv" "$WORK/sanitizer.tsv" 2>/dev/null; echo '```'
  } >"$OUT/summary.md"
  cp "$WORK/junit-cuda-t0.xml" "$OUT/junit.xml" 2>/dev/null
fi
echo
echo "================================================================================"
cat "$OUT/summary.md"
[ "$verdict" = PASS ]
