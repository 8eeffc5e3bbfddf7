#!/usr/bin/env bash
# The project's test command (README, .ci/run):
#   1. installs what a fresh machine lacks (tools/install_deps.sh),
#   2. configures and builds everything (the CUDA part too when nvcc is on PATH; it compiles here even where
#      nothing can run it),
#   3. runs every ctest test (CUDA tests skip with a reason on a machine without a GPU),
#   4. builds again with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only) and runs the CPU tests under it
#      (label `cpu`; the `slow` end-to-end demo test runs only in step 3),
#   5. builds the libFuzzer targets with clang (tests/fuzz) and runs their fixed smoke runs (label `fuzz`).
# Usage: tools/test.sh [--no-sanitize] [--no-fuzz]      Build trees: build/, build-asan/ and build-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=1 fuzz=1
for a in "$@"; do
  case "$a" in
    --no-sanitize) sanitize=0 ;;
    --no-fuzz) fuzz=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "test.sh: unknown argument '$a'" >&2; exit 2 ;;
  esac
done

jobs=$(nproc)
# Tests run several OpenMP processes at once on few cores: spinning worker threads would starve each other.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
tools/install_deps.sh

echo "== build (release)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$jobs"
echo "== tests (release)"
ctest --test-dir build --output-on-failure -j"$jobs"

if [ "$sanitize" = 1 ]; then
  echo "== build (ASan + UBSan, CPU only)"
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DDPO_SANITIZE=ON -DDPO_ENABLE_CUDA=OFF
  cmake --build build-asan -j"$jobs"
  echo "== tests (ASan + UBSan)"
  # halt_on_error: any report fails the run. detect_leaks stays on (LeakSanitizer is part of ASan on Linux).
  ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -L cpu -j"$jobs"
fi
if [ "$fuzz" = 1 ]; then
  echo "== build (libFuzzer targets, clang, ASan + UBSan)"
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
    -DCMAKE_CXX_COMPILER=clang++ -DDPO_FUZZ=ON -DDPO_BUILD_TESTS=OFF
  cmake --build build-fuzz -j"$jobs"
  echo "== fuzz smoke runs"
  ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 ctest --test-dir build-fuzz --output-on-failure -L fuzz -j"$jobs"
fi
echo "== all tests passed"
