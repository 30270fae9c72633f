#!/usr/bin/env python3
"""The side-by-side table of a GPU run: candela.jsonl and diffusers.jsonl (from run.sh) as one
markdown table, model by model, with candela / diffusers ratios.

Usage: python3 compare.py CANDELA_DIR DIFFUSERS_DIR   (the folders holding the two .jsonl files)
"""
import json
import sys
from pathlib import Path

FIELDS = [("text_encode_ms", "text encoding ms"), ("denoiser_step_ms", "denoiser step ms"),
          ("vae_decode_ms", "VAE decode ms"), ("vae_encode_ms", "VAE encode ms"), ("end_to_end_s", "end-to-end s"),
          ("weights_gib", "weights GiB"), ("peak_gib", "peak GiB"),
          ("process_peak_gib", "process peak resident GiB (host)")]


def load(folder, name):
    path = Path(folder) / name
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["model"]: row for row in rows}


def show(v):
    return "-" if v is None else f"{v:.2f}"


def main():
    ours = load(sys.argv[1], "candela.jsonl")
    # A third call's folder (run.sh late: the late candidates and the large image) adds its rows.
    for more in sys.argv[3:]:
        ours.update(load(more, "candela.jsonl"))
    theirs = load(sys.argv[2], "diffusers.jsonl")
    print("| model | shape | metric | candela | diffusers | candela / diffusers |")
    print("|---|---|---|---|---|---|")
    for model in list(ours) + [m for m in theirs if m not in ours]:
        # Rows with a suffix: "(N steps)" runs on both sides compare whole; a candidate's
        # "(flag=value)" run (one step) compares its per-step figures with diffusers' same model;
        # a large image "(2048², …)" has no diffusers counterpart.
        o = ours.get(model, {})
        t = theirs.get(model)
        fields = FIELDS
        if t is None and "=" in model:
            t = theirs.get(model.split(" (")[0], {})
            fields = [f for f in FIELDS if f[0] in ("denoiser_step_ms", "vae_decode_ms")]
        t = t or {}
        row = o or t
        shape = f"{row['width']}x{row['height']} batch {row['batch']}"
        for key, name in fields:
            a, b = o.get(key), t.get(key)
            ratio = f"{a / b:.2f}x" if a is not None and b else "-"
            print(f"| {model} | {shape} | {name} | {show(a)} | {show(b)} | {ratio} |")
    candidates(ours, theirs)
    graphs(sys.argv[1])
    kernel_tables(sys.argv[1], sys.argv[2])
    # --profile: per-module inclusive times (device synchronised at each module), both sides.
    for model in ours:
        for key, part in [("denoiser_profile", "denoiser forward"), ("vae_profile", "VAE decode")]:
            mine = ours[model].get(key) or []
            other = {r["label"]: r for r in theirs.get(model, {}).get(key) or []}
            if not mine and not other:
                continue
            print(f"\n{model}: {part} by module (ms per pass)")
            print("| module | calls | candela | diffusers calls | diffusers | ratio |")
            print("|---|---|---|---|---|---|")
            for r in mine:
                t = other.pop(r["label"], None)
                ratio = f"{r['ms'] / t['ms']:.2f}x" if t and t["ms"] else "-"
                print(f"| {r['label']} | {r['calls']} | {r['ms']:.2f} | {t['calls'] if t else '-'} | "
                      f"{show(t['ms'] if t else None)} | {ratio} |")
            for t in other.values():
                print(f"| {t['label']} | - | - | {t['calls']} | {t['ms']:.2f} | - |")


def kernel_tables(our_dir, their_dir, top=12):
    """The kernel tables of run.sh (kernel-table-<model>.json on each side): per timed part, the
    device's busy and idle time, the time by kind of kernel, and each side's heaviest kernels."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernel_table import category
    for path in sorted(Path(our_dir).glob("kernel-table-*.json")):
        model = path.stem.removeprefix("kernel-table-")
        ours = json.loads(path.read_text())["windows"]
        other = Path(their_dir) / path.name
        theirs = json.loads(other.read_text())["windows"] if other.exists() else {}
        for part, mine in ours.items():
            them = theirs.get(part, {})
            print(f"\n{model}: {part}, kernel by kernel (ms per pass; device traced, so walls run long)")
            print("| | candela | diffusers | ratio |")
            print("|---|---|---|---|")
            by_kind = [("wall", mine["wall_ms"], them.get("wall_ms")),
                       ("device busy", mine["busy_ms"], them.get("busy_ms")),
                       ("device idle", mine["wall_ms"] - mine["busy_ms"],
                        them["wall_ms"] - them["busy_ms"] if them else None),
                       ("kernels launched", sum(k["calls"] for k in mine["kernels"]),
                        sum(k["calls"] for k in them["kernels"]) if them else None)]
            kinds = {}
            for side, table in ((0, mine), (1, them)):
                for k in table.get("kernels", []):
                    kinds.setdefault(category(k["name"]), [0.0, 0.0])[side] += k["ms"]
            by_kind += [(kind, a, b if them else None) for kind, (a, b) in sorted(kinds.items(), key=lambda kv: -kv[1][0])]
            for name, a, b in by_kind:
                ratio = f"{a / b:.2f}x" if b else "-"
                print(f"| {name} | {a:.2f} | {show(b)} | {ratio} |")
            for side, table in (("candela", mine), ("diffusers", them)):
                if not table.get("kernels"):
                    continue
                print(f"\n{side}, heaviest kernels of {model} {part}")
                print("| kernel | kind | calls | ms |")
                print("|---|---|---|---|")
                for k in table["kernels"][:top]:
                    name = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
                    print(f"| `{name}` | {category(k['name'])} | {k['calls']:.0f} | {k['ms']:.3f} |")


def graphs(our_dir):
    """The CUDA-graph experiment (graphs.jsonl): the forward replayed, and a generation's steps."""
    path = Path(our_dir) / "graphs.jsonl"
    if not path.exists():
        return
    print("\nCUDA graphs (f16): denoiser forward eager / replayed, then a generation eager / with replayed steps")
    print("| model | forward ms | replayed ms | steps | end-to-end s | with graph steps s | latents max diff | error |")
    print("|---|---|---|---|---|---|---|---|")
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        diff = r.get("graph_latents_max_diff")
        print(f"| {r['model']} | {show(r.get('denoiser_step_ms'))} | {show(r.get('graph_ms'))} | {r.get('steps', '-')} | "
              f"{show(r.get('end_to_end_s'))} | {show(r.get('end_to_end_graph_s'))} | "
              f"{'-' if diff is None else f'{diff:.2e}'} | {r.get('error') or ''} |")


def candidates(ours, theirs):
    """Each candidate flag's run ("<model> (flag=value)") against the default run of the same
    model: which one to make the default."""
    rows = []
    for model, row in ours.items():
        if " (" not in model or "=" not in model:
            continue
        base_name, flag = model.split(" (", 1)
        base = ours.get(base_name, {})
        diffusers = theirs.get(base_name, {})
        for key, name in [("denoiser_step_ms", "denoiser step ms"), ("denoiser_step_graph_ms", "replayed step ms"),
                          ("vae_decode_ms", "VAE decode ms")]:
            # A replayed step (--cuda-graph) against the default's eager step.
            a, b, t = row.get(key), base.get(key.replace("_graph", "")), diffusers.get(key.replace("_graph", ""))
            if a is None or b is None:
                continue
            rows.append(f"| {flag.rstrip(')')} | {base_name} | {name} | {b:.2f} | {a:.2f} | {a / b:.2f}x | "
                        + (f"{a / t:.2f}x |" if t else "- |"))
    if rows:
        print("\nCandidates against the default (same binary, same card)")
        print("| candidate | model | metric | default | candidate | candidate / default | candidate / diffusers |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
