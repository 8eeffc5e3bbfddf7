#!/usr/bin/env bash
# NCCL and cuDNN from folders laid out like PyTorch's pip wheels (site-packages/nvidia/<lib>/{include,lib}, a
# versioned soname and no unversioned link): cmake/DpoCudaExtras.cmake must find header and library together, and
# stop the configuration with an error naming the missing piece when only one of them is there.
# Usage: tests/test_cmake_extras.sh [CMAKE [PROJECT_DIR]]   (ctest passes its cmake and the project's source folder;
#        with PROJECT_DIR and nvcc on PATH, the project's own CMakeLists.txt is also configured once against a
#        library-only NCCL folder and must fail)
set -uo pipefail
CMAKE=${1:-cmake}
PROJECT=${2:-}
SRC=$(cd "$(dirname "$0")/cmake_extras" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fails=$((fails + 1)); }

# wheel NAME LIB HEADER? LIB? -> a folder nvidia/NAME with include/HEADER and lib/LIB (empty stand-ins: the
# module checks presence, the linker never sees them)
wheel() {
  local root=$TMP/$1/site-packages/nvidia/$2
  mkdir -p "$root/include" "$root/lib"
  [ -n "$3" ] && : >"$root/include/$3"
  [ -n "$4" ] && : >"$root/lib/$4"
  echo "$root"
}
configure() {  # NAME ARGS... -> exit status; output in $TMP/NAME.log, results in $TMP/NAME-build/found.txt
  local name=$1; shift
  "$CMAKE" -S "$SRC" -B "$TMP/$name-build" "$@" >"$TMP/$name.log" 2>&1
}

# 1. Both, wheel layout, given as roots.
n=$(wheel both nccl nccl.h libnccl.so.2); c=$(wheel both cudnn cudnn.h libcudnn.so.9)
if configure both -DDPO_NCCL_ROOT="$n" -DDPO_CUDNN_ROOT="$c"; then
  f=$TMP/both-build/found.txt
  if grep -qx "NCCL ON $n/include $n/lib/libnccl.so.2" "$f" && grep -qx "CUDNN ON $c/include $c/lib/libcudnn.so.9" "$f"
  then ok "wheel layout: header and versioned library found for both"
  else bad "wheel layout: wrong result: $(cat "$f")"; fi
else bad "wheel layout: configure failed: $(grep -m1 'Error' -A2 "$TMP/both.log")"; fi

# 2. Both, given as include folder + library file (what tools/gpu_check.sh passes).
if configure direct -DDPO_NCCL_INCLUDE_DIR="$n/include" -DDPO_NCCL_LIB="$n/lib/libnccl.so.2" \
     -DDPO_CUDNN_INCLUDE_DIR="$c/include" -DDPO_CUDNN_LIB="$c/lib/libcudnn.so.9"; then
  grep -q "^NCCL ON" "$TMP/direct-build/found.txt" && grep -q "^CUDNN ON" "$TMP/direct-build/found.txt" \
    && ok "include dir + library file: found" || bad "include dir + library file: $(cat "$TMP/direct-build/found.txt")"
else bad "include dir + library file: configure failed"; fi

# 3. Library without header, header without library, empty root, include dir without the header: configure errors
#    that name what is missing.
expect_error() {  # LABEL PATTERN ARGS...
  local label=$1 pat=$2; shift 2
  if configure "$label" "$@"; then bad "$label: configure succeeded, expected an error"
  elif grep -q "$pat" "$TMP/$label.log"; then ok "$label: configure error names it ($pat)"
  else bad "$label: configure failed without naming '$pat': $(grep -m1 -A3 'Error' "$TMP/$label.log")"; fi
}
expect_error nccl-lib-only "NCCL is incomplete: missing the header nccl.h" \
  -DDPO_NCCL_ROOT="$(wheel libonly nccl '' libnccl.so.2)" -DDPO_CUDNN_ROOT="$c"
expect_error cudnn-header-only "CUDNN is incomplete: missing the library" \
  -DDPO_NCCL_ROOT="$n" -DDPO_CUDNN_ROOT="$(wheel hdronly cudnn cudnn.h '')"
expect_error nccl-empty-root "NCCL is incomplete: missing both the header nccl.h and the library" \
  -DDPO_NCCL_ROOT="$(wheel empty nccl '' '')" -DDPO_CUDNN_ROOT="$c"
expect_error nccl-wrong-include "DPO_NCCL_INCLUDE_DIR=$TMP/both does not hold nccl.h" \
  -DDPO_NCCL_INCLUDE_DIR="$TMP/both" -DDPO_NCCL_LIB="$n/lib/libnccl.so.2" -DDPO_CUDNN_ROOT="$c"
expect_error nccl-missing-lib "DPO_NCCL_LIB=$TMP/nowhere.so does not exist" \
  -DDPO_NCCL_INCLUDE_DIR="$n/include" -DDPO_NCCL_LIB="$TMP/nowhere.so" -DDPO_CUDNN_ROOT="$c"
expect_error nccl-root-not-folder "DPO_NCCL_ROOT=$TMP/nofolder is not a folder" \
  -DDPO_NCCL_ROOT="$TMP/nofolder" -DDPO_CUDNN_ROOT="$c"

# 4. The project itself uses the module: a CUDA configure against a library-only NCCL folder fails loudly.
if [ -n "$PROJECT" ] && command -v nvcc >/dev/null; then
  if "$CMAKE" -S "$PROJECT" -B "$TMP/project-build" -G Ninja -DDPO_BUILD_TESTS=OFF \
       -DDPO_NCCL_ROOT="$(wheel project nccl '' libnccl.so.2)" >"$TMP/project.log" 2>&1; then
    bad "project: CUDA configure with a library-only NCCL succeeded"
  elif grep -q "NCCL is incomplete: missing the header nccl.h" "$TMP/project.log"; then
    ok "project: CUDA configure with a library-only NCCL stops with the error"
  else bad "project: configure failed for another reason: $(grep -m1 -A3 'Error' "$TMP/project.log")"; fi
else
  echo "skip project configure: $([ -z "$PROJECT" ] && echo 'no project folder given' || echo 'nvcc not on PATH')"
fi

[ "$fails" = 0 ] && echo "all cases passed" || echo "$fails case(s) failed"
[ "$fails" = 0 ]
