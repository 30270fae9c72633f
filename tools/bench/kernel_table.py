#!/usr/bin/env python3
"""What one timed part (a denoiser forward, a VAE decode, a prompt encoding) runs on the GPU,
kernel by kernel, in one JSON format for both sides of the GPU benchmark:

* candela: the trace of tools/cuda/kernel_trace.c (preloaded into candela-bench with CUPTI),
  `python3 kernel_table.py TRACE.tsv --label L --out TABLE.json`;
* diffusers: `bench_diffusers.py --kernel-trace TABLE.json` (torch.profiler), through `summarize`.

A table: {"label", "windows": {part: {"count", "wall_ms", "busy_ms", "kernels": [{"name",
"calls", "ms"}]}}}, every figure per window (the mean over the windows of that part). busy_ms is
the time at least one kernel ran (the union of their intervals): wall − busy is the device idle,
waiting for the host. tools/bench/gpu/compare.py sets the two tables side by side by category
(`category`) and kernel.
"""
import argparse
import json
import re
import shutil
import subprocess
from collections import defaultdict

COPY_KINDS = {1: "HtoD", 2: "DtoH", 8: "DtoD", 9: "HtoH", 10: "PtoP"}


def op_name(name):
    """One name for the same copy or memset on both sides (torch adds the memory kinds)."""
    if name.startswith("Memcpy"):
        return " ".join(name.split()[:2])
    if name.startswith("Memset"):
        return "Memset"
    return name


def summarize(windows):
    """windows: [(part, wall_ms, [(name, start, end) in ns])] → the table's "windows"."""
    parts = defaultdict(list)
    for part, wall_ms, kernels in windows:
        parts[part].append((wall_ms, kernels))
    table = {}
    for part, runs in parts.items():
        n = len(runs)
        calls, ns = defaultdict(int), defaultdict(int)
        busy = 0
        for _, kernels in runs:
            for name, start, end in kernels:
                calls[op_name(name)] += 1
                ns[op_name(name)] += end - start
            busy += union_ns(kernels)
        rows = [{"name": k, "calls": calls[k] / n, "ms": ns[k] / n / 1e6} for k in ns]
        rows.sort(key=lambda r: -r["ms"])
        table[part] = {"count": n, "wall_ms": sum(w for w, _ in runs) / n, "busy_ms": busy / n / 1e6,
                       "kernels": rows}
    return table


def union_ns(kernels):
    total, reach = 0, None
    for _, start, end in sorted(kernels, key=lambda k: k[1]):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def read_trace(path):
    """The windows of a kernel_trace.c file: every record that lies inside a B…E pair."""
    records, windows, open_at, dropped = [], [], {}, 0
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            kind = fields[0]
            if kind == "K":
                records.append((fields[3], int(fields[1]), int(fields[2])))
            elif kind == "C":
                records.append((f"Memcpy {COPY_KINDS.get(int(fields[4]), fields[4])}", int(fields[1]), int(fields[2])))
            elif kind == "S":
                records.append(("Memset", int(fields[1]), int(fields[2])))
            elif kind == "B":
                open_at[fields[2]] = int(fields[1])
            elif kind == "E" and fields[2] in open_at:
                windows.append((fields[2], open_at.pop(fields[2]), int(fields[1])))
            elif kind == "D":
                dropped += int(fields[1])
    out = []
    for part, begin, end in windows:
        inside = [r for r in records if r[1] >= begin and r[2] <= end]
        out.append((part, (end - begin) / 1e6, inside))
    return out, dropped


def demangle(names):
    """C++ kernel names as source reads them (c++filt where the machine has it)."""
    mangled = sorted({n for n in names if n.startswith("_Z")})
    if not mangled or not shutil.which("c++filt"):
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout
    return dict(zip(mangled, out.splitlines()))


# First match wins: attention before convolution (cuDNN's SDPA kernels say "fprop" too),
# convolution before GEMM (its kernels say "implicit_gemm").
CATEGORIES = [
    ("attention", r"flash|fmha|sdpa|attention|attn"),
    ("convolution", r"conv|fprop|dgrad|wgrad|winograd|implicit|cudnn"),
    ("matmul", r"gemm|gemv|cublas|cutlass|nvjet|matmul|s16816|h16816|splitk|xmma"),
    ("normalisation", r"norm|rms"),
    ("copy / cast", r"memcpy|copy|cast|transpose|cat_|catarray|contiguous|ucopy|index|gather|scatter"),
    ("memset / fill", r"memset|fill"),
]


def category(name):
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "element-wise / other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--label", default="candela")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    windows, dropped = read_trace(args.trace)
    table = {"label": args.label, "windows": summarize(windows)}
    names = demangle([k["name"] for w in table["windows"].values() for k in w["kernels"]])
    for w in table["windows"].values():
        for k in w["kernels"]:
            k["name"] = names.get(k["name"], k["name"])
    if dropped:
        table["dropped_records"] = dropped
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    for part, w in table["windows"].items():
        print(f"{args.label} {part}: {w['count']} windows, {w['wall_ms']:.2f} ms wall, {w['busy_ms']:.2f} ms busy, "
              f"{sum(k['calls'] for k in w['kernels']):.0f} kernels each")


if __name__ == "__main__":
    main()
