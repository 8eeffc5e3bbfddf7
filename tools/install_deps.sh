#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test this project.
# Everything comes from Debian packages; the CUDA toolkit (cuBLAS/cuBLASLt, cuDNN,
# NCCL) is optional and is used when nvcc is on PATH.
# As root it runs apt-get; otherwise it prints the exact command to run.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build pkg-config
  libyaml-cpp-dev        # YAML configs
  nlohmann-json3-dev     # JSON (safetensors headers, config.json, metrics)
  libcli11-dev           # command line
  libopenblas-openmp-dev # CBLAS for the CPU matmuls, OpenMP build (shares our thread pool)
  libgtest-dev           # GoogleTest
  libopenmpi-dev openmpi-bin   # MPI (CPU data-parallel backend, NCCL bootstrap)
  libcairo2-dev fonts-dejavu-core   # PNG charts (train/plot.cpp) and their font
  libssl-dev             # SHA-256 (reference-cache keys, checkpoint verification)
  libpcre2-dev           # tokenizer.json pre-tokenizer regexes (Unicode classes, lookaheads)
  libutf8proc-dev        # tokenizer.json normalizers (NFC, NFKC, ...) and lowercasing
  clang libclang-rt-14-dev   # libFuzzer targets for the input readers (tests/fuzz)
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all packages present"
  exit 0
fi

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  echo "install_deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install_deps: missing packages: ${missing[*]}" >&2
  echo "install_deps: run as root:  sudo $cmd" >&2
  exit 1
fi
