#!/usr/bin/env python3
"""Tiny diffusion-transformer pipelines (SD3 / SD3.5, FLUX.1) and diffusers' outputs for them.

Same rules as make_fixtures.py (whose helpers this reuses): diffusers/transformers/torch at the
pinned versions, CPU, float32, seeded, byte-identical on re-runs.

Usage:  .venv/bin/python make_dit_fixtures.py [--sd3] [--flux] [--out ../../tests/fixtures]

Outputs:
  models/sd3-tiny/     SD3-medium-shaped: MMDiT, CLIP-L + CLIP-G (projections) + T5, 16-ch VAE
  models/sd35m-tiny/   SD3.5-medium-shaped: MMDiT-X (dual attention layers), qk RMS-norm
  stages/sd3.safetensors, stages/sd35m.safetensors   prompt encoding, transformer forwards, VAE
  runs/sd3_runs.json + runs/<name>.safetensors + PNGs  whole pipeline runs
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from make_fixtures import build_t5, init_image, jitter_1d_params, restore_clip_layout, write_tiny_tokenizer

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def tiny_clip_pair(root: Path, gen: torch.Generator):
    """CLIP-L-like and OpenCLIP-G-like encoders, both with projections (SD3 uses both pooled
    projections), in `text_encoder`/`text_encoder_2` + tokenizers padded as the real ones."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_size = write_tiny_tokenizer(root / "tokenizer", "<|endoftext|>")
    write_tiny_tokenizer(root / "tokenizer_2", "!")
    common = dict(vocab_size=vocab_size, intermediate_size=64, num_attention_heads=4, max_position_embeddings=77,
                  bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1, layer_norm_eps=1e-5)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, num_hidden_layers=3, hidden_act="quick_gelu",
                                                     projection_dim=24, **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, num_hidden_layers=4, hidden_act="gelu",
                                                     projection_dim=40, **common)).eval()
    jitter_1d_params(te1, gen)
    jitter_1d_params(te2, gen)
    return (CLIPTokenizer.from_pretrained(root / "tokenizer"), te1,
            CLIPTokenizer.from_pretrained(root / "tokenizer_2"), te2)


def tiny_vae16(gen: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=True).eval()
    jitter_1d_params(vae, gen)
    return vae


# --- SD3 / SD3.5 ---------------------------------------------------------------------------

SD3_VARIANTS = {
    # name: transformer options (SD3-medium: plain MMDiT; SD3.5-medium: MMDiT-X + qk RMS-norm)
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd35m": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1, 2)),
}


def build_sd3(root: Path, variant: str, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokenizer, te1, tokenizer_2, te2 = tiny_clip_pair(root, gen)
    # T5 wider than the two CLIPs' concatenated states (32 + 48), which diffusers pads up to it.
    tokenizer_3, te3 = build_t5(root, seed + 100, d_model=96, tokenizer_folder="tokenizer_3",
                                encoder_folder="text_encoder_3")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=24 + 40, out_channels=16,
        # Larger than the default size's 16×16 patches, so every size crops the table.
        pos_embed_max_size=24, **SD3_VARIANTS[variant]).eval()
    jitter_1d_params(transformer, gen)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae16(gen),
                                    text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=tokenizer_2, text_encoder_3=te3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(root, safe_serialization=True)
    restore_clip_layout(root, [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")],
                        ["text_encoder", "text_encoder_2"])
    return StableDiffusion3Pipeline.from_pretrained(root)


def sd3_stage_fixtures(name: str, pipe, out_dir: Path):
    """Each component on its own: the assembled prompt embeddings (three encoders), transformer
    forwards (plain and with skipped layers) at a non-square size, a VAE decode."""
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt="a red fox in the snow", prompt_2=None, prompt_3=None, negative_prompt="blurry",
            do_classifier_free_guidance=True, max_sequence_length=32)
        pe_skip, _, pooled_skip, _ = pipe.encode_prompt(
            prompt="a red fox in the snow", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=32, clip_skip=1)
        sample = torch.randn((2, 16, 12, 8), generator=g)
        t = torch.tensor([750.0, 750.0])
        context = torch.cat([npe, pe])
        pool = torch.cat([npooled, pooled])
        out = pipe.transformer(sample, encoder_hidden_states=context, pooled_projections=pool, timestep=t).sample
        out_skip = pipe.transformer(sample, encoder_hidden_states=context, pooled_projections=pool, timestep=t,
                                    skip_layers=[1, 2]).sample
        latents = torch.randn((1, 16, 6, 9), generator=g)
        decoded = pipe.vae.decode(latents).sample
    save_file({"prompt_embeds": pe.contiguous(), "negative_prompt_embeds": npe.contiguous(),
               "pooled": pooled.contiguous(), "negative_pooled": npooled.contiguous(),
               "prompt_embeds_clip_skip1": pe_skip.contiguous(), "pooled_clip_skip1": pooled_skip.contiguous(),
               "sample": sample.contiguous(), "timestep": t.contiguous(), "out": out.contiguous(),
               "out_skip_1_2": out_skip.contiguous(), "vae_latents": latents.contiguous(),
               "vae_decoded": decoded.contiguous()}, out_dir / f"{name}.safetensors")


def write_sai_single_file(model_root: Path, out_file: Path):
    """The tiny SD3.5-medium transformer in Stability's single-file naming (`joint_blocks.N.
    x_block` / `context_block`, fused qkv, (shift, scale) final and last-context modulations,
    `model.diffusion_model.` prefix as in `sd3.5_medium.safetensors`); checked by converting it
    back with diffusers' own single-file converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = SD3Transformer2DModel.from_pretrained(model_root / "transformer")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}

    def swap(t):
        scale, shift = t.chunk(2, dim=0)
        return torch.cat([shift, scale])

    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    moves = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for ours, theirs in moves.items():
        for p in ["weight", "bias"]:
            out[f"{theirs}.{p}"] = sd.pop(f"{ours}.{p}")
    for p in ["weight", "bias"]:
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd.pop(f"norm_out.linear.{p}"))
    last = model.config.num_layers - 1
    for i in range(model.config.num_layers):
        b, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for p in ["weight", "bias"]:
            out[x + f"attn.qkv.{p}"] = torch.cat([sd.pop(b + f"attn.to_{q}.{p}") for q in "qkv"])
            out[c + f"attn.qkv.{p}"] = torch.cat([sd.pop(b + f"attn.add_{q}_proj.{p}") for q in "qkv"])
            out[x + f"attn.proj.{p}"] = sd.pop(b + f"attn.to_out.0.{p}")
            out[x + f"mlp.fc1.{p}"] = sd.pop(b + f"ff.net.0.proj.{p}")
            out[x + f"mlp.fc2.{p}"] = sd.pop(b + f"ff.net.2.{p}")
            out[x + f"adaLN_modulation.1.{p}"] = sd.pop(b + f"norm1.linear.{p}")
            context_mod = sd.pop(b + f"norm1_context.linear.{p}")
            out[c + f"adaLN_modulation.1.{p}"] = swap(context_mod) if i == last else context_mod
            if i != last:
                out[c + f"attn.proj.{p}"] = sd.pop(b + f"attn.to_add_out.{p}")
                out[c + f"mlp.fc1.{p}"] = sd.pop(b + f"ff_context.net.0.proj.{p}")
                out[c + f"mlp.fc2.{p}"] = sd.pop(b + f"ff_context.net.2.{p}")
            if i in model.config.dual_attention_layers:
                out[x + f"attn2.qkv.{p}"] = torch.cat([sd.pop(b + f"attn2.to_{q}.{p}") for q in "qkv"])
                out[x + f"attn2.proj.{p}"] = sd.pop(b + f"attn2.to_out.0.{p}")
        if model.config.qk_norm:
            out[x + "attn.ln_q.weight"] = sd.pop(b + "attn.norm_q.weight")
            out[x + "attn.ln_k.weight"] = sd.pop(b + "attn.norm_k.weight")
            out[c + "attn.ln_q.weight"] = sd.pop(b + "attn.norm_added_q.weight")
            out[c + "attn.ln_k.weight"] = sd.pop(b + "attn.norm_added_k.weight")
            if i in model.config.dual_attention_layers:
                out[x + "attn2.ln_q.weight"] = sd.pop(b + "attn2.norm_q.weight")
                out[x + "attn2.ln_k.weight"] = sd.pop(b + "attn2.norm_k.weight")
    assert not sd, sorted(sd)
    out = {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in out.items()})
    reference = model.state_dict()
    assert sorted(back) == sorted(reference), set(back) ^ set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in back), "SAI round trip"
    save_file(out, out_file)


SD3_RUNS = [
    # name, model, seed, (w, h), steps, guidance, n, negative prompt, extra
    ("sd3_cfg_negative", "sd3", 42, (64, 64), 6, 5.0, 1, "blurry", {}),
    ("sd3_nonsquare_n2", "sd3", 7, (48, 80), 5, 4.0, 2, None, {}),
    ("sd3_without_t5", "sd3", 11, (64, 64), 4, 5.0, 1, None, {"t5": False}),
    ("sd3_t5_seq_16", "sd3", 12, (80, 48), 4, 3.5, 1, "dull", {"max_sequence_length": 16}),
    ("sd35m_slg", "sd35m", 13, (64, 64), 8, 5.0, 1, None,
     {"skip_guidance_layers": [1, 2], "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01,
      "skip_layer_guidance_stop": 0.5}),
    ("sd35m_nonsquare_slg_n2", "sd35m", 14, (80, 64), 6, 4.5, 2, "fog",
     {"skip_guidance_layers": [2], "skip_layer_guidance_scale": 2.0, "skip_layer_guidance_start": 0.1,
      "skip_layer_guidance_stop": 0.7}),
    ("sd35m_turbo_style", "sd35m", 15, (64, 64), 4, 0.0, 1, None, {}),
    ("sd35m_dynamic_shift", "sd35m", 16, (64, 48), 5, 5.0, 1, None, {"dynamic_shift": True}),
]

SD3_IMG2IMG_RUNS = [
    # name, model, seed, (w, h), steps, strength, guidance, n
    ("sd3_img2img", "sd3", 31, (64, 64), 8, 0.6, 5.0, 1),
    ("sd35m_img2img_n2", "sd35m", 32, (64, 48), 6, 0.8, 4.0, 2),
]


def sd3_run_fixtures(models: Path, out_dir: Path):
    from diffusers import (FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline,
                           StableDiffusion3Pipeline)

    records = []
    for name, model, seed, (w, h), steps, guidance, n, neg, extra in SD3_RUNS:
        extra = dict(extra)
        kwargs = {}
        if extra.pop("t5", True) is False:
            kwargs = dict(text_encoder_3=None, tokenizer_3=None)
        pipe = StableDiffusion3Pipeline.from_pretrained(models / f"{model}-tiny", **kwargs)
        if extra.pop("dynamic_shift", False):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                dict(pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16,
                     max_image_seq_len=256, base_shift=0.5, max_shift=1.15))
        with torch.no_grad():
            latents = pipe(PROMPT, negative_prompt=neg, width=w, height=h, num_inference_steps=steps,
                           guidance_scale=guidance, num_images_per_prompt=n,
                           generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                           **extra).images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                      return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model=model, seed=seed, width=w, height=h, steps=steps, guidance=guidance,
                            n=n, prompt=PROMPT, negative_prompt=neg, t5="text_encoder_3" not in kwargs,
                            **{k: v for k, v in extra.items()},
                            scheduler_overrides=(dict(use_dynamic_shifting=True, base_image_seq_len=16,
                                                      max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
                                                 if name.endswith("dynamic_shift") else None)))
    for name, model, seed, (w, h), steps, strength, guidance, n in SD3_IMG2IMG_RUNS:
        pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(models / f"{model}-tiny")
        image = init_image(w, h)
        image.save(out_dir / f"{name}-init.png")
        with torch.no_grad():
            # width/height: SD3's img2img resizes to the model's default size otherwise.
            latents = pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, width=w, height=h,
                           guidance_scale=guidance, num_images_per_prompt=n,
                           generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                      return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model=model, seed=seed, width=w, height=h, steps=steps, guidance=guidance,
                            n=n, prompt=PROMPT, negative_prompt=None, t5=True, strength=strength,
                            init_image=f"{name}-init.png", scheduler_overrides=None))
    (out_dir / "sd3_runs.json").write_text(json.dumps(records, indent=1))


# --- FLUX.1 ----------------------------------------------------------------------------------

FLUX_VARIANTS = {
    # dev: guidance-distilled (guidance embedding), resolution-dependent shift; schnell: neither.
    "flux-dev": dict(guidance_embeds=True, scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=16,
                                                          max_image_seq_len=256)),
    "flux-schnell": dict(guidance_embeds=False, scheduler=dict(shift=1.0, use_dynamic_shifting=False)),
}


def build_flux(root: Path, variant: str, seed: int):
    """FLUX's component set at toy size: CLIP-L-like encoder (pooled output only), T5, the Flux
    transformer (double + single blocks, rope axes summing to the head size) saved in shards
    with an index as the real repo, the 16-channel VAE with FLUX's scale and shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab_size = write_tiny_tokenizer(root / "tokenizer", "<|endoftext|>")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=32, bos_token_id=vocab_size - 2,
                                        eos_token_id=vocab_size - 1, pad_token_id=1, layer_norm_eps=1e-5)).eval()
    jitter_1d_params(clip, gen)
    tokenizer_2, t5 = build_t5(root, seed + 100, d_model=48, tokenizer_folder="tokenizer_2",
                               encoder_folder="text_encoder_2")
    options = FLUX_VARIANTS[variant]
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=options["guidance_embeds"],
                                         axes_dims_rope=(4, 6, 6)).eval()
    jitter_1d_params(transformer, gen)
    vae = tiny_vae16(gen)
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **options["scheduler"])
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"), text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(root, safe_serialization=True)
    # The real repos shard the transformer and T5: re-save both in several files with an index.
    for folder, model, stem, shard in [("transformer", transformer, "diffusion_pytorch_model", "150KB"),
                                       ("text_encoder_2", t5, "model", "30KB")]:
        (root / folder / f"{stem}.safetensors").unlink()
        model.save_pretrained(root / folder, safe_serialization=True, max_shard_size=shard)
        assert (root / folder / f"{stem}.safetensors.index.json").exists(), folder
    restore_clip_layout(root, [("tokenizer", "<|endoftext|>")], ["text_encoder"])
    return FluxPipeline.from_pretrained(root)


def flux_stage_fixtures(name: str, pipe, out_dir: Path):
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt("a red fox in the snow", prompt_2=None, max_sequence_length=24)
        h, w = 6, 4  # latent grid: 48x32 pixels
        latents = torch.randn((2, 16, h, w), generator=g)
        packed = pipe._pack_latents(latents, 2, 16, h, w)
        ids = pipe._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
        text_ids = torch.zeros(pe.shape[1], 3)
        t = torch.tensor([0.75, 0.75])
        guidance = torch.tensor([3.5, 3.5]) if pipe.transformer.config.guidance_embeds else None
        out = pipe.transformer(packed, encoder_hidden_states=pe.repeat(2, 1, 1), pooled_projections=pooled.repeat(2, 1),
                               timestep=t, img_ids=ids, txt_ids=text_ids, guidance=guidance).sample
        vae_latents = torch.randn((1, 16, 6, 9), generator=g)
        decoded = pipe.vae.decode(vae_latents).sample
    save_file({"prompt_embeds": pe.contiguous(), "pooled": pooled.contiguous(), "latents": latents.contiguous(),
               "packed": packed.contiguous(), "out": out.contiguous(), "vae_latents": vae_latents.contiguous(),
               "vae_decoded": decoded.contiguous()}, out_dir / f"{name}.safetensors")


def write_bfl_single_file(model_root: Path, out_file: Path):
    """The tiny dev transformer in Black Forest Labs' single-file naming (fused qkv, fused
    single-block linear1, final modulation in (shift, scale) order), as `flux1-dev.safetensors`
    is; checked by converting it back with diffusers' own single-file converter."""
    from diffusers import FluxTransformer2DModel
    import inspect

    from diffusers.loaders import single_file_utils

    model = FluxTransformer2DModel.from_pretrained(model_root / "transformer")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    D = model.inner_dim
    moves = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "proj_out": "final_layer.linear"}
    for ours, theirs in moves.items():
        for p in ["weight", "bias"]:
            if f"{ours}.{p}" in sd:
                out[f"{theirs}.{p}"] = sd.pop(f"{ours}.{p}")
    for p in ["weight", "bias"]:
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in range(model.config.num_layers):
        b = f"transformer_blocks.{i}."
        o = f"double_blocks.{i}."
        for p in ["weight", "bias"]:
            out[o + f"img_mod.lin.{p}"] = sd.pop(b + f"norm1.linear.{p}")
            out[o + f"txt_mod.lin.{p}"] = sd.pop(b + f"norm1_context.linear.{p}")
            out[o + f"img_attn.qkv.{p}"] = torch.cat([sd.pop(b + f"attn.to_{x}.{p}") for x in "qkv"])
            out[o + f"txt_attn.qkv.{p}"] = torch.cat([sd.pop(b + f"attn.add_{x}_proj.{p}") for x in "qkv"])
            out[o + f"img_attn.proj.{p}"] = sd.pop(b + f"attn.to_out.0.{p}")
            out[o + f"txt_attn.proj.{p}"] = sd.pop(b + f"attn.to_add_out.{p}")
            out[o + f"img_mlp.0.{p}"] = sd.pop(b + f"ff.net.0.proj.{p}")
            out[o + f"img_mlp.2.{p}"] = sd.pop(b + f"ff.net.2.{p}")
            out[o + f"txt_mlp.0.{p}"] = sd.pop(b + f"ff_context.net.0.proj.{p}")
            out[o + f"txt_mlp.2.{p}"] = sd.pop(b + f"ff_context.net.2.{p}")
        out[o + "img_attn.norm.query_norm.scale"] = sd.pop(b + "attn.norm_q.weight")
        out[o + "img_attn.norm.key_norm.scale"] = sd.pop(b + "attn.norm_k.weight")
        out[o + "txt_attn.norm.query_norm.scale"] = sd.pop(b + "attn.norm_added_q.weight")
        out[o + "txt_attn.norm.key_norm.scale"] = sd.pop(b + "attn.norm_added_k.weight")
    for i in range(model.config.num_single_layers):
        b = f"single_transformer_blocks.{i}."
        o = f"single_blocks.{i}."
        for p in ["weight", "bias"]:
            out[o + f"modulation.lin.{p}"] = sd.pop(b + f"norm.linear.{p}")
            out[o + f"linear1.{p}"] = torch.cat([sd.pop(b + f"attn.to_{x}.{p}") for x in "qkv"]
                                                + [sd.pop(b + f"proj_mlp.{p}")])
            out[o + f"linear2.{p}"] = sd.pop(b + f"proj_out.{p}")
        out[o + "norm.query_norm.scale"] = sd.pop(b + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = sd.pop(b + "attn.norm_k.weight")
    assert not sd, sorted(sd)
    # diffusers' converter hard-codes FLUX's width (3072); run its code with the tiny width.
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    source = source.replace("inner_dim = 3072", f"inner_dim = {D}")
    namespace = dict(vars(single_file_utils))
    exec(source, namespace)
    back = namespace["convert_flux_transformer_checkpoint_to_diffusers"]({k: v.clone() for k, v in out.items()})
    reference = model.state_dict()
    assert sorted(back) == sorted(reference)
    assert all(torch.equal(back[k], reference[k]) for k in back), "BFL round trip"
    # ComfyUI-style files prefix every name; the real flux1-dev.safetensors does not.
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)


# The BFL file's tensors in a GGUF file as city96's FLUX conversions store them (BFL naming,
# `general.architecture = flux`), in a mix of block formats so each cut the loader makes is met in
# a quantized format: q/k/v rows out of a fused q8_0 / q5_0 tensor, q/k/v/MLP rows out of a q4_0
# `linear1`, `linear2`'s columns split at the attention width in q5_1, the final modulation's
# halves swapped in q8_0, a dense layer (`img_in`) stored quantized, bf16 and f16 weights.
# (The tiny model is 32 wide: k-quants' 256-value blocks do not divide its rows.)
GGUF_TYPES = {
    "img_attn.qkv.weight": "Q8_0", "txt_attn.qkv.weight": "Q5_0", "img_attn.proj.weight": "Q8_0",
    "txt_attn.proj.weight": "Q4_1", "img_mlp.0.weight": "Q4_1", "img_mlp.2.weight": "Q5_1",
    "txt_mlp.0.weight": "Q8_0", "txt_mlp.2.weight": "Q4_0", "img_mod.lin.weight": "Q8_0",
    "txt_mod.lin.weight": "Q5_0", "linear1.weight": "Q4_0", "linear2.weight": "Q5_1",
    "modulation.lin.weight": "BF16", "img_in.weight": "Q8_0", "txt_in.weight": "F16",
    "final_layer.adaLN_modulation.1.weight": "Q8_0",
}


def write_gguf_single_file(bfl_file: Path, out_file: Path):
    """`bfl_file` as a GGUF file in the formats of GGUF_TYPES (everything else f32)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(bfl_file)
    writer = gguf.GGUFWriter(str(out_file), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name in sorted(tensors):
        data = tensors[name].float().numpy()
        kind = next((t for suffix, t in GGUF_TYPES.items() if name.endswith(suffix)), "F32")
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, data)
        elif kind == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            blocks = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_run_fixture(models: Path, gguf_file: Path, out_dir: Path):
    """A FLUX-dev run with the transformer loaded by diffusers' own GGUF path
    (`from_single_file` + `GGUFQuantizationConfig`: the blocks kept as stored and dequantized
    into each product), as `latents`; and as `latents_exact` the same run with every tensor
    dequantized as GGML defines its formats (gguf-py's reference dequantization, in f32) into a
    dense model. diffusers' CPU dequantization multiplies each block's f16 scale by its codes in
    f16 (`dequantize_blocks_*`: `d.view(torch.float16).to(None) * x`), so its weights are those
    values rounded to f16; llama.cpp and stable-diffusion.cpp compute them in f32, as we do."""
    import gguf
    import numpy as np
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig
    import inspect

    from diffusers.loaders import single_file_model, single_file_utils

    root = models / "flux-dev-tiny"
    inner = FluxTransformer2DModel.load_config(root / "transformer")
    inner_dim = inner["num_attention_heads"] * inner["attention_head_dim"]
    # diffusers' converter hard-codes FLUX's width (3072); run its code with the tiny width.
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    source = source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}")
    namespace = dict(vars(single_file_utils))
    exec(source, namespace)
    classes = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    classes["checkpoint_mapping_fn"] = namespace["convert_flux_transformer_checkpoint_to_diffusers"]
    reader = gguf.GGUFReader(str(gguf_file))
    exact = {t.name: torch.from_numpy(np.ascontiguousarray(
        gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])).astype(np.float32))
        for t in reader.tensors}
    exact_transformer = FluxTransformer2DModel.from_pretrained(root / "transformer")
    exact_transformer.load_state_dict(classes["checkpoint_mapping_fn"](exact))
    transformer = FluxTransformer2DModel.from_single_file(
        str(gguf_file), config=str(root), subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32,
        low_cpu_mem_usage=True)
    kinds = {type(m).__name__ for m in transformer.modules()}
    assert "GGUFLinear" in kinds, kinds
    pipe = FluxPipeline.from_pretrained(root, transformer=transformer)
    name, seed, (w, h), steps, guidance = "flux_dev_gguf", 51, (48, 64), 4, 3.5
    with torch.no_grad():
        packed = pipe(PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance,
                      max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="latent").images
        latents = pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor)
        exact = FluxPipeline.from_pretrained(root, transformer=exact_transformer)(
            PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance,
            max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        exact = pipe._unpack_latents(exact, h, w, pipe.vae_scale_factor)
        # The same run with the file's original f32 weights: how far the formats moved it.
        dense = FluxPipeline.from_pretrained(root)(
            PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance,
            max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    moved = (pipe._unpack_latents(dense, h, w, pipe.vae_scale_factor) - latents).abs().max().item()
    rounding = (exact - latents).abs().max().item()
    print(f"GGUF run: latents moved {moved:.3g} from the f32 weights' run; "
          f"{rounding:.3g} between diffusers' f16-rounded dequantization and GGML's exact one")
    assert moved > 1e-3, moved
    save_file({"latents": latents.contiguous(), "latents_exact": exact.contiguous()}, out_dir / f"{name}.safetensors")
    (out_dir / f"{name}.json").write_text(json.dumps(dict(
        name=name, model="flux-dev", seed=seed, width=w, height=h, steps=steps, guidance=guidance, n=1,
        prompt=PROMPT, negative_prompt=None, max_sequence_length=16, transformer_file=gguf_file.name), indent=1))


def t5_llama_name(name: str) -> str:
    """llama.cpp's name of a transformers T5 encoder tensor (gguf-py's tensor_mapping.py)."""
    fixed = {"shared.weight": "token_embd.weight", "encoder.final_layer_norm.weight": "enc.output_norm.weight"}
    if name in fixed:
        return fixed[name]
    block, inner = name.removeprefix("encoder.block.").split(".", 1)
    tensor = {"layer.0.layer_norm.weight": "attn_norm", "layer.0.SelfAttention.q.weight": "attn_q",
              "layer.0.SelfAttention.k.weight": "attn_k", "layer.0.SelfAttention.v.weight": "attn_v",
              "layer.0.SelfAttention.o.weight": "attn_o",
              "layer.0.SelfAttention.relative_attention_bias.weight": "attn_rel_b",
              "layer.1.layer_norm.weight": "ffn_norm", "layer.1.DenseReluDense.wi_0.weight": "ffn_gate",
              "layer.1.DenseReluDense.wi_1.weight": "ffn_up", "layer.1.DenseReluDense.wo.weight": "ffn_down"}[inner]
    return f"enc.blk.{block}.{tensor}.weight"


def write_gguf_t5(models: Path, out_file: Path, out_dir: Path):
    """The tiny FLUX-dev's T5 as a GGUF file in llama.cpp's naming (as city96's
    t5-v1_1-xxl-encoder GGUFs): its Linear layers in q8_0 / q4_1 where their rows take 32-value
    blocks, the embedding in f16, the rest f32; and diffusers' FLUX-dev run with that T5, its
    tensors dequantized as GGML defines them (`flux_dev_gguf_t5`)."""
    import gguf
    import numpy as np
    from diffusers import FluxPipeline
    from transformers import T5EncoderModel

    root = models / "flux-dev-tiny"
    t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2")
    writer = gguf.GGUFWriter(str(out_file), arch="t5encoder")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    dequantized = {}
    for i, (name, tensor) in enumerate(sorted(t5.state_dict().items())):
        if name == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        data = tensor.float().numpy()
        layer = name.startswith("encoder.block.") and data.ndim == 2 and "relative_attention_bias" not in name
        if layer and data.shape[1] % 32 == 0:
            qtype = [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1][i % 2]
            blocks = gguf.quants.quantize(data, qtype)
            writer.add_tensor(t5_llama_name(name), blocks, raw_shape=blocks.shape, raw_dtype=qtype)
            values = gguf.quants.dequantize(blocks, qtype)
        elif name == "shared.weight":
            values = data.astype(np.float16)
            writer.add_tensor(t5_llama_name(name), values)
        else:
            values = data
            writer.add_tensor(t5_llama_name(name), values)
        dequantized[name] = torch.from_numpy(np.ascontiguousarray(values).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dequantized["encoder.embed_tokens.weight"] = dequantized["shared.weight"]
    moved = max((dequantized[k] - v.float()).abs().max().item() for k, v in t5.state_dict().items())
    assert moved > 1e-3, moved
    t5.load_state_dict(dequantized)
    pipe = FluxPipeline.from_pretrained(root, text_encoder_2=t5)
    name, seed, (w, h), steps, guidance = "flux_dev_gguf_t5", 52, (64, 48), 3, 3.5
    with torch.no_grad():
        packed = pipe(PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance,
                      max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="latent").images
        latents = pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor)
    save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
    (out_dir / f"{name}.json").write_text(json.dumps(dict(
        name=name, model="flux-dev", seed=seed, width=w, height=h, steps=steps, guidance=guidance, n=1,
        prompt=PROMPT, negative_prompt=None, max_sequence_length=16, t5_file=out_file.name), indent=1))


FLUX_RUNS = [
    # name, model, seed, (w, h), steps, guidance, n, negative prompt, extra
    ("flux_dev_guidance", "flux-dev", 41, (64, 64), 6, 3.5, 1, None, {"max_sequence_length": 32}),
    ("flux_dev_nonsquare_n2", "flux-dev", 42, (48, 80), 5, 4.0, 2, None, {"max_sequence_length": 32}),
    ("flux_dev_default_t5_length", "flux-dev", 43, (64, 32), 3, 3.5, 1, None, {}),
    ("flux_dev_true_cfg", "flux-dev", 44, (64, 48), 4, 3.5, 1, "blurry",
     {"true_cfg_scale": 4.0, "max_sequence_length": 32}),
    ("flux_schnell_4steps", "flux-schnell", 45, (64, 64), 4, 0.0, 1, None, {"max_sequence_length": 32}),
    ("flux_schnell_nonsquare", "flux-schnell", 46, (80, 48), 2, 0.0, 1, None, {"max_sequence_length": 16}),
]


FLUX_IMG2IMG_RUNS = [
    # name, model, seed, (w, h), steps, strength, guidance, n
    ("flux_dev_img2img", "flux-dev", 47, (64, 64), 6, 0.6, 3.5, 1),
    ("flux_schnell_img2img_n2", "flux-schnell", 48, (64, 48), 4, 0.8, 0.0, 2),
]


def flux_run_fixtures(models: Path, out_dir: Path):
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    records = []
    for name, model, seed, (w, h), steps, guidance, n, neg, extra in FLUX_RUNS:
        pipe = FluxPipeline.from_pretrained(models / f"{model}-tiny")
        with torch.no_grad():
            packed = pipe(PROMPT, negative_prompt=neg, width=w, height=h, num_inference_steps=steps,
                          guidance_scale=guidance, num_images_per_prompt=n,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **extra).images
            latents = pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor)
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                      return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model=model, seed=seed, width=w, height=h, steps=steps, guidance=guidance,
                            n=n, prompt=PROMPT, negative_prompt=neg, **extra))
    for name, model, seed, (w, h), steps, strength, guidance, n in FLUX_IMG2IMG_RUNS:
        pipe = FluxImg2ImgPipeline.from_pretrained(models / f"{model}-tiny")
        image = init_image(w, h)
        image.save(out_dir / f"{name}-init.png")
        with torch.no_grad():
            packed = pipe(PROMPT, image=image, strength=strength, width=w, height=h, num_inference_steps=steps,
                          guidance_scale=guidance, num_images_per_prompt=n, max_sequence_length=32,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
            latents = pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor)
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                      return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model=model, seed=seed, width=w, height=h, steps=steps, guidance=guidance,
                            n=n, prompt=PROMPT, negative_prompt=None, max_sequence_length=32, strength=strength,
                            init_image=f"{name}-init.png"))
    (out_dir / "flux_runs.json").write_text(json.dumps(records, indent=1))


def half_run_fixtures(models: Path, out_dir: Path):
    """A FLUX run above again with the pipeline loaded in float16, as a GPU may serve it
    (`<name>_f16.safetensors`, latents as f32): what diffusers does in half precision (T5's `wo`
    kept in f32, the transformer's clips, noise drawn in f16) for our f16 path to be held to,
    beside how far diffusers' own f16 run lands from its f32 one (the committed f32 run).
    diffusers' tiny SD3 does not run in f16 on the CPU (its patch embedding's bias stays f32)."""
    from diffusers import FluxPipeline

    for name in ["flux_dev_guidance"]:
        _, model, seed, (w, h), steps, guidance, n, neg, extra = next(r for r in FLUX_RUNS if r[0] == name)
        pipe = FluxPipeline.from_pretrained(models / f"{model}-tiny", torch_dtype=torch.float16)
        with torch.no_grad():
            packed = pipe(PROMPT, negative_prompt=neg, width=w, height=h, num_inference_steps=steps,
                          guidance_scale=guidance, num_images_per_prompt=n,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                          **extra).images
            latents = pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor)
        assert latents.dtype == torch.float16
        save_file({"latents": latents.float().contiguous()}, out_dir / f"{name}_f16.safetensors")


def main():
    ap = argparse.ArgumentParser()
    here = Path(__file__).resolve().parent
    ap.add_argument("--out", default=str(here.parent.parent / "tests" / "fixtures"))
    ap.add_argument("--sd3", action="store_true", help="(re)build the tiny SD3 / SD3.5-medium pipelines")
    ap.add_argument("--flux", action="store_true", help="(re)build the tiny FLUX.1 dev / schnell pipelines")
    ap.add_argument("--gguf", action="store_true",
                    help="(re)write only the GGUF FLUX-dev transformer and its run, from the committed BFL file")
    ap.add_argument("--half", action="store_true",
                    help="(re)write only the float16 FLUX run, from the committed tiny FLUX model")
    args = ap.parse_args()
    out = Path(args.out)
    if args.gguf:
        gguf_file = out / "models" / "flux1-dev-tiny-mixed.gguf"
        write_gguf_single_file(out / "models" / "flux1-dev-tiny-bfl.safetensors", gguf_file)
        gguf_run_fixture(out / "models", gguf_file, out / "runs")
        write_gguf_t5(out / "models", out / "models" / "t5-flux-tiny-encoder-mixed.gguf", out / "runs")
        print("GGUF fixtures written to", out)
        return
    if args.half:
        half_run_fixtures(out / "models", out / "runs")
        print("half-precision runs written to", out)
        return
    if args.sd3:
        for variant, seed in [("sd3", 61), ("sd35m", 62)]:
            root = out / "models" / f"{variant}-tiny"
            shutil.rmtree(root, ignore_errors=True)
            pipe = build_sd3(root, variant, seed)
            sd3_stage_fixtures(variant, pipe, out / "stages")
        sd3_run_fixtures(out / "models", out / "runs")
        write_sai_single_file(out / "models" / "sd35m-tiny", out / "models" / "sd3.5-medium-tiny-sai.safetensors")
        print("SD3 fixtures written to", out)
    if args.flux:
        for variant, seed in [("flux-dev", 71), ("flux-schnell", 72)]:
            root = out / "models" / f"{variant}-tiny"
            shutil.rmtree(root, ignore_errors=True)
            pipe = build_flux(root, variant, seed)
            flux_stage_fixtures(variant, pipe, out / "stages")
        flux_run_fixtures(out / "models", out / "runs")
        write_bfl_single_file(out / "models" / "flux-dev-tiny", out / "models" / "flux1-dev-tiny-bfl.safetensors")
        print("FLUX fixtures written to", out)


if __name__ == "__main__":
    main()
