#!/usr/bin/env python3
"""Parameter counts of the real SD3 / SD3.5 / FLUX.1 components, from their published configs
(instantiated on torch's meta device: no weights, no download). The numbers feed the memory
table in docs/memory.md; candela itself reads exact sizes from the safetensors headers.

Usage: .venv/bin/python model_sizes.py
"""
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
                  pooled_projection_dim=2048, out_channels=16)
TRANSFORMERS = {
    "sd3-medium": (SD3Transformer2DModel, dict(SD3_COMMON, num_layers=24, num_attention_heads=24,
                                               caption_projection_dim=1536, pos_embed_max_size=192)),
    "sd3.5-medium": (SD3Transformer2DModel, dict(SD3_COMMON, num_layers=24, num_attention_heads=24,
                                                 caption_projection_dim=1536, pos_embed_max_size=384,
                                                 qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "sd3.5-large": (SD3Transformer2DModel, dict(SD3_COMMON, num_layers=38, num_attention_heads=38,
                                                caption_projection_dim=2432, pos_embed_max_size=192,
                                                qk_norm="rms_norm")),
    "flux.1-dev": (FluxTransformer2DModel, dict(guidance_embeds=True)),
    "flux.1-schnell": (FluxTransformer2DModel, dict(guidance_embeds=False)),
}


def count(module):
    # Buffers saved with the weights (SD3's position table) count too.
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def main():
    with torch.device("meta"):
        encoders = {
            "clip-l": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                 num_hidden_layers=12, num_attention_heads=12,
                                                                 projection_dim=768)),
            "clip-g": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                                 num_hidden_layers=32, num_attention_heads=20,
                                                                 projection_dim=1280, hidden_act="gelu")),
            "t5-xxl": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                              num_heads=64, feed_forward_proj="gated-gelu")),
            "vae16": AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4,
                                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                                   use_quant_conv=False, use_post_quant_conv=False),
        }
        for name, (cls, cfg) in TRANSFORMERS.items():
            encoders[name] = cls(**cfg)
    print(f"{'component':16} {'parameters':>14} {'bf16 GiB':>9}")
    for name, module in encoders.items():
        n = count(module)
        print(f"{name:16} {n:14,d} {n * 2 / 2**30:9.2f}")


if __name__ == "__main__":
    main()
