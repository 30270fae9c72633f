#!/usr/bin/env python3
"""diffusers' side of `candela bench`: the same configs (random weights), the same measurements.

Usage: .venv/bin/python bench_diffusers.py [--configs ../../benches/sd15] [--steps 4] [--out diffusers.json]
Then:  candela bench --reference diffusers.json
Runs on CPU in float32 with torch's default thread count (all cores), like candela.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def main():
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=str(here.parent.parent / "benches" / "sd15"))
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="diffusers.json")
    args = ap.parse_args()
    root = Path(args.configs)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text())).eval()
    vae = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text())).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**json.loads((root / "text_encoder/config.json").read_text()))).eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    scheduler = EulerDiscreteScheduler.from_config(json.loads((root / "scheduler/scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, None, None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    h, w = args.height // 8, args.width // 8
    sample = torch.randn(2, 4, h, w)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    times = []
    with torch.no_grad():
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            unet(sample, 500.0, encoder_hidden_states=context)
            dt = (time.perf_counter() - t) * 1000
            print(f"unet forward {i}: {dt:.0f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
            if i > 0:
                times.append(dt)
        t = time.perf_counter()
        vae.decode(sample[:1])
        vae_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        pipe("a photo of a cat", width=args.width, height=args.height, num_inference_steps=args.steps, guidance_scale=7.5)
        e2e = time.perf_counter() - t
    figures = {
        "unet_step_ms": statistics.median(times),
        "vae_decode_ms": vae_ms,
        "end_to_end_s": e2e,
        "steps": args.steps,
        "width": args.width,
        "height": args.height,
        "label": f"diffusers {__import__('diffusers').__version__} torch {torch.__version__} cpu f32 threads={torch.get_num_threads()}",
    }
    Path(args.out).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
