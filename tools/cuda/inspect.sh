#!/usr/bin/env bash
# What ptxas made of our CUDA kernels, without a GPU: registers, spills and ptxas' performance
# warnings (e.g. C7512, wgmma serialised for want of registers) per kernel, and with --sass the
# count of the instructions that matter per kernel (tensor-core ops, waits, barriers, async
# copies, exponentials).
#
#   tools/cuda/inspect.sh src/engine/cuda/attention_hopper.cu [sm_90a] [--sass]
#
# nvcc comes from ../shared/gpu/build-cuda.sh's install (~/.cache/cuda-13.0); cuobjdump and
# nvdisasm (for --sass) are fetched from PyPI once into ~/.cache/cuda-tools.
set -euo pipefail
source=${1:?a .cu file}
arch=${2:-sm_90a}
sass=${3:-}
CU=${CUDA_CACHE:-$HOME/.cache/cuda-13.0}/nvidia/cu13
[ -x "$CU/bin/nvcc" ] || { echo "no nvcc: run ../shared/gpu/build-cuda.sh once (it installs it)" >&2; exit 1; }
export PATH=$CU/bin:$CU/nvvm/bin:$PATH
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvcc --cubin -O3 -std=c++17 -arch="$arch" -Xptxas -v "$source" -o "$work/k.cubin" 2> "$work/ptxas.txt"
# One line per kernel: name, registers, spill bytes; then any warning ptxas gave.
awk '/Compiling entry function/ { name = $7; gsub(/\x27/, "", name) }
     /spill stores/ { spill = $5 + $9 }
     /Used [0-9]+ registers/ { printf "%-45s %4d registers, %d bytes spilled\n", name, $5, spill }' "$work/ptxas.txt"
grep -i "warning\|performance loss" "$work/ptxas.txt" || true
[ "$sass" = "--sass" ] || exit 0
tools=$HOME/.cache/cuda-tools
if [ ! -x "$tools/bin/nvdisasm" ]; then
    mkdir -p "$tools/bin"
    python3 -m pip download -q --no-deps -d "$work/whl" nvidia-cuda-cuobjdump==13.2.78 nvidia-cuda-nvdisasm==13.5.37
    for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/x"; done
    find "$work/x" -type f \( -name cuobjdump -o -name nvdisasm \) -exec cp {} "$tools/bin/" \;
    chmod +x "$tools/bin/"*
fi
export PATH=$tools/bin:$PATH
for kernel in $(awk '/Compiling entry function/ { gsub(/\x27/, "", $7); print $7 }' "$work/ptxas.txt"); do
    cuobjdump -sass -fun "$kernel" "$work/k.cubin" > "$work/s.txt"
    counts=$(grep -o 'HGMMA[^ ]*\|HMMA[^ ]*\|WARPGROUP[^ ]*\|BAR\.SYNC[^ ]*\|LDGSTS[^ ]*\|LDSM[^ ]*\|MUFU\.EX2' "$work/s.txt" |
        sort | uniq -c | awk '{ printf "%s×%s ", $2, $1 }')
    printf '%-45s %s\n' "$kernel" "$counts"
done
