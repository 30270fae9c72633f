#!/usr/bin/env python3
"""PyTorch's side of `candela bench --kernels` on a GPU: reads candela's JSON lines (op, shape,
variant, ms), times the same ops at the same shapes in PyTorch as diffusers runs them (eager,
cudnn.benchmark off, SDPA; the conv also with cudnn.benchmark on) and prints one table:
candela's fastest variant, the heuristic one, torch's, and the ratio.

  python3 kernels_torch.py candela-kernels.jsonl --dtype f16 [--device cuda] [--out torch-kernels.jsonl]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def time_ms(f, sync, repeats):
    f()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def torch_op(op, shape, device, dtype):
    """A callable running `op` at `shape` as diffusers/torch would, or None if unknown."""
    randn = lambda *dims, std=1.0: torch.randn(*dims, device=device, dtype=dtype) * std
    if op == "conv3x3":
        b, ci, co, s = shape
        x, k = randn(b, ci, s, s), randn(co, ci, 3, 3, std=0.02)
        bias = randn(co)
        return lambda: F.conv2d(x, k, bias, padding=1)
    if op == "sdpa":
        b, h, n, m, d = shape
        q, k, v = randn(b, h, n, d), randn(b, h, m, d), randn(b, h, m, d)
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if op == "group_norm_silu":
        x = randn(*shape)
        w, bias = randn(shape[1]), randn(shape[1])
        return lambda: F.silu(F.group_norm(x, 32, w, bias, 1e-5))
    if op == "layer_norm":
        x = randn(*shape)
        w, bias = randn(shape[1]), randn(shape[1])
        return lambda: F.layer_norm(x, (shape[1],), w, bias, 1e-5)
    if op == "layer_norm_modulate":  # diffusers' AdaLayerNormZero: norm, then x * (1 + scale) + shift
        b, n, width = shape
        x, shift, scale = randn(b, n, width), randn(b, width), randn(b, width, std=0.5)
        return lambda: F.layer_norm(x, (width,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    if op in ("gelu_erf", "gelu_tanh"):
        x = randn(*shape)
        approximate = "none" if op == "gelu_erf" else "tanh"
        return lambda: F.gelu(x, approximate=approximate)
    if op == "geglu":
        x = randn(*shape)
        return lambda: (lambda a, g: a * F.gelu(g))(*x.chunk(2, dim=-1))
    if op == "linear":
        n, i, o = shape
        x, w, bias = randn(1, n, i), randn(o, i, std=0.02), randn(o, std=0.02)
        return lambda: F.linear(x, w, bias)
    if op == "add":
        x = randn(*shape)
        return lambda: x + x
    if op == "transpose_copy":
        x = randn(*shape)
        return lambda: x.t().contiguous()
    if op == "tiny_add_x1000":
        a = randn(*shape)

        def adds():
            x = a
            for _ in range(1000):
                x = x + a
            return x
        return adds
    if op == "cast_to_f32":
        x = randn(*shape)
        return lambda: x.float()
    return None


def sdpa_backends(op, shape, device, dtype, sync, repeats):
    """For attention: each of PyTorch's SDPA backends forced in turn (what its default picks
    among), ms or None where the backend refuses the shape."""
    if op != "sdpa" or device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    f = torch_op(op, shape, device, dtype)
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with torch.no_grad(), sdpa_kernel(backend):
                out[name.lower()] = time_ms(f, sync, repeats)
        except RuntimeError:
            out[name.lower()] = None
    torch.cuda.empty_cache()
    return out


def attention_rates(results):
    """Attention in TFLOP/s (4·b·h·n·m·d per call): every candela kernel and every torch backend."""
    rows = [r for r in results if r["op"] == "sdpa"]
    if not rows:
        return
    names = sorted({k for r in rows for k in r["candela"]})
    backends = sorted({k for r in rows for k in r["torch_backends"]})
    print("\nAttention, TFLOP/s")
    header = ["shape"] + names + ["torch"] + [f"torch {b}" for b in backends]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        b, h, n, m, d = r["shape"]
        flops = 4 * b * h * n * m * d
        rate = lambda ms: "-" if not ms else f"{flops / (ms * 1e-3) / 1e12:.3g}"
        cells = [rate(r["candela"].get(k)) for k in names] + [rate(r["torch_ms"])]
        cells += [rate(r["torch_backends"].get(k)) for k in backends]
        print(f"| {r['shape']} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("candela")
    ap.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    groups = {}
    for line in open(args.candela):
        if line.strip():
            row = json.loads(line)
            groups.setdefault((row["op"], tuple(row["shape"])), []).append(row)
    results = []
    print(f"| op | shape | candela best (variant) | candela as the models run it | torch | torch cudnn.benchmark | best / torch |")
    print("|---|---|---|---|---|---|---|")
    for (op, shape), rows in groups.items():
        f = torch_op(op, list(shape), device, dtype)
        theirs = bench = None
        if f is not None:
            try:
                with torch.no_grad():
                    torch.backends.cudnn.benchmark = False
                    theirs = time_ms(f, sync, args.repeats)
                    if op == "conv3x3":
                        torch.backends.cudnn.benchmark = True
                        bench = time_ms(f, sync, args.repeats)
                        torch.backends.cudnn.benchmark = False
            except RuntimeError as e:  # out of memory at the largest shapes on a small card
                print(f"torch {op} {shape}: {e}".splitlines()[0])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        backends = sdpa_backends(op, list(shape), device, dtype, sync, args.repeats)
        timed = [r for r in rows if r.get("ms") is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        first = rows[0]  # the variant the models run (heuristic for the convolutions)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        ratio = f"{best['ms'] / theirs:.2f}x" if best and theirs else "-"
        print(f"| {op} | {list(shape)} | {fmt(best and best['ms'])} ({best['variant'] if best else '-'}) | "
              f"{fmt(first.get('ms'))} | {fmt(theirs)} | {fmt(bench)} | {ratio} |")
        results.append({"op": op, "shape": list(shape), "torch_ms": theirs, "torch_benchmark_ms": bench,
                        "torch_backends": backends, "candela": {r["variant"]: r.get("ms") for r in rows}})
    attention_rates(results)
    if args.out:
        with open(args.out, "w") as out:
            for r in results:
                out.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
