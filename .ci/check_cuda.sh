#!/usr/bin/env bash
# Compile-checks the CUDA side of random_ltd without a GPU and without a CUDA build of torch.
#
# 1. csrc/cuda/token_ops_cuda.cu alone with nvcc (it includes no torch header by design), for every arch in
#    RANDOM_LTD_CUDA_ARCHS (default "8.0;9.0"), as C++17 and C++20 (the standard torch's extension builder uses).
# 2. The WITH_CUDA part of csrc/random_ltd.cpp (the torch binding) with the host compiler, syntax only, against the
#    installed torch's headers and the CUDA toolkit headers. CPU wheels of torch ship the c10/cuda headers but not
#    the generated c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS), hence
#    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE. Skipped with a message when torch is not importable.
#
# Prints a skip line and exits 0 when nvcc is absent; exits non-zero on any compile error.
# Usage: .ci/check_cuda.sh [python]   (python defaults to $PYTHON or python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"

NVCC=""
if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: SKIP (nvcc not found; set CUDA_HOME or put nvcc on PATH)"
  exit 0
fi
# Toolkit headers: nvcc may be a symlink or a wrapper script (/usr/local/bin/nvcc), so look in a few places.
CUDA_INC=""
for d in "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" /usr/local/cuda/include; do
  if [[ -f "$d/cuda_runtime.h" ]]; then CUDA_INC="$(cd "$d" && pwd)"; break; fi
done
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "check_cuda: $("$NVCC" --version | tail -n 1)"
IFS=';, ' read -r -a ARCHS <<<"${RANDOM_LTD_CUDA_ARCHS:-8.0;9.0}"
for arch in "${ARCHS[@]}"; do
  [[ -z "$arch" ]] && continue
  sm="${arch//./}"
  for std in c++17 c++20; do
    cmd=("$NVCC" "-std=$std" -O3 -Werror all-warnings -c csrc/cuda/token_ops_cuda.cu -o "$TMP/token_ops_cuda.o"
         -gencode "arch=compute_${sm},code=sm_${sm}")
    echo "check_cuda: ${cmd[*]}"
    "${cmd[@]}"
  done
done

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "check_cuda: SKIP binding check (torch not importable with $PY)"
  exit 0
fi
mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
CXX="${CXX:-g++}"
inc=()
if [[ -z "$CUDA_INC" ]]; then
  echo "check_cuda: SKIP binding check (cuda_runtime.h not found; set CUDA_HOME)"
  exit 0
fi
for d in "${TORCH_INC[@]}" "$PY_INC" "$CUDA_INC"; do inc+=(-isystem "$d"); done
cmd=("$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DWITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${inc[@]}"
     csrc/random_ltd.cpp)
echo "check_cuda: ${cmd[*]}"
"${cmd[@]}"
echo "check_cuda: OK"
