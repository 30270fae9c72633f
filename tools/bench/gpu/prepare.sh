#!/usr/bin/env bash
# Run here (no GPU needed): fills the git-ignored .gpu/ with what the two device calls carry.
#   .gpu/bin/candela-bench.xz   the CUDA build of `candela-bench` (cuda + cudnn, sm_90), stripped
#   .gpu/bin/libkerneltrace.so  the CUPTI kernel tracer (tools/cuda/kernel_trace.c), built against
#                                CUDA 13.0's CUPTI (the GPU machine's driver), found there in torch's libraries
#   .gpu/wheels/                 diffusers (pure Python) for the GPU machine's torch
# The repository itself travels too (~53 MB of it, fixtures mostly) and everything must stay under
# 64 MiB, so the binary and the wheels go in separate calls (see run.sh).
set -euo pipefail
cd "$(dirname "$0")/../../.."
CARGO_TARGET_DIR="$PWD/target/cuda" ../shared/gpu/build-cuda.sh build --release --features cuda,cudnn --bin candela-bench
mkdir -p .gpu/bin .gpu/wheels
strip -o .gpu/bin/candela-bench target/cuda/release/candela-bench
xz -T0 -9e -f .gpu/bin/candela-bench
cupti=.gpu/build/cupti
if [ ! -f "$cupti/nvidia/cu13/include/cupti.h" ]; then
    mkdir -p "$cupti"
    python3 -m pip download -q --no-deps -d "$cupti" nvidia-cuda-cupti==13.0.85
    python3 -m zipfile -e "$cupti"/nvidia_cuda_cupti-*.whl "$cupti"
fi
cc -O2 -Wall -shared -fPIC -I"$cupti/nvidia/cu13/include" -I"${CUDA_CACHE:-$HOME/.cache/cuda-13.0}/nvidia/cu13/include" \
    tools/cuda/kernel_trace.c -o .gpu/bin/libkerneltrace.so -L"$cupti/nvidia/cu13/lib" -l:libcupti.so.13 -lpthread
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d .gpu/wheels diffusers==0.42.1 importlib_metadata zipp
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for part in .gpu/bin .gpu/wheels; do
    size=$(du -sb "$part" | cut -f1)
    total=$((tree + size))
    printf '%-12s %6.1f MB; with the tree %6.1f MB of 67.1 MB\n' "$part" "$(echo "$size/1000000" | bc -l)" \
        "$(echo "$total/1000000" | bc -l)"
    # Most of the binary's size is candle-kernels' MoE fatbin (libmoe.a, 33 MB before xz),
    # linked because candle-nn refers to it. The sampler traces are gzipped for the same reason
    # (9.4 → 6.0 MB); way out if it grows again: they are not used on the GPU — move
    # tests/fixtures/samplers/traces.safetensors.gz out of the tree for that call.
    [ "$total" -lt 67108864 ] || { echo "too large to travel: $part (see the comment above this line)" >&2; exit 1; }
done
