#!/usr/bin/env python3
"""diffusers' tiled VAE decode and encode (`AutoencoderKL.enable_tiling()`) on the tiny SD VAE,
for tests/parity_components.rs. Same rules as make_fixtures.py: pinned versions, CPU, float32, seeded,
byte-identical on re-runs.

The tiny VAE's config has sample_size 64 and 4 blocks: tiles of 8 latents (64 pixels) every 6
latents, blended over 16 pixels. Latents of 14 × 10 make a 3 × 2 grid with short edge tiles.

Usage:  .venv/bin/python make_vae_tiling_fixture.py [--out ../../tests/fixtures]
Output: stages/vae_tiled.safetensors  {latents, tiled, image, mean, std}
"""
import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
    out = Path(ap.parse_args().out)
    vae = AutoencoderKL.from_pretrained(out / "models" / "sd1-tiny" / "vae").eval()
    gen = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 14, 10, generator=gen)
    image = torch.rand(1, 3, 112, 80, generator=gen) * 2 - 1
    with torch.no_grad():
        whole = vae.decode(latents).sample
        whole_mean = vae.encode(image).latent_dist.mean
        vae.enable_tiling()
        tiled = vae.decode(latents).sample
        dist = vae.encode(image).latent_dist
    assert (tiled - whole).abs().max() > 1e-3, "tiling changed nothing: the test would not see it"
    assert (dist.mean - whole_mean).abs().max() > 1e-3, "tiled encoding changed nothing"
    save_file({"latents": latents.contiguous(), "tiled": tiled.contiguous(), "image": image.contiguous(),
               "mean": dist.mean.contiguous(), "std": dist.std.contiguous()},
              out / "stages" / "vae_tiled.safetensors")
    print("tiled vs whole max |Δ|:", (tiled - whole).abs().max().item(), "shape", tuple(tiled.shape))


if __name__ == "__main__":
    main()
