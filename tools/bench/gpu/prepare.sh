#!/usr/bin/env bash
# Run here (no GPU needed): fills the git-ignored .gpu/ with what the two device calls carry.
#   .gpu/bin/candela-bench.xz   the CUDA build of `candela-bench` (cuda + cudnn, sm_90), stripped
#   .gpu/wheels/                 diffusers (pure Python) for the GPU machine's torch
# The repository itself travels too (~53 MB of it, fixtures mostly) and everything must stay under
# 64 MiB, so the binary and the wheels go in separate calls (see run.sh).
set -euo pipefail
cd "$(dirname "$0")/../../.."
CARGO_TARGET_DIR="$PWD/target/cuda" ../shared/gpu/build-cuda.sh build --release --features cuda,cudnn --bin candela-bench
mkdir -p .gpu/bin .gpu/wheels
strip -o .gpu/bin/candela-bench target/cuda/release/candela-bench
xz -T0 -9e -f .gpu/bin/candela-bench
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d .gpu/wheels diffusers==0.42.1 importlib_metadata zipp
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for part in .gpu/bin .gpu/wheels; do
    size=$(du -sb "$part" | cut -f1)
    total=$((tree + size))
    printf '%-12s %6.1f MB; with the tree %6.1f MB of 67.1 MB\n' "$part" "$(echo "$size/1000000" | bc -l)" \
        "$(echo "$total/1000000" | bc -l)"
    [ "$total" -lt 67108864 ] || { echo "too large to travel: $part" >&2; exit 1; }
done
