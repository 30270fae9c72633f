#!/usr/bin/env python3
"""Build the tiny diffusers-layout models and record diffusers' outputs as test fixtures.

The oracle is diffusers/transformers/torch at the versions pinned in requirements.txt, run on CPU
in float32. Everything is seeded, so re-running produces byte-identical files.

Usage:  .venv/bin/python make_fixtures.py [--out ../../tests/fixtures]

Outputs (all small):
  models/sd1-tiny/      SD1.x-shaped pipeline (epsilon, quick_gelu CLIP, PNDM config, pad=EOS)
  models/sd2-tiny/      SD2.x-shaped pipeline (v-prediction, gelu CLIP, DDIM config, pad="!",
                        linear projections, per-block head counts, upcast attention)
  tokenizer_cases.json  prompts -> input ids for both tokenizers
  randn.safetensors     torch.randn draws for several seeds/shapes (+ randn_cases.json)
  schedulers.json       timesteps/sigmas for every sampler/spacing/step count we support
  stages/<model>.safetensors  text embeddings, one UNet forward, one VAE decode
  stages/sd1_tiles.safetensors  SD1-tiny's UNet and VAE decode at sizes that take the CPU's
                              F(4×4) Winograd tile schedule (--tiles rewrites only it)
  runs/<name>.safetensors + runs/<name>-<i>.png + runs.json   whole pipeline runs
"""
import argparse
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

N_MERGES = 2000


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder: Path, pad_token: str):
    """A CLIP BPE vocabulary built exactly as OpenAI's, truncated to the first N_MERGES merges."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : N_MERGES + 1]
    vocab = bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad_token,
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": "<|startoftext|>",
                "do_lower_case": True,
                "eos_token": "<|endoftext|>",
                "errors": "replace",
                "model_max_length": 77,
                "pad_token": pad_token,
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    return len(vocab)


def jitter_1d_params(module: torch.nn.Module, gen: torch.Generator):
    """Default init leaves norms at 1/0 and many biases at 0; move them so loading mistakes show."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


SD1_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
)

SD2_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
    prediction_type="v_prediction",
)


def build_model(root: Path, kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    pad = "!" if sd2 else "<|endoftext|>"
    vocab_size = write_tiny_tokenizer(root / "tokenizer", pad)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")

    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    jitter_1d_params(text_encoder, gen)

    unet = UNet2DConditionModel(
        # pipelines default to sample_size * 8 pixels: 256x256 for the demo model.
        sample_size=16 if sd2 else 32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1 if sd2 else 2,
        # SD2-tiny has attention at full latent resolution like the real models; SD1-tiny (also the
        # embedded demo model) starts with a plain block so the demo runs in seconds on a CPU.
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        if sd2
        else ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
        if sd2
        else ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4) if sd2 else 4,
        norm_num_groups=8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    ).eval()
    jitter_1d_params(unet, gen)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()
    jitter_1d_params(vae, gen)

    sched_cls = DDIMScheduler if sd2 else PNDMScheduler
    sched_config = SD2_SCHEDULER if sd2 else SD1_SCHEDULER
    scheduler = sched_cls.from_config(sched_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    # save_pretrained re-writes the tokenizer with a tokenizer.json; keep the layout of the real
    # repos (vocab.json + merges.txt + configs) so that is what our loader is tested on.
    for extra in ["tokenizer.json", "added_tokens.json", "chat_template.jinja"]:
        p = root / "tokenizer" / extra
        if p.exists():
            p.unlink()
    write_tiny_tokenizer(root / "tokenizer", pad)
    # Like the real repos, the scheduler config carries keys its own class ignores (clip_sample on
    # PNDM) that matter when a user swaps in another sampler with from_config.
    sched_file = root / "scheduler" / "scheduler_config.json"
    saved = json.loads(sched_file.read_text())
    saved.update(sched_config)
    sched_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix that every real SD repo
    # has (saved by transformers 4); write the real repos' key names.
    te_file = root / "text_encoder" / "model.safetensors"
    state = load_file(te_file)
    if not any(k.startswith("text_model.") for k in state):
        state = {"text_model." + k: v for k, v in state.items()}
        save_file(state, te_file, metadata={"format": "pt"})
    return StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)


SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    clip_sample=False,
    trained_betas=None,
)


def restore_clip_layout(root: Path, tokenizers, encoders):
    """save_pretrained rewrites the CLIP tokenizers (adds tokenizer.json) and, in transformers 5,
    drops the `text_model.` prefix; put both back in the layout the hub repos have.
    `tokenizers`: (folder, pad token) pairs; `encoders`: text encoder folders."""
    for folder, pad in tokenizers:
        for extra in ["tokenizer.json", "added_tokens.json", "chat_template.jinja"]:
            p = root / folder / extra
            if p.exists():
                p.unlink()
        write_tiny_tokenizer(root / folder, pad)
    for folder in encoders:
        te_file = root / folder / "model.safetensors"
        state = load_file(te_file)
        if not any(k.startswith("text_model.") for k in state):
            state = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in state.items()}
            save_file(state, te_file, metadata={"format": "pt"})


def build_sdxl(root: Path, seed: int):
    """SDXL's component set at toy size: CLIP-L-like and OpenCLIP-G-like (projection, gelu, `!`
    padding) encoders whose penultimate hidden states are concatenated, a UNet with text_time
    added conditioning and several transformer layers per block, the SDXL VAE scaling factor."""
    from transformers import CLIPTextModelWithProjection
    from diffusers import StableDiffusionXLPipeline

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab_size = write_tiny_tokenizer(root / "tokenizer", "<|endoftext|>")
    write_tiny_tokenizer(root / "tokenizer_2", "!")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    common = dict(vocab_size=vocab_size, intermediate_size=64, num_attention_heads=4, max_position_embeddings=77,
                  bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1, layer_norm_eps=1e-5)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=3, hidden_act="quick_gelu",
                                                projection_dim=32, **common)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, num_hidden_layers=4, hidden_act="gelu",
                                                                projection_dim=40, **common)).eval()
    jitter_1d_params(text_encoder, gen)
    jitter_1d_params(text_encoder_2, gen)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32 + 48,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 40,
    ).eval()
    jitter_1d_params(unet, gen)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    jitter_1d_params(vae, gen)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    restore_clip_layout(root, [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")],
                        ["text_encoder", "text_encoder_2"])
    return StableDiffusionXLPipeline.from_pretrained(root, add_watermarker=False)


def build_sdxl_refiner(root: Path, seed: int):
    """The SDXL refiner's layout: no first text encoder, OpenCLIP-G only, aesthetic-score
    micro-conditioning (5 time ids), an img2img pipeline."""
    from transformers import CLIPTextModelWithProjection
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = root.parent / "sdxl-tiny"
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokenizer_2 = CLIPTokenizer.from_pretrained(base / "tokenizer_2")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2").eval()
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=48,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=5 * time_dim + 40,
    ).eval()
    jitter_1d_params(unet, gen)
    vae = AutoencoderKL.from_pretrained(base / "vae")
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
                                            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                            add_watermarker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    for extra in ["tokenizer.json", "added_tokens.json", "chat_template.jinja"]:
        p = root / "tokenizer_2" / extra
        if p.exists():
            p.unlink()
    write_tiny_tokenizer(root / "tokenizer_2", "!")
    shutil.copy(base / "text_encoder_2" / "model.safetensors", root / "text_encoder_2" / "model.safetensors")
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(root, add_watermarker=False)


REFINER_RUNS = [
    ("sdxl_refiner_euler", "euler", 41, (64, 64), 10, 0.3, 5.0, 1, None),
    ("sdxl_refiner_dpmpp_2m_n2", "dpmpp_2m", 42, (48, 64), 8, 0.5, 6.0, 2, "blurry"),
]


def refiner_run_fixtures(pipe, out_dir: Path):
    classes = {"euler": (EulerDiscreteScheduler, {}),
               "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2})}
    base = dict(pipe.scheduler.config)
    records = []
    for name, sampler, seed, (w, h), steps, strength, guidance, n, neg in REFINER_RUNS:
        cls, extra = classes[sampler]
        pipe.scheduler = cls.from_config(dict(base, **extra))
        image = init_image(w, h)
        image.save(out_dir / f"{name}-init.png")
        prompt = "a lighthouse on a cliff at dusk, oil painting"
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            latents = pipe(prompt, image=image, strength=strength, negative_prompt=neg, num_inference_steps=steps,
                           guidance_scale=guidance, num_images_per_prompt=n, generator=g,
                           output_type="latent").images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model="sdxl-refiner", sampler=sampler, schedule="default", seed=seed, width=w,
                            height=h, steps=steps, guidance=guidance, n=n, prompt=prompt, negative_prompt=neg,
                            solver_order=None, clip_skip=0, init_image=f"{name}-init.png", strength=strength))
    (out_dir / "refiner_runs.json").write_text(json.dumps(records, indent=1))


TWO_STAGE_RUNS = [
    # name, sampler, seed, (w, h), steps, switch, guidance, n
    ("sdxl_base_refiner_euler", "euler", 51, (64, 64), 10, 0.8, 5.0, 1),
    ("sdxl_base_refiner_euler_a_n2", "euler_a", 52, (64, 48), 8, 0.6, 6.0, 2),
]


def two_stage_run_fixtures(out_dir: Path):
    """diffusers' "ensemble of experts": the base denoises until `denoising_end`, the refiner
    takes its latents from `denoising_start` (each stage with a generator seeded alike)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    models = out_dir.parent / "models"
    base = StableDiffusionXLPipeline.from_pretrained(models / "sdxl-tiny", add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(models / "sdxl-refiner-tiny", add_watermarker=False)
    classes = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler}
    base_cfg, refiner_cfg = dict(base.scheduler.config), dict(refiner.scheduler.config)
    records = []
    for name, sampler, seed, (w, h), steps, switch, guidance, n in TWO_STAGE_RUNS:
        base.scheduler = classes[sampler].from_config(base_cfg)
        refiner.scheduler = classes[sampler].from_config(refiner_cfg)
        prompt = "a lighthouse on a cliff at dusk, oil painting"
        with torch.no_grad():
            latents = base(prompt, width=w, height=h, num_inference_steps=steps, denoising_end=switch,
                           guidance_scale=guidance, num_images_per_prompt=n,
                           generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
            final = refiner(prompt, image=latents, num_inference_steps=steps, denoising_start=switch,
                            guidance_scale=guidance, num_images_per_prompt=n,
                            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        save_file({"latents": final.contiguous(), "base_latents": latents.contiguous()},
                  out_dir / f"{name}.safetensors")
        records.append(dict(name=name, sampler=sampler, seed=seed, width=w, height=h, steps=steps, switch=switch,
                            guidance=guidance, n=n, prompt=prompt))
    (out_dir / "two_stage_runs.json").write_text(json.dumps(records, indent=1))


def sdxl_stage_fixtures(pipe, out_dir: Path):
    """Each SDXL component on its own: both encoders' penultimate states, the pooled projection,
    and a UNet forward with added (text_time) conditioning."""
    g = torch.Generator().manual_seed(12)
    prompts = ["a red fox in the snow", ""]
    ids1 = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out1 = pipe.text_encoder(ids1, output_hidden_states=True)
        out2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2.text_embeds
        sample = torch.randn((2, 4, 9, 6), generator=g)
        t = torch.tensor([681.0, 681.0])
        time_ids = torch.tensor([[72.0, 48.0, 0.0, 0.0, 72.0, 48.0], [1024.0, 768.0, 16.0, 8.0, 512.0, 512.0]])
        unet_out = pipe.unet(sample, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    save_file(
        {
            "input_ids": ids1.to(torch.int64).contiguous(),
            "input_ids_2": ids2.to(torch.int64).contiguous(),
            "hidden_penultimate": out1.hidden_states[-2].contiguous(),
            "hidden_penultimate_2": out2.hidden_states[-2].contiguous(),
            "hidden_skip1_2": out2.hidden_states[-3].contiguous(),
            "pooled_2": pooled.contiguous(),
            "unet_sample": sample.contiguous(),
            "unet_timestep": t.contiguous(),
            "unet_context": context.contiguous(),
            "unet_time_ids": time_ids.contiguous(),
            "unet_out": unet_out.contiguous(),
        },
        out_dir / "sdxl.safetensors",
    )


SDXL_RUNS = [
    # name, sampler, seed, width, height, steps, guidance, n, negative prompt, clip_skip
    ("sdxl_euler_cfg_negative", "euler", 42, 64, 64, 5, 5.0, 1, "blurry", None),
    ("sdxl_euler_a_zero_negative_n2", "euler_a", 7, 64, 48, 4, 7.0, 2, None, None),
    ("sdxl_dpmpp_2m_karras_odd", "dpmpp_2m_karras", 99, 72, 40, 6, 6.0, 1, None, None),
    ("sdxl_turbo_1step", "euler_a_trailing", 5, 64, 64, 1, 0.0, 1, None, None),
    ("sdxl_euler_clip_skip", "euler", 11, 48, 64, 4, 4.0, 1, "dull", 1),
]


def sdxl_run_fixtures(pipe, out_dir: Path):
    from PIL import Image  # noqa: F401

    records = []
    base = dict(pipe.scheduler.config)
    options = {
        "euler": (EulerDiscreteScheduler, {}, "default"),
        "euler_a": (EulerAncestralDiscreteScheduler, {}, "default"),
        "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                          "use_karras_sigmas": True}, "karras"),
        # SDXL-Turbo's documented settings: Euler a, trailing timesteps, 1 step, no guidance.
        "euler_a_trailing": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, "sgm_uniform"),
    }
    ours = {"euler_a_trailing": "euler_a", "dpmpp_2m_karras": "dpmpp_2m"}
    for name, sampler, seed, w, h, steps, guidance, n, neg, clip_skip in SDXL_RUNS:
        cls, extra, schedule = options[sampler]
        pipe.scheduler = cls.from_config(dict(base, **extra))
        prompt = "a lighthouse on a cliff at dusk, oil painting"
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            latents = pipe(prompt, negative_prompt=neg, width=w, height=h, num_inference_steps=steps,
                           guidance_scale=guidance, num_images_per_prompt=n, generator=g, clip_skip=clip_skip,
                           output_type="latent").images
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(image, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model="sdxl", sampler=ours.get(sampler, sampler), schedule=schedule,
                            seed=seed, width=w, height=h, steps=steps, guidance=guidance, n=n, prompt=prompt,
                            negative_prompt=neg, solver_order=None, clip_skip=clip_skip or 0))
    (out_dir / "sdxl_runs.json").write_text(json.dumps(records, indent=1))


IMG2IMG_RUNS = [
    # name, model, sampler, seed, init image (w, h), steps, strength, guidance, n, negative prompt
    ("sd1_img2img_euler_a", "sd1", "euler_a", 21, (64, 64), 10, 0.6, 7.5, 1, None),
    ("sd1_img2img_ddim_n2", "sd1", "ddim", 22, (72, 40), 8, 0.75, 5.0, 2, "blur"),
    ("sd1_img2img_heun", "sd1", "heun", 23, (64, 48), 6, 0.5, 6.0, 1, None),
    ("sd2_img2img_dpmpp_2m_vpred", "sd2", "dpmpp_2m", 24, (64, 64), 12, 0.3, 7.0, 1, None),
    ("sdxl_img2img_euler", "sdxl", "euler", 25, (64, 64), 8, 0.6, 5.0, 1, "fog"),
    ("sdxl_img2img_unipc_n2", "sdxl", "unipc", 26, (48, 64), 10, 0.45, 6.0, 2, None),
]


def init_image(w: int, h: int):
    """A deterministic test picture: colour gradients with a few shapes."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 128 + 127 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img = np.stack([r, g, b], -1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2] = [250, 240, 20]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def img2img_run_fixtures(out_dir: Path):
    """Image-to-image through diffusers' own img2img pipelines built from the committed models."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    classes = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
               "ddim": DDIMScheduler, "heun": HeunDiscreteScheduler,
               "dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    extras = {"dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2}}
    pipes = {}
    records = []
    for name, model, sampler, seed, (w, h), steps, strength, guidance, n, neg in IMG2IMG_RUNS:
        if model not in pipes:
            root = out_dir.parent / "models" / f"{model}-tiny"
            pipes[model] = (StableDiffusionXLImg2ImgPipeline.from_pretrained(root, add_watermarker=False)
                            if model == "sdxl" else
                            StableDiffusionImg2ImgPipeline.from_pretrained(root, safety_checker=None,
                                                                           requires_safety_checker=False))
        pipe = pipes[model]
        base = dict(pipe.scheduler.config)
        pipe.scheduler = classes[sampler].from_config(dict(base, **extras.get(sampler, {})))
        image = init_image(w, h)
        image_file = f"{name}-init.png"
        image.save(out_dir / image_file)
        prompt = "a lighthouse on a cliff at dusk, oil painting"
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            latents = pipe(prompt, image=image, strength=strength, negative_prompt=neg, num_inference_steps=steps,
                           guidance_scale=guidance, num_images_per_prompt=n, generator=g,
                           output_type="latent").images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            assert im.size == (w, h)
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model=model, sampler=sampler, schedule="default", seed=seed, width=w,
                            height=h, steps=steps, guidance=guidance, n=n, prompt=prompt, negative_prompt=neg,
                            solver_order=None, clip_skip=0, init_image=image_file, strength=strength))
    (out_dir / "img2img_runs.json").write_text(json.dumps(records, indent=1))


INPAINT_RUNS = [
    # name, model, sampler, seed, size, steps, strength, guidance, n
    ("sd1_inpaint_blend_euler_a", "sd1", "euler_a", 31, (64, 64), 6, 1.0, 7.5, 1),
    ("sd1_inpaint_blend_ddim_n2", "sd1", "ddim", 32, (72, 40), 8, 0.75, 5.0, 2),
    ("sd1_inpaint_9ch_euler", "sd1-inpaint", "euler", 33, (64, 48), 6, 1.0, 7.0, 1),
    ("sd1_inpaint_9ch_dpmpp_2m", "sd1-inpaint", "dpmpp_2m", 34, (64, 64), 10, 0.6, 6.0, 1),
    # SDXL's inpaint pipeline (default strength 0.9999) with the base (4-channel) UNet: blending.
    ("sdxl_inpaint_blend_euler", "sdxl", "euler", 35, (64, 64), 6, 0.9999, 5.0, 1),
    ("sdxl_inpaint_blend_euler_a_full_n2", "sdxl", "euler_a", 36, (64, 48), 5, 1.0, 6.0, 2),
]


def mask_image(w: int, h: int):
    """White (repaint) rectangle in the middle, black (keep) around it, with a soft edge so the
    binarisation threshold matters."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = (np.abs(x - w / 2) < w / 4) & (np.abs(y - h / 2) < h / 3)
    m = np.where(inside, 255.0, 0.0)
    m = np.where(np.abs(np.abs(x - w / 2) - w / 4) < 1.5, 127.0 + (x % 3), m)
    return Image.fromarray(m.astype(np.uint8), mode="L")


def build_inpaint_model(root: Path, seed: int):
    """SD 1.x inpainting checkpoints' layout: the same components, a UNet with 9 input channels
    (latents + mask + masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    base = StableDiffusionPipeline.from_pretrained(root.parent / "sd1-tiny", safety_checker=None,
                                                   requires_safety_checker=False)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = dict(base.unet.config)
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config).eval()
    jitter_1d_params(unet, gen)
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    shutil.rmtree(root / "tokenizer")
    shutil.copytree(root.parent / "sd1-tiny" / "tokenizer", root / "tokenizer")
    shutil.copy(root.parent / "sd1-tiny" / "text_encoder" / "model.safetensors", root / "text_encoder" / "model.safetensors")
    shutil.copy(root.parent / "sd1-tiny" / "scheduler" / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")


def inpaint_run_fixtures(out_dir: Path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    classes = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
               "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
    records = []
    for name, model, sampler, seed, (w, h), steps, strength, guidance, n in INPAINT_RUNS:
        root = out_dir.parent / "models" / f"{model}-tiny"
        pipe = (StableDiffusionXLInpaintPipeline.from_pretrained(root, add_watermarker=False) if model == "sdxl"
                else StableDiffusionInpaintPipeline.from_pretrained(root, safety_checker=None,
                                                                    requires_safety_checker=False))
        pipe.scheduler = classes[sampler].from_config(dict(pipe.scheduler.config))
        image, mask = init_image(w, h), mask_image(w, h)
        image.save(out_dir / f"{name}-init.png")
        mask.save(out_dir / f"{name}-mask.png")
        prompt = "a lighthouse on a cliff at dusk, oil painting"
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            latents = pipe(prompt, image=image, mask_image=mask, strength=strength, height=h, width=w,
                           num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                           generator=g, output_type="latent").images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            im.save(out_dir / f"{name}-{i}.png")
        records.append(dict(name=name, model=model, sampler=sampler, schedule="default", seed=seed, width=w,
                            height=h, steps=steps, guidance=guidance, n=n, prompt=prompt, negative_prompt=None,
                            solver_order=None, clip_skip=0, init_image=f"{name}-init.png",
                            mask_image=f"{name}-mask.png", strength=strength))
    (out_dir / "inpaint_runs.json").write_text(json.dumps(records, indent=1))


def build_t5(root: Path, seed: int, d_model: int = 32, tokenizer_folder: str = "tokenizer",
             encoder_folder: str = "text_encoder"):
    """A tiny T5 v1.1-style encoder (gated-GELU, relative position buckets) in the layout of SD3's
    and FLUX's `text_encoder_3` / `text_encoder_2` + `tokenizer_3` / `tokenizer_2` folders: a
    transformers config + safetensors, and a fast tokenizer (tokenizer.json, Unigram + Metaspace
    as T5's sentencepiece model is converted)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    words = ("a the of and in on at to with photo painting red blue green cat dog fox snow lighthouse cliff dusk "
             "oil castle night city street tree river mountain sky light dark old new small big").split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - i * 0.01) for i, w in enumerate(words)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("\u2581" + c, -9.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("\u2581", -10.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(r"\s+", " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(root / tokenizer_folder)
    config = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      is_encoder_decoder=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    model = T5EncoderModel(config).eval()
    jitter_1d_params(model, gen)
    model.save_pretrained(root / encoder_folder, safe_serialization=True)
    return (T5TokenizerFast.from_pretrained(root / tokenizer_folder),
            T5EncoderModel.from_pretrained(root / encoder_folder).eval())


def t5_f16_fixtures(fixtures: Path, scale: float = 200.0):
    """T5 served in f16, from the committed tiny T5: its feed-forward `wi_1` and `wo` scaled so
    that `wo`'s output overflows f16 (as T5-XXL v1.1's does on real prompts) while every weight
    and every input of `wo` stays within f16's range, saved in f16 as real fp16
    checkpoints are, and run by transformers in f16 — which keeps `wo` in f32
    (`_keep_in_fp32_modules`), so its output stays finite. The same model with every layer in
    f16 must overflow, or the fixture would not test that."""
    from transformers import T5EncoderModel, T5TokenizerFast

    src = fixtures / "models" / "t5-tiny"
    dst = fixtures / "models" / "t5-tiny-f16"
    shutil.rmtree(dst, ignore_errors=True)
    model = T5EncoderModel.from_pretrained(src / "text_encoder").eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wi_1.weight.mul_(scale)
            block.layer[1].DenseReluDense.wo.weight.mul_(scale)
    model.half().save_pretrained(dst / "text_encoder", safe_serialization=True)
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    tokenizer = T5TokenizerFast.from_pretrained(dst / "tokenizer")
    served = T5EncoderModel.from_pretrained(dst / "text_encoder", dtype=torch.float16).eval()
    assert served.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    all_half = T5EncoderModel.from_pretrained(dst / "text_encoder", dtype=torch.float16).eval().half()
    prompts = json.loads((fixtures / "stages" / "t5_prompts.json").read_text())
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    overflowed = []
    all_half.encoder.block[0].layer[1].DenseReluDense.wo.register_forward_hook(
        lambda module, inputs, output: overflowed.append(not torch.isfinite(output).all()))
    with torch.no_grad():
        hidden = served(ids)[0]
        all_half(ids)
    assert hidden.dtype == torch.float16 and torch.isfinite(hidden).all()
    assert overflowed == [True], "wo in f16 did not overflow: raise the scale"
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "hidden": hidden.contiguous()},
              fixtures / "stages" / "t5_f16.safetensors")


def t5_stored_half_fixtures(fixtures: Path):
    """T5 stored in half precision and run in f32 (a CPU user's T5: FLUX's checkpoint is bf16,
    SD3's f16): the committed tiny T5 saved in bf16 (`t5-tiny-bf16`), and the f16 one of
    `--t5-f16`, each loaded by transformers in f32 — the stored values widened exactly — and run
    on the T5 stage prompts."""
    from transformers import T5EncoderModel, T5TokenizerFast

    src = fixtures / "models" / "t5-tiny"
    bf16 = fixtures / "models" / "t5-tiny-bf16"
    shutil.rmtree(bf16, ignore_errors=True)
    T5EncoderModel.from_pretrained(src / "text_encoder").to(torch.bfloat16).save_pretrained(
        bf16 / "text_encoder", safe_serialization=True)
    shutil.copytree(src / "tokenizer", bf16 / "tokenizer")
    tokenizer = T5TokenizerFast.from_pretrained(src / "tokenizer")
    prompts = json.loads((fixtures / "stages" / "t5_prompts.json").read_text())
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    tensors = {"input_ids": ids.to(torch.int64).contiguous()}
    for name in ("bf16", "f16"):
        model = T5EncoderModel.from_pretrained(fixtures / "models" / f"t5-tiny-{name}" / "text_encoder",
                                               dtype=torch.float32).eval()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            tensors[f"hidden_{name}"] = model(ids)[0].contiguous()
    save_file(tensors, fixtures / "stages" / "t5_stored_half.safetensors")


def clip_stored_half_fixtures(fixtures: Path):
    """CLIP stored in f16 and run in f32 (a CPU user's SD3/FLUX CLIP, whose repos store them in
    half precision): the tiny SDXL's OpenCLIP-style second encoder (with `text_projection`), its
    tensors saved in f16 under the real repos' key names (`clip-tiny-f16`), loaded by
    transformers in f32 — the stored values widened exactly — and run on the T5 stage prompts:
    the penultimate hidden state (SDXL's and SD3's) and the projected pooled output."""
    from transformers import CLIPTextModelWithProjection

    src = fixtures / "models" / "sdxl-tiny"
    dst = fixtures / "models" / "clip-tiny-f16"
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "text_encoder").mkdir(parents=True)
    shutil.copy(src / "text_encoder_2" / "config.json", dst / "text_encoder" / "config.json")
    state = load_file(src / "text_encoder_2" / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in state.items()},
              dst / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(src / "tokenizer_2", dst / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(dst / "tokenizer")
    prompts = json.loads((fixtures / "stages" / "t5_prompts.json").read_text())
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    model = CLIPTextModelWithProjection.from_pretrained(dst / "text_encoder", dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    save_file({"input_ids": ids.to(torch.int64).contiguous(),
               "penultimate": out.hidden_states[-2].contiguous(),
               "pooled": out.text_embeds.contiguous()},
              fixtures / "stages" / "clip_stored_half.safetensors")


def randn_half_cases(out_dir: Path):
    """torch.randn in float16 / bfloat16 (what diffusers draws when serving in half precision):
    its stream leaves the float32 one where the element count is not a multiple of 16. Two draws
    per case, so the generator's state after the first is checked too; values stored as f32."""
    cases = []
    tensors = {}
    for i, (seed, shape) in enumerate([(7, [17]), (3, [100]), (42, [2, 4, 12, 8]),
                                       (1234567890123, [1, 4, 5, 9]), (5, [1, 4, 13, 9])]):
        for dtype in ["float16", "bfloat16"]:
            g = torch.Generator("cpu").manual_seed(seed)
            name = f"case{i}_{dtype}"
            for draw in ["first", "second"]:
                tensors[f"{name}_{draw}"] = torch.randn(shape, generator=g, dtype=getattr(torch, dtype)).float()
            cases.append({"name": name, "seed": seed, "shape": shape, "dtype": dtype})
    save_file(tensors, out_dir / "randn_half.safetensors")
    (out_dir / "randn_half_cases.json").write_text(json.dumps(cases, indent=1))


def build_vae16(root: Path, out_dir: Path, seed: int):
    """SD3/FLUX-style autoencoder: 16 latent channels, no quant convs, a shift factor."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=True).eval()
    jitter_1d_params(vae, gen)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    g = torch.Generator().manual_seed(13)
    image = torch.rand((1, 3, 40, 56), generator=g) * 2 - 1
    latents = torch.randn((1, 16, 6, 9), generator=g)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        decoded = vae.decode(latents).sample
    save_file({"image": image.contiguous(), "mean": dist.mean.contiguous(), "std": dist.std.contiguous(),
               "latents": latents.contiguous(), "decoded": decoded.contiguous()}, out_dir / "vae16.safetensors")


def t5_stage_fixtures(tokenizer, model, out_dir: Path):
    prompts = ["a red fox in the snow", "", "A Lighthouse   on a CLIFF at dusk, oil painting!",
               "zebra quokka xylophone", " ".join(["the old castle"] * 40)]
    out = {}
    for max_len in [16, 77]:
        ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(ids)[0]
        out[f"input_ids_{max_len}"] = ids.to(torch.int64).contiguous()
        out[f"hidden_{max_len}"] = hidden.contiguous()
    save_file(out, out_dir / "t5.safetensors")
    (out_dir / "t5_prompts.json").write_text(json.dumps(prompts))


TRICKY_PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "A PHOTO   of a\tcat,\nin the   Rain!!!",
    "it's the dog's toy; they'll've gone... don't",
    "café naïve résumé — “quotes” & ‘apostrophes’",
    "東京の夜景 and 🚀🔥 emoji 👩‍👩‍👧",
    "numbers 1234567 and 3.14159, mixed42words",
    "<|startoftext|> embedded specials <|endoftext|> here",
    "hyphen-ated snake_case CamelCase (parens) [brackets] {braces}",
    " leading and trailing spaces   ",
    " ".join(["word"] * 100),
    "masterpiece, best quality, " * 20,
    "Ünïcödé NFC: e\u0301 vs \u00e9, ﬁ ligature, ＦＵＬＬＷＩＤＴＨ",
]


def tokenizer_cases(pipes):
    out = {}
    for name, pipe in pipes.items():
        tok = pipe.tokenizer
        cases = []
        for p in TRICKY_PROMPTS:
            ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            cases.append({"prompt": p, "ids": ids})
        out[name] = cases
    return out


def randn_cases(out_dir: Path):
    cases = []
    tensors = {}
    for i, (seed, shape) in enumerate(
        [
            (0, [1, 4, 8, 8]),
            (42, [2, 4, 12, 8]),
            (1234567890123, [1, 4, 5, 9]),
            (7, [3]),
            (7, [15]),
            (7, [16]),
            (7, [17]),
            (2**63 - 1, [1, 4, 64, 64]),
        ]
    ):
        g = torch.Generator("cpu").manual_seed(seed)
        a = torch.randn(shape, generator=g, dtype=torch.float32)
        b = torch.randn(shape, generator=g, dtype=torch.float32)  # a second draw from the same stream
        tensors[f"case{i}_first"] = a.contiguous()
        tensors[f"case{i}_second"] = b.contiguous()
        cases.append({"name": f"case{i}", "seed": seed, "shape": shape})
    save_file(tensors, out_dir / "randn.safetensors")
    (out_dir / "randn_cases.json").write_text(json.dumps(cases, indent=1))


def scheduler_fixtures(out_dir: Path):
    out = []
    for cfg_name, cfg in [("sd1", SD1_SCHEDULER), ("sd2", SD2_SCHEDULER)]:
        for spacing in ["leading", "trailing", "linspace"]:
            for steps in [1, 3, 10, 25, 50]:
                c = dict(cfg, timestep_spacing=spacing)
                for sampler, cls, extra in [
                    ("euler", EulerDiscreteScheduler, {}),
                    ("euler_karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}),
                    ("euler_exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True}),
                    ("euler_a", EulerAncestralDiscreteScheduler, {}),
                    ("ddim", DDIMScheduler, {}),
                ]:
                    if steps == 1 and sampler in ("euler_karras", "euler_exponential"):
                        continue
                    s = cls.from_config(dict(c, **extra))
                    s.set_timesteps(steps)
                    rec = {
                        "config": cfg_name,
                        "timestep_spacing": spacing,
                        "steps": steps,
                        "sampler": sampler,
                        "timesteps": [float(t) for t in s.timesteps],
                        "init_noise_sigma": float(s.init_noise_sigma),
                    }
                    if hasattr(s, "sigmas"):
                        rec["sigmas"] = [float(x) for x in s.sigmas]
                    out.append(rec)
    (out_dir / "schedulers.json").write_text(json.dumps(out))


def stage_prompt_ids(pipe):
    """The stage fixtures' prompt pair (a prompt and the empty negative), padded to 77 tokens."""
    return pipe.tokenizer(["a red fox in the snow", ""], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids


def unet_and_vae_stage(pipe, emb, seed: int, sample_shape, latents_shape):
    """One UNet forward on a random sample (timestep 681, `emb` as context) and one VAE decode of
    random latents, both drawn from `seed` in that order, as the stage tensors the tests read."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sample = torch.randn(sample_shape, generator=g)
        t = torch.tensor([681.0, 681.0])
        unet_out = pipe.unet(sample, t, encoder_hidden_states=emb).sample
        latents = torch.randn(latents_shape, generator=g)
        decoded = pipe.vae.decode(latents).sample
    return {
        "unet_sample": sample.contiguous(),
        "unet_timestep": t.contiguous(),
        "unet_out": unet_out.contiguous(),
        "vae_latents": latents.contiguous(),
        "vae_decoded": decoded.contiguous(),
    }


def stage_fixtures(name: str, pipe, out_dir: Path):
    ids = stage_prompt_ids(pipe)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        clip_skip1 = text_model.final_layer_norm(hidden[-2])
    save_file(
        {
            "input_ids": ids.to(torch.int64).contiguous(),
            "text_embeddings": emb.contiguous(),
            "text_embeddings_clip_skip1": clip_skip1.contiguous(),
            **unet_and_vae_stage(pipe, emb, 11, (2, 4, 9, 6), (1, 4, 7, 5)),
        },
        out_dir / f"{name}.safetensors",
    )


def tile_stage_fixtures(pipe, out_dir: Path):
    """SD1-tiny's UNet and VAE decoder on inputs large enough that candela's CPU convolutions run
    their tile schedule, F(4×4, 3×3) Winograd (more than 256 2×2 tiles at a layer with ≥ 32 input
    channels): the UNet's 32-channel level at 32×24 and its last up block at 64×48 (batch 2), the
    VAE decoder from 24×20 latents through 48×40 … 192×160. The other stages' inputs are too small
    for it."""
    with torch.no_grad():
        emb = pipe.text_encoder(stage_prompt_ids(pipe))[0]
    save_file(
        {"text_embeddings": emb.contiguous(), **unet_and_vae_stage(pipe, emb, 12, (2, 4, 64, 48), (1, 4, 24, 20))},
        out_dir / "sd1_tiles.safetensors",
    )


RUNS = [
    # name, model, sampler, seed, width, height, steps, guidance, n, negative prompt
    ("sd1_euler_cfg", "sd1", "euler", 42, 64, 64, 5, 7.5, 1, "blurry, low quality"),
    ("sd1_euler_a_nonsquare_n2", "sd1", "euler_a", 1234, 96, 64, 6, 5.0, 2, None),
    ("sd1_ddim_odd_nocfg", "sd1", "ddim", 7, 72, 40, 4, 1.0, 1, None),
    ("sd1_euler_karras", "sd1", "euler_karras", 2024, 64, 80, 8, 6.0, 1, None),
    ("sd2_euler_a_vpred", "sd2", "euler_a", 3, 64, 64, 5, 7.5, 1, "ugly"),
    ("sd2_ddim_vpred_n2", "sd2", "ddim", 99, 80, 48, 6, 3.0, 2, None),
    ("sd2_euler_vpred", "sd2", "euler", 5, 56, 64, 7, 9.0, 1, None),
    ("sd1_dpmpp_2m_karras", "sd1", "dpmpp_2m_karras", 77, 64, 64, 8, 7.0, 1, "lowres"),
    ("sd2_dpmpp_2m_sde_n2", "sd2", "dpmpp_2m_sde", 31337, 64, 48, 6, 6.0, 2, None),
    ("sd1_pndm_default", "sd1", "pndm", 2718, 64, 64, 6, 7.5, 1, None),
    ("sd2_heun_vpred", "sd2", "heun", 1618, 48, 64, 5, 6.5, 1, "dull"),
    ("sd1_ddpm_n2", "sd1", "ddpm", 4242, 64, 64, 6, 7.5, 2, None),
    ("sd1_lcm_4steps", "sd1", "lcm", 99, 64, 64, 4, 1.0, 1, None),
    ("sd2_dpm_2_vpred", "sd2", "dpm_2", 808, 64, 56, 5, 7.0, 1, None),
    ("sd1_dpm_2_a", "sd1", "dpm_2_a", 909, 64, 64, 5, 7.0, 1, None),
    ("sd2_lms_vpred", "sd2", "lms", 1111, 64, 64, 7, 7.5, 1, None),
    ("sd1_unipc", "sd1", "unipc", 1357, 64, 64, 6, 7.5, 1, "grainy"),
    ("sd2_unipc_3_karras_vpred", "sd2", "unipc_3_karras", 2468, 64, 48, 8, 6.0, 1, None),
    ("sd1_dpmpp_3m_beta_n2", "sd1", "dpmpp_3m_beta", 555, 48, 64, 7, 7.0, 2, None),
    ("sd1_euler_sgm_uniform", "sd1", "euler_sgm_uniform", 8080, 64, 64, 5, 7.5, 1, None),
]

# our sampler name -> (diffusers class, from_config options, our schedule, our solver_order)
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}, "default", None),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}, "karras", None),
    "euler_sgm_uniform": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, "sgm_uniform", None),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "default", None),
    "ddim": (DDIMScheduler, {}, "default", None),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, "default", None),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "karras",
        None,
    ),
    "dpmpp_3m_beta": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 3, "use_beta_sigmas": True},
        "beta",
        3,
    ),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "default", None),
    "pndm": (PNDMScheduler, {}, "default", None),
    "heun": (HeunDiscreteScheduler, {}, "default", None),
    "ddpm": (DDPMScheduler, {}, "default", None),
    "lcm": (LCMScheduler, {}, "default", None),
    "dpm_2": (KDPM2DiscreteScheduler, {}, "default", None),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}, "default", None),
    "lms": (LMSDiscreteScheduler, {}, "default", None),
    "unipc": (UniPCMultistepScheduler, {}, "default", None),
    "unipc_3_karras": (UniPCMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}, "karras", 3),
}
OUR_SAMPLER = {"dpmpp_3m_beta": "dpmpp_2m", "unipc_3_karras": "unipc"}


def run_fixtures(pipes, out_dir: Path):
    from PIL import Image

    records = []
    # Each run builds its sampler from the model's own scheduler config, as a user does; never
    # from the previous run's sampler (its options, e.g. use_karras_sigmas, would leak).
    model_configs = {name: dict(pipe.scheduler.config) for name, pipe in pipes.items()}
    for name, model, sampler, seed, w, h, steps, guidance, n, neg in RUNS:
        pipe = pipes[model]
        cls, extra, schedule, solver_order = SAMPLERS[sampler]
        pipe.scheduler = cls.from_config(dict(model_configs[model], **extra))
        prompt = "a lighthouse on a cliff at dusk, oil painting"
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            latents = pipe(
                prompt,
                negative_prompt=neg,
                width=w,
                height=h,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=n,
                generator=g,
                output_type="latent",
            ).images
            # Decode exactly as the pipeline does for output_type="pil".
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(image, output_type="pil")
        save_file({"latents": latents.contiguous()}, out_dir / f"{name}.safetensors")
        for i, im in enumerate(pil):
            assert im.size == (w, h)
            im.save(out_dir / f"{name}-{i}.png")
        records.append(
            dict(
                name=name,
                model=model,
                sampler=OUR_SAMPLER.get(sampler, sampler.removesuffix("_karras").removesuffix("_sgm_uniform")),
                schedule=schedule,
                solver_order=solver_order,
                seed=seed,
                width=w,
                height=h,
                steps=steps,
                guidance=guidance,
                n=n,
                prompt=prompt,
                negative_prompt=neg,
            )
        )
    (out_dir / "runs.json").write_text(json.dumps(records, indent=1))


def main():
    ap = argparse.ArgumentParser()
    here = Path(__file__).resolve().parent
    ap.add_argument("--out", default=str(here.parent.parent / "tests" / "fixtures"))
    ap.add_argument("--vae16", action="store_true", help="(re)build the tiny 16-channel (SD3/FLUX) VAE")
    ap.add_argument("--t5", action="store_true", help="(re)build the tiny T5 encoder and its stage fixtures")
    ap.add_argument("--t5-f16", action="store_true",
                    help="(re)build the tiny T5 served in f16 (from the committed tiny T5) and its fixture")
    ap.add_argument("--t5-stored-half", action="store_true",
                    help="(re)build the tiny T5 stored in bf16 and the f32 runs of both half-stored T5s")
    ap.add_argument("--clip-stored-half", action="store_true",
                    help="(re)build the tiny CLIP stored in f16 and its f32 run")
    ap.add_argument("--randn-half", action="store_true",
                    help="(re)write only randn_half.safetensors: torch.randn in float16 and bfloat16")
    ap.add_argument("--refiner", action="store_true",
                    help="(re)build the tiny SDXL refiner and write its image-to-image runs")
    ap.add_argument("--inpaint", action="store_true",
                    help="(re)build the tiny 9-channel inpainting model and write the inpainting runs")
    ap.add_argument("--tiles", action="store_true",
                    help="(re)write only stages/sd1_tiles.safetensors, from the committed SD1-tiny model")
    ap.add_argument("--img2img", action="store_true",
                    help="(re)write only the image-to-image runs, from the committed tiny models")
    ap.add_argument("--sdxl", action="store_true",
                    help="(re)build only the tiny SDXL model with its stage and run fixtures")
    ap.add_argument("--runs-only", action="store_true",
                    help="regenerate only runs/ from the committed tiny models (keeps models and stages)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.vae16:
        shutil.rmtree(out / "models" / "vae16-tiny", ignore_errors=True)
        build_vae16(out / "models" / "vae16-tiny", out / "stages", seed=7)
        print("16-channel VAE fixtures written to", out)
        return
    if args.t5:
        shutil.rmtree(out / "models" / "t5-tiny", ignore_errors=True)
        tokenizer, model = build_t5(out / "models" / "t5-tiny", seed=6)
        t5_stage_fixtures(tokenizer, model, out / "stages")
        print("T5 fixtures written to", out)
        return
    # Fixtures that one function writes from the committed models: (flag, writer, what).
    for flag, write, what in [
        (args.randn_half, randn_half_cases, "half-precision randn"),
        (args.t5_stored_half, t5_stored_half_fixtures, "T5 stored-in-half"),
        (args.clip_stored_half, clip_stored_half_fixtures, "CLIP stored-in-half"),
        (args.t5_f16, t5_f16_fixtures, "T5 f16"),
    ]:
        if flag:
            write(out)
            print(what, "fixtures written to", out)
            return
    if args.refiner:
        shutil.rmtree(out / "models" / "sdxl-refiner-tiny", ignore_errors=True)
        pipe = build_sdxl_refiner(out / "models" / "sdxl-refiner-tiny", seed=5)
        refiner_run_fixtures(pipe, out / "runs")
        two_stage_run_fixtures(out / "runs")
        print("SDXL refiner fixtures written to", out)
        return
    if args.inpaint:
        if not (out / "models" / "sd1-inpaint-tiny").exists():
            build_inpaint_model(out / "models" / "sd1-inpaint-tiny", seed=4)
        inpaint_run_fixtures(out / "runs")
        print("inpainting fixtures written to", out)
        return
    if args.tiles:
        pipe = StableDiffusionPipeline.from_pretrained(out / "models" / "sd1-tiny", safety_checker=None)
        tile_stage_fixtures(pipe, out / "stages")
        print("tile-schedule stage fixtures written to", out / "stages")
        return
    if args.img2img:
        img2img_run_fixtures(out / "runs")
        print("image-to-image runs written to", out / "runs")
        return
    if args.sdxl:
        for sub in ["models/sdxl-tiny"]:
            shutil.rmtree(out / sub, ignore_errors=True)
        pipe = build_sdxl(out / "models" / "sdxl-tiny", seed=3)
        sdxl_stage_fixtures(pipe, out / "stages")
        sdxl_run_fixtures(pipe, out / "runs")
        print("SDXL fixtures written to", out)
        return
    if args.runs_only:
        shutil.rmtree(out / "runs", ignore_errors=True)
        (out / "runs").mkdir()
        pipes = {m: StableDiffusionPipeline.from_pretrained(out / "models" / f"{m}-tiny", safety_checker=None)
                 for m in ["sd1", "sd2"]}
        run_fixtures(pipes, out / "runs")
        print("runs written to", out / "runs")
        return
    # Only this script's outputs; samplers/ belongs to make_sampler_traces.py.
    for sub in ["models", "stages", "runs"]:
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    (out / "models").mkdir(parents=True)
    (out / "stages").mkdir()
    (out / "runs").mkdir()

    pipes = {
        "sd1": build_model(out / "models" / "sd1-tiny", "sd1", seed=1),
        "sd2": build_model(out / "models" / "sd2-tiny", "sd2", seed=2),
    }
    (out / "tokenizer_cases.json").write_text(json.dumps(tokenizer_cases(pipes), ensure_ascii=False, indent=1))
    randn_cases(out)
    scheduler_fixtures(out)
    for name, pipe in pipes.items():
        stage_fixtures(name, pipe, out / "stages")
    tile_stage_fixtures(pipes["sd1"], out / "stages")
    run_fixtures(pipes, out / "runs")
    (out / "VERSIONS.json").write_text(
        json.dumps(
            {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
            indent=1,
        )
    )
    print("fixtures written to", out)


if __name__ == "__main__":
    main()
