#!/usr/bin/env bash
# One-command GPU validation (docs/gpu-validation.md). Runs on the device machine from the repository root,
# with .deps carried (tools/prepare_gpu_deps.sh, run on the dev machine first):
#
#   tools/gpu_check.sh OUTDIR [--cpu-tests] [--no-bench] [--system-deps] [--with-mpi] [--budget SECONDS] [--scale N]
#
# Phases, each with its own time limit, all inside --budget (default 470 s, under 8 minutes):
#   env         machine facts (card, driver, nvcc, cmake, compiler, OS, deps)       -> OUTDIR/env.txt
#   configure   cmake -G Ninja -DDPO_CUDA_ARCHITECTURES=90 into build-gpu/          -> OUTDIR/build.log
#   build       ninja on all cores: dpo and the test_cuda_* tests (all tests with --cpu-tests)
#   cuda-tests  ctest -L cuda --output-on-failure, JUnit                            -> OUTDIR/ctest.log, junit.xml
#   train       dpo init (tiny GPT-2) + generated JSONL, 20 DPO steps with device=cuda and device=cpu;
#               compares the step-1 log-probs (forward) and the final loss; then the cuda run again with its
#               gradient reduction through a 1-rank NCCL communicator (DPO_FORCE_NCCL=1): same loss expected
#                                                                                    -> OUTDIR/train.log
#   sanitizer   compute-sanitizer --tool memcheck over build-gpu/tests/test_cuda_* (kernel tests first), then
#               2 training steps on cuda under memcheck when the cuda run worked    -> OUTDIR/sanitizer.log
#   cpu-tests   (--cpu-tests) ctest -L cpu with the time that is left               -> OUTDIR/ctest.log, junit.xml
#   bench       (unless --no-bench) short mode: dpo bench --device cuda on GPT-2 124M at HH-like lengths in fp32
#               and bf16, then tools/bench_torch.py eager fp32, eager bf16 (autocast) and torch.compile bf16 on
#               the same batch, and tools/bench_trl.py (bf16) when python3 can import trl -> OUTDIR/bench.log
# Then writes OUTDIR/summary.md (tools/gpu_check_summary.py) and prints it LAST. OUTDIR stays flat with at most
# 8 files (the device tool returns no more); logs over 4 MiB are cut in the middle.
# Exit status: 0 only when everything passed on a GPU; non-zero otherwise (the summary is always written).
# --system-deps   ignore .deps and use the system's packages (a machine with tools/install_deps.sh done)
# --with-mpi      let CMake look for MPI (off by default: single-GPU checks, and the device image's MPI is unknown)
# --scale N       multiply every phase limit and the default budget by N (a dry run on a 2-core machine: 4)
# Environment: GPU_CHECK_SANITIZER_FILTER  gtest filter under memcheck; default leaves out the tests that touch more
#              than 2^31 elements (minutes under memcheck; they run in cuda-tests):  -*Past32Bit*:*Beyond2Pow*:*Huge*
#              DPO_GPU_BUILD  build folder (default build-gpu)
set -uo pipefail

START=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

OUT=""
cpu_tests=0 system_deps=0 with_mpi=0 budget="" scale=1 bench=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-tests) cpu_tests=1 ;;
    --system-deps) system_deps=1 ;;
    --with-mpi) with_mpi=1 ;;
    --budget) shift; budget=${1:-} ;;
    --no-bench) bench=0 ;;
    --scale) shift; scale=${1:-1} ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option '$1'" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: one OUTDIR only" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "usage: tools/gpu_check.sh OUTDIR [--cpu-tests] [--system-deps] [--with-mpi] [--budget S]" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
case "$scale" in ''|*[!0-9]*) echo "gpu_check: --scale takes a whole number" >&2; exit 2 ;; esac
budget=${budget:-$((470 * scale))}
BUILD=$REPO/${DPO_GPU_BUILD:-build-gpu}
WORK=$BUILD/gpu-check          # intermediate files; OUTDIR gets only the final ≤ 8 files
DEADLINE=$((START + budget))
RESERVE=15                     # seconds kept for the summary
JOBS=$(nproc 2>/dev/null || echo 4)

mkdir -p "$WORK"
rm -f "$WORK"/*.tsv "$WORK"/*.xml "$WORK"/*.txt "$WORK"/verdict
for f in env.txt build.log ctest.log junit.xml sanitizer.log train.log bench.log summary.md; do rm -f "$OUT/$f"; done
PHASES=$WORK/phases.tsv FACTS=$WORK/facts.tsv
: >"$PHASES"; : >"$FACTS"

log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }
# phase_done NAME STATUS SECONDS NOTE   (STATUS: ok | FAIL | timeout | skipped | unavailable)
phase_done() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$PHASES"; log "phase $1: $2 (${3}s) ${4:-}"; }
# Seconds a phase may use: its own limit, cut to what the overall budget leaves.
allow() {
  local want=$(($1 * scale)) left=$((DEADLINE - RESERVE - $(date +%s)))
  if [ "$want" -lt "$left" ]; then echo "$want"; else echo $((left > 0 ? left : 0)); fi
}
# tmo SECONDS CMD...: timeout that also kills the command's children; 124 on timeout.
tmo() { timeout -k 5 "$1" "${@:2}"; }
status_of() { case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo "FAIL" ;; esac; }

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

# cuDNN / NCCL: the toolkit folder or the system first; else PyTorch's pip wheels (nvidia/cudnn, nvidia/nccl).
extra_flags="" extra_cmake=()
find_cuda_extra() {  # NAME HEADER LIBNAME CMAKEVAR
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
    extra_flags+=" -I$inc"
    extra_cmake+=("-D$var=$libf")
    LD_LIBRARY_PATH="$(dirname "$libf")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    fact "$name" "$inc (pip wheel), library $libf"
  else
    fact "$name" "not found (toolkit, /usr/include, pip wheels)"
  fi
}
if [ -n "$CUDA_ROOT" ]; then
  find_cuda_extra cudnn cudnn.h libcudnn DPO_CUDNN_LIB
  find_cuda_extra nccl nccl.h libnccl DPO_NCCL_LIB
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
  echo "PKG_CONFIG_LIBDIR=${PKG_CONFIG_LIBDIR:-}"; echo "extra include flags:${extra_flags:- none}"
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}"
} >"$OUT/env.txt" 2>&1
phase_done env ok $(( $(date +%s) - t0 )) "$gpu_line"

# --- configure -----------------------------------------------------------------------------------------------------
configured=0 built=0
t0=$(date +%s)
mode_key="$deps_mode|mpi=$with_mpi|$extra_flags|$REPO"
if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/gpu-check-mode" 2>/dev/null)" != "$mode_key" ]; then
  log "build-gpu was configured differently; starting it afresh"
  find "$BUILD" -mindepth 1 -maxdepth 1 ! -name gpu-check ! -name deps-lib -exec rm -rf {} +
fi
cmake_args=(-S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDPO_ENABLE_CUDA=ON
            -DDPO_CUDA_ARCHITECTURES=90 -DDPO_BUILD_TESTS=ON)
[ "$with_mpi" = 1 ] || cmake_args+=(-DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)
[ "$deps_mode" = .deps ] && cmake_args+=("${DPO_DEPS_CMAKE_ARGS[@]}")
cmake_args+=("${extra_cmake[@]}")
[ -n "$extra_flags" ] && cmake_args+=("-DCMAKE_CXX_FLAGS=$extra_flags" "-DCMAKE_CUDA_FLAGS=$extra_flags")
lim=$(allow 90)
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
    for k in CMAKE_CUDA_COMPILER CMAKE_CXX_COMPILER DPO_OPENBLAS_LIB DPO_CUDNN_LIB DPO_NCCL_LIB yaml-cpp_DIR GTest_DIR \
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
lim=$(allow 240)
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
  [ $rc != 0 ] && note="$(grep -m1 -E 'error|Error' "$OUT/build.log" | cut -c1-160)"
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

# --- cuda tests ----------------------------------------------------------------------------------------------------
: >"$OUT/ctest.log"
t0=$(date +%s)
lim=$(allow 75)
if [ "$built" = 0 ]; then
  phase_done cuda-tests skipped 0 "not built"
elif [ "$lim" -lt 10 ]; then
  phase_done cuda-tests skipped 0 "out of time"
else
  run_ctest cuda "$lim" 8
  rc=$?
  phase_done cuda-tests "$(status_of $rc)" $(( $(date +%s) - t0 )) "see CUDA tests below"
fi

# --- training: cuda vs cpu ------------------------------------------------------------------------------------------
TRAIN=$WORK/train
: >"$OUT/train.log"
: >"$WORK/train.tsv"
json_num() { grep -o "\"$2\":[^,}]*" "$1" | sed -n "${3:-1}p" | cut -d: -f2; }  # FILE KEY [LINE|$]
train_one() {  # LABEL LIMIT   (LABEL: cpu, cuda, or cuda-nccl = cuda with DPO_FORCE_NCCL=1)
  local label=$1 lim=$2 dev=${1%%-*} t rc run note="" force=0
  [ "$label" = cuda-nccl ] && force=1
  run=$TRAIN/run-$label
  rm -rf "$run" "$TRAIN/refcache-$label"
  echo "== dpo train device=$dev DPO_FORCE_NCCL=$force (limit ${lim}s)" >>"$OUT/train.log"
  t=$(date +%s)
  DPO_FORCE_NCCL=$force tmo "$lim" "$BUILD/dpo" train model="$TRAIN/base" train_file="$TRAIN/prefs.jsonl" \
      out_dir="$run" device="$dev" max_steps=20 per_device_train_batch_size=4 learning_rate=2e-4 logging_steps=1 \
      max_length=96 max_prompt_length=48 seed=1 ref_cache_dir="$TRAIN/refcache-$label" --plain >>"$OUT/train.log" 2>&1
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
lim=$(allow 60)
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
  if ! tmo 30 "$BUILD/dpo" init --out "$TRAIN/base" --n-layer 2 --n-head 2 --n-embd 64 --vocab-size 257 \
      --n-positions 128 --seed 1 >>"$OUT/train.log" 2>&1; then
    phase_done train FAIL $(( $(date +%s) - t0 )) "dpo init failed (train.log)"
  else
    train_one cuda $(( lim * 2 / 5 )) && cuda_train_ok=1
    train_one cpu "$(allow $(( lim * 2 / 5 / scale )))"
    [ $cuda_train_ok = 1 ] && train_one cuda-nccl "$(allow $(( lim / 5 )))"
    phase_done train "$([ $cuda_train_ok = 1 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "see Training below"
  fi
fi

# --- compute-sanitizer ---------------------------------------------------------------------------------------------
t0=$(date +%s)
lim=$(allow 150)
: >"$WORK/sanitizer.tsv"
SAN_FILTER=${GPU_CHECK_SANITIZER_FILTER:--*Past32Bit*:*Beyond2Pow*:*Huge*}
{ echo "# compute-sanitizer --tool memcheck"; echo "gtest filter: $SAN_FILTER"; } >"$OUT/sanitizer.log"
sanitize_one() {  # NAME LIMIT CMD...
  local name=$1 l=$2 t rc errs res
  shift 2
  echo "== $name (limit ${l}s): $*" >>"$OUT/sanitizer.log"
  t=$(date +%s)
  tmo "$l" "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 30 "$@" >"$WORK/san-one.log" 2>&1
  rc=$?
  t=$(( $(date +%s) - t ))
  cat "$WORK/san-one.log" >>"$OUT/sanitizer.log"
  errs=$(grep -o 'ERROR SUMMARY: [0-9]*' "$WORK/san-one.log" | tail -n1 | awk '{print $3}')
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
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$res" "${errs:-?}" "$t" "${passed:-}" "${failed:-}" "${skipped:-}" \
    >>"$WORK/sanitizer.tsv"
}
if [ "$built" = 0 ]; then
  phase_done sanitizer skipped 0 "not built"
elif [ "$have_gpu" = 0 ]; then
  phase_done sanitizer unavailable 0 "not run: no CUDA device"
elif [ -z "$SANITIZER" ]; then
  phase_done sanitizer unavailable 0 "not run: compute-sanitizer not found"
elif [ "$lim" -lt 10 ]; then
  phase_done sanitizer skipped 0 "out of time"
else
  san_end=$(( $(date +%s) + lim ))
  bins=()
  for b in "$BUILD"/tests/test_cuda_kernels_*; do [ -x "$b" ] && [ -f "$b" ] && bins+=("$b"); done
  for b in "$BUILD"/tests/test_cuda_*; do
    case "$b" in */test_cuda_kernels_*) continue ;; esac
    [ -x "$b" ] && [ -f "$b" ] && bins+=("$b")
  done
  for b in "${bins[@]}"; do
    l=$(( san_end - $(date +%s) ))
    if [ "$l" -lt 5 ]; then printf '%s\tnot run (time)\t?\t0\t\t\t\n' "$(basename "$b")" >>"$WORK/sanitizer.tsv"; continue; fi
    sanitize_one "$(basename "$b")" "$l" "$b" --gtest_filter="$SAN_FILTER" --gtest_brief=1
  done
  if [ "$cuda_train_ok" = 1 ]; then
    l=$(( san_end - $(date +%s) ))
    if [ "$l" -ge 10 ]; then
      rm -rf "$TRAIN/run-san" "$TRAIN/refcache-san"
      sanitize_one "dpo train device=cuda (2 steps)" "$l" "$BUILD/dpo" train model="$TRAIN/base" \
        train_file="$TRAIN/prefs.jsonl" out_dir="$TRAIN/run-san" device=cuda max_steps=2 per_device_train_batch_size=4 \
        learning_rate=2e-4 max_length=96 max_prompt_length=48 ref_cache_dir="$TRAIN/refcache-san" --plain
    else
      printf 'dpo train device=cuda (2 steps)\tnot run (time)\t?\t0\t\t\t\n' >>"$WORK/sanitizer.tsv"
    fi
  fi
  n_err=$(awk -F'\t' '$3 ~ /^[0-9]+$/ {s += $3} END {print s + 0}' "$WORK/sanitizer.tsv")
  bad=$(awk -F'\t' '$2 != "clean" {n++} END {print n + 0}' "$WORK/sanitizer.tsv")
  st=ok
  if [ "$n_err" != 0 ] || [ "$bad" != 0 ] || [ ! -s "$WORK/sanitizer.tsv" ]; then st=FAIL; fi
  phase_done sanitizer "$st" $(( $(date +%s) - t0 )) "$n_err errors; $bad of $(wc -l <"$WORK/sanitizer.tsv") runs not clean"
fi

# --- cpu tests (optional) ------------------------------------------------------------------------------------------
if [ "$cpu_tests" = 1 ]; then
  t0=$(date +%s)
  lim=$(allow 600)
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
# One GPT-2 124M DPO step at HH-like lengths: dpo bench on the GPU, then the PyTorch harness (eager, then
# torch.compile) on the same batch. Raw JSON of each run goes into bench.log (OUTDIR keeps at most 8 files).
if [ "$bench" = 1 ]; then
  t0=$(date +%s)
  lim=$(allow 150)
  : >"$OUT/bench.log"
  if [ "$built" = 0 ] || [ ! -x "$BUILD/dpo" ]; then
    phase_done bench skipped 0 "dpo not built"
  elif [ "$lim" -lt 30 ]; then
    phase_done bench skipped 0 "out of time"
  else
    brc=0
    bench_args=(--shape gpt2-124m --workload hh --pairs 8 --steps 5 --warmup 2)
    echo "== dpo bench --device cuda ${bench_args[*]}" >>"$OUT/bench.log"
    tmo $((lim / 5)) "$BUILD/dpo" bench --device cuda "${bench_args[@]}" --json "$WORK/bench-dpo.json" >>"$OUT/bench.log" 2>&1 || brc=1
    cat "$WORK/bench-dpo.json" >>"$OUT/bench.log" 2>/dev/null
    # bf16 (our mixed precision; PyTorch with autocast) is the configuration the targets are for.
    echo "== dpo bench --device cuda ${bench_args[*]} --precision bf16" >>"$OUT/bench.log"
    tmo "$(allow $((lim / 5)))" "$BUILD/dpo" bench --device cuda "${bench_args[@]}" --precision bf16 \
        --json "$WORK/bench-dpo-bf16.json" >>"$OUT/bench.log" 2>&1 || brc=1
    cat "$WORK/bench-dpo-bf16.json" >>"$OUT/bench.log" 2>/dev/null
    # PyTorch: eager fp32, eager bf16 (autocast), torch.compile bf16 (compiling takes the longest share).
    for run in eager:fp32:5 eager:bf16:5 compile:bf16:3; do
      IFS=: read -r mode prec share <<<"$run"
      extra=(); [ "$mode" = compile ] && extra=(--compile)
      echo "== tools/bench_torch.py --device cuda ${bench_args[*]} ${extra[*]} --precision $prec" >>"$OUT/bench.log"
      tmo "$(allow $((lim / share)))" python3 "$REPO/tools/bench_torch.py" --device cuda "${bench_args[@]}" "${extra[@]}" \
          --precision "$prec" --json "$WORK/bench-torch-$mode-$prec.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-torch-$mode-$prec.json" >>"$OUT/bench.log" 2>/dev/null
    done
    # TRL's DPOTrainer when the machine has TRL (the device tool cannot install it: no network).
    if python3 -c 'import trl' >/dev/null 2>&1; then
      echo "== tools/bench_trl.py --device cuda ${bench_args[*]} --precision bf16" >>"$OUT/bench.log"
      tmo "$(allow $((lim / 5)))" python3 "$REPO/tools/bench_trl.py" --device cuda "${bench_args[@]}" --precision bf16 \
          --json "$WORK/bench-trl-bf16.json" >>"$OUT/bench.log" 2>&1 || brc=1
      cat "$WORK/bench-trl-bf16.json" >>"$OUT/bench.log" 2>/dev/null
    else
      echo "== tools/bench_trl.py: not run, python3 cannot import trl on this machine" >>"$OUT/bench.log"
    fi
    phase_done bench "$([ $brc = 0 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "bench.log: dpo bench, PyTorch eager and torch.compile"
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
  cp "$WORK/junit-cuda.xml" "$OUT/junit.xml" 2>/dev/null
fi
echo
echo "================================================================================"
cat "$OUT/summary.md"
[ "$verdict" = PASS ]
