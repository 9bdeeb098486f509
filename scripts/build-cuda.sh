#!/usr/bin/env bash
# Builds itamaed and itamae-bench with the `cuda` feature on a machine without a CUDA install
# (and without a GPU): the CUDA toolkit pieces candle needs come from NVIDIA's PyPI wheels in a
# venv, and cargo builds with its own target directory.
#
#   scripts/build-cuda.sh            # compute capability 80 (A100) unless CUDA_COMPUTE_CAP is set
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh
#
# Env: ITAMAE_CUDA_VENV (default ~/.cache/itamae/cudavenv), ITAMAE_CUDA_VERSION (default 13.0),
# CUDA_COMPUTE_CAP (default 80: with no GPU nvidia-smi cannot report one, and candle's kernel
# build needs it), CARGO_TARGET_DIR (default target/cuda), ITAMAE_CUDA_LINK=1 (link even where
# ldconfig finds no libcuda.so). What this proves and what it does not: docs/gpu.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ITAMAE_CUDA_VENV:-$HOME/.cache/itamae/cudavenv}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"

# NVIDIA's CUDA 13 wheels share one prefix (site-packages/nvidia/cu13: bin, nvvm, include, lib),
# which is a CUDA_ROOT as is. (The CUDA 12 `-cu12` nvcc wheel has ptxas and libnvvm but no nvcc
# driver, so it cannot build candle's kernels.) 13.0 is pinned: a toolkit version the cudarc
# release under candle 0.11 has bindings for (it reads the version from nvcc). Pieces: nvcc (with cicc, ptxas, fatbinary), the crt
# headers, the runtime headers and libcudart, libcu++/thrust/cub, NVRTC, cuBLAS(Lt) and cuRAND:
# what candle-core's and candle-kernels' `cuda` builds include and link.
cuda_version="${ITAMAE_CUDA_VERSION:-13.0}"
wheels=(
  "nvidia-cuda-nvcc==$cuda_version.*"
  # nvcc's wheel depends on nvidia-nvvm without a bound: unpinned, pip takes the newest (13.5),
  # whose cicc emits PTX 9.5 that the 13.0 ptxas refuses ("Unsupported .version 9.5").
  "nvidia-nvvm==$cuda_version.*"
  "nvidia-cuda-crt==$cuda_version.*"
  "nvidia-cuda-runtime==$cuda_version.*"
  "nvidia-cuda-cccl==$cuda_version.*"
  "nvidia-cuda-nvrtc==$cuda_version.*"
  "nvidia-cublas==$cuda_version.*"
  nvidia-curand
)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cuda="$site/nvidia/cu13"
if [ ! -x "$cuda/bin/nvcc" ] || [ ! -e "$cuda/include/cublas_v2.h" ] || [ ! -e "$cuda/include/curand.h" ] ||
  ! "$venv/bin/pip" show nvidia-nvvm 2>/dev/null | grep -q "^Version: $cuda_version\."; then
  "$venv/bin/pip" install -q "${wheels[@]}"
fi
# The wheels ship only versioned shared objects (libcudart.so.13); the linker looks for the
# unversioned names.
for so in "$cuda"/lib/lib*.so.*; do
  [ -e "$so" ] || continue
  base="$(basename "$so")"
  plain="$cuda/lib/${base%%.so.*}.so"
  [ -e "$plain" ] || ln -s "$base" "$plain"
done
[ -e "$cuda/lib64" ] || ln -s lib "$cuda/lib64"

export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda" CUDA_TOOLKIT_ROOT_DIR="$cuda"
export PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$cuda/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# nvcc accepts host compilers up to a fixed GCC version; a newer distribution GCC is let through.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -allow-unsupported-compiler"
echo "nvcc: $(nvcc --version | tail -1); compute capability $CUDA_COMPUTE_CAP; target dir $CARGO_TARGET_DIR"
cd "$root"
# candle links cudarc with `dynamic-linking`, so the final link needs the driver library
# libcuda.so, which ships with the NVIDIA driver and in no PyPI wheel. Without it (a machine with
# no GPU driver, like the CI one) everything up to the link is built: `cargo check` runs the
# build scripts (nvcc compiles candle's kernels for sm_$CUDA_COMPUTE_CAP) and type-checks every
# crate with the feature on, ours included.
driver="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so[ .]/ {print $NF; exit}')"
if [ -n "$driver" ] || [ "${ITAMAE_CUDA_LINK:-}" = 1 ]; then
  cargo build --release --features itamae-daemon/cuda -p itamae-daemon --bins
  echo "built: $CARGO_TARGET_DIR/release/itamaed (cuda, sm_$CUDA_COMPUTE_CAP)"
else
  cargo check --release --features itamae-daemon/cuda -p itamae-daemon --all-targets
  echo "checked (no libcuda.so here, so not linked): the cuda feature compiles, kernels for sm_$CUDA_COMPUTE_CAP"
fi
