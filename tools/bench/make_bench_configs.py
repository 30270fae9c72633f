#!/usr/bin/env python3
"""Writes benches/<model>/: the real architectures' configs (no weights) in the diffusers layout, for
`candela bench --configs benches/<model>` and `bench_diffusers.py`, which both build them with random
weights. Configs come from the published repos' values, saved by diffusers / transformers themselves
(so every default is spelled out); tokenizers are the tiny test vocabularies (token ids only index an
embedding table, so speed does not depend on them).

Usage: tools/reference/.venv/bin/python tools/bench/make_bench_configs.py
"""
import json
import shutil
from pathlib import Path

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler,
                       FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel)
from transformers import CLIPTextConfig, T5Config

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, sample_size=1024)
VAE16 = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def clip(folder, cfg, with_projection):
    config = CLIPTextConfig(**cfg)
    config.architectures = ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
    config.save_pretrained(folder)


def t5(folder):
    config = T5Config(**T5_XXL)
    config.architectures = ["T5EncoderModel"]
    config.save_pretrained(folder)


def copy_from(fixture, out, names):
    for name in names:
        shutil.copytree(FIXTURES / fixture / name, out / name, dirs_exist_ok=True)


def sdxl(out):
    shutil.copy(FIXTURES / "sdxl-tiny" / "model_index.json", out / "model_index.json")
    copy_from("sdxl-tiny", out, ["tokenizer", "tokenizer_2"])
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1).save_config(out / "scheduler")
    clip(out / "text_encoder", CLIP_L, False)
    clip(out / "text_encoder_2", CLIP_G, True)
    unet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    write_model_config(UNet2DConditionModel, unet, out / "unet")
    write_model_config(AutoencoderKL, dict(VAE, latent_channels=4, scaling_factor=0.13025,
                                           force_upcast=True), out / "vae")


def sd3(out, transformer):
    """An SD3 pipeline folder; `transformer`: what sets the model apart from the shared SD3 layout."""
    shutil.copy(FIXTURES / "sd3-tiny" / "model_index.json", out / "model_index.json")
    copy_from("sd3-tiny", out, ["tokenizer", "tokenizer_2", "tokenizer_3"])
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(out / "scheduler")
    clip(out / "text_encoder", CLIP_L, True)
    clip(out / "text_encoder_2", CLIP_G, True)
    t5(out / "text_encoder_3")
    write_model_config(SD3Transformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
        pooled_projection_dim=2048, out_channels=16, qk_norm="rms_norm", **transformer), out / "transformer")
    write_model_config(AutoencoderKL, dict(VAE16, scaling_factor=1.5305, shift_factor=0.0609), out / "vae")


def sd35_large(out):
    sd3(out, dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192))


def sd35_medium(out):
    """SD3.5 Medium (MMDiT-X: dual attention in the first 13 blocks), the SD3 a CPU runs."""
    sd3(out, dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                  dual_attention_layers=tuple(range(13))))


def flux_dev(out):
    shutil.copy(FIXTURES / "flux-dev-tiny" / "model_index.json", out / "model_index.json")
    copy_from("flux-dev-tiny", out, ["tokenizer", "tokenizer_2"])
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_config(out / "scheduler")
    clip(out / "text_encoder", CLIP_L, False)
    t5(out / "text_encoder_2")
    write_model_config(FluxTransformer2DModel, dict(guidance_embeds=True), out / "transformer")
    write_model_config(AutoencoderKL, dict(VAE16, scaling_factor=0.3611, shift_factor=0.1159), out / "vae")


def write_model_config(cls, kwargs, folder):
    """The config diffusers would save for `cls(**kwargs)`, without building the model."""
    folder.mkdir(parents=True, exist_ok=True)
    import inspect
    params = inspect.signature(cls.__init__).parameters
    config = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    config.update(kwargs)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    import diffusers
    config = {"_class_name": cls.__name__, "_diffusers_version": diffusers.__version__, **config}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main():
    for name, build in [("sdxl", sdxl), ("sd35-large", sd35_large), ("sd35-medium", sd35_medium), ("flux-dev", flux_dev)]:
        out = ROOT / "benches" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        build(out)
        print("wrote", out.relative_to(ROOT))


if __name__ == "__main__":
    main()
