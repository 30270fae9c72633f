#!/usr/bin/env python3
"""Step-by-step sampler traces from diffusers, for tests/fixtures/samplers/.

For each sampler x schedule x spacing x prediction type: build the scheduler exactly as a user
would (`Class.from_config(model_scheduler_config, **options)`), run `set_timesteps`, then drive it
with a fixed fake model (a deterministic function of the scaled input and the timestep), recording
the timesteps, sigmas, the model outputs fed in and every `step()` result. Noise for stochastic
samplers comes from `torch.Generator("cpu").manual_seed(seed)`, as in the pipelines.

Usage: .venv/bin/python make_sampler_traces.py [--out ../../tests/fixtures/samplers]
"""
import argparse
import gzip
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler, LMSDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, DDPMScheduler, HeunDiscreteScheduler, PNDMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, DDIMScheduler
from safetensors.torch import save, save_file

from make_fixtures import SD1_SCHEDULER, SD2_SCHEDULER

# SD 3.x's scheduler config (flow matching, static shift) and FLUX.1-dev's (resolution-dependent
# shift); saved next to the traces for the test.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLOW_SAMPLERS = {"flow_euler": (FlowMatchEulerDiscreteScheduler, {})}

SHAPE = (1, 4, 4, 4)
SEED = 1234

SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "pndm": (PNDMScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    # ComfyUI's / diffusers' docs' mapping: the default sigmas at trailing spacing.
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
ALL = ["default", "karras", "exponential", "beta", "sgm_uniform"]
SUPPORTED_SCHEDULES = {
    "euler": ALL,
    "euler_a": ["default", "sgm_uniform"],
    "ddim": ["default", "sgm_uniform"],
    "dpmpp_2m": ALL,
    "dpmpp_2m_sde": ALL,
    "pndm": ["default", "sgm_uniform"],
    "heun": ALL,
    "ddpm": ["default", "sgm_uniform"],
    "lcm": ["default"],
    "dpm_2": ALL,
    "dpm_2_a": ALL,
    "lms": ALL,
    "unipc": ALL,
}
# The schedules added later are traced at fewer spacings/step counts to keep the fixture small.
FULL_SCHEDULES = ["default", "karras", "exponential"]

# Model-config features and per-job options beyond the defaults: (sampler, base config, schedule,
# config overrides, options). Options go to the sampler as a user's request would set them.
VARIANTS = [
    ("dpmpp_2m", "sd1", "default", {}, {"solver_order": 3}),
    ("dpmpp_2m", "sd1", "karras", {}, {"solver_order": 3}),
    ("dpmpp_2m", "sd1", "default", {}, {"solver_order": 1}),
    ("dpmpp_2m_sde", "sd1", "default", {}, {"solver_order": 3}),
    ("dpmpp_2m", "sd2", "default", {"euler_at_final": True, "lower_order_final": False}, {"solver_order": 3}),
    ("dpmpp_2m", "sd1", "default", {"solver_type": "heun"}, {}),
    ("dpmpp_2m", "sd1", "default", {"final_sigmas_type": "sigma_min"}, {}),
    ("unipc", "sd1", "default", {}, {"solver_order": 1}),
    ("unipc", "sd1", "default", {}, {"solver_order": 3}),
    ("unipc", "sd2", "karras", {}, {"solver_order": 3}),
    ("unipc", "sd1", "default", {"solver_type": "bh1"}, {}),
    ("unipc", "sd1", "default", {"predict_x0": False}, {}),
    ("unipc", "sd2", "default", {"predict_x0": False}, {"solver_order": 3}),
    ("unipc", "sd1", "default", {"disable_corrector": [0, 2]}, {}),
    # (lower_order_final=False with a final sigma of 0 divides by zero in diffusers; we refuse it)
    ("unipc", "sd1", "default", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, {"solver_order": 3}),
    ("unipc", "sd1", "exponential", {"final_sigmas_type": "sigma_min"}, {}),
    ("unipc", "sd1", "default", {"final_sigmas_type": "sigma_min"}, {}),
    # Dynamic thresholding (s from the 0.9 quantile of |x0|, up to 1.5).
    *[(k, "sd1", "default", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}, {})
      for k in ["ddim", "ddpm", "lcm", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]],
    # Zero terminal SNR (v-prediction, as the models trained for it).
    *[(k, "sd2", "default", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {})
      for k in ["ddim", "ddpm", "lcm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]],
    ("euler", "sd2", "karras", {"rescale_betas_zero_snr": True}, {}),
]

def fake_model(x, t):
    """Deterministic stand-in for a UNet: smooth, input- and timestep-dependent."""
    return 0.8 * torch.tanh(x) + 0.05 * torch.cos(x * 3.0) + (float(t) / 1000.0) * 0.1


def main():
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(here.parent.parent / "tests" / "fixtures" / "samplers"))
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = []
    tensors = {}

    def trace(name, cls, base_name, config, steps, options=None, set_kwargs=None, flow=False, **meta):
        print("trace", name, flush=True)
        s = cls.from_config(config)
        set_kwargs = set_kwargs or {}
        if "sigmas" in set_kwargs:
            s.set_timesteps(**set_kwargs)
        else:
            s.set_timesteps(steps, **set_kwargs)
        g = torch.Generator("cpu").manual_seed(SEED)
        x = torch.randn(SHAPE, generator=g) * (1.0 if flow else s.init_noise_sigma)
        inputs, outputs, samples = [], [], [x.clone()]
        for t in s.timesteps:
            # flow samplers feed the sample to the model unscaled
            inp = x.clone() if flow else s.scale_model_input(x, t)
            eps = fake_model(inp, t)
            extra = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
            x = s.step(eps, t, x, **extra).prev_sample
            inputs.append(inp)
            outputs.append(eps)
            samples.append(x.clone())
        tensors[f"{name}/inputs"] = torch.stack(inputs).contiguous()
        tensors[f"{name}/model_outputs"] = torch.stack(outputs).contiguous()
        tensors[f"{name}/samples"] = torch.stack(samples).contiguous()
        entry = {
            "name": name,
            "config": base_name,
            "steps": steps,
            "timesteps": [float(t) for t in s.timesteps],
            "sigmas": [float(v) for v in s.sigmas] if hasattr(s, "sigmas") else None,
            "init_noise_sigma": 1.0 if flow else float(s.init_noise_sigma),
            "options": options or {},
        }
        entry.update(meta)
        index.append(entry)

    for cfg_name, cfg in [("sd1", SD1_SCHEDULER), ("sd2", SD2_SCHEDULER)]:
        for sampler, (cls, options) in SAMPLERS.items():
            for schedule in SUPPORTED_SCHEDULES[sampler]:
                full = schedule in FULL_SCHEDULES
                for spacing in ["leading", "trailing", "linspace"] if full else ["leading", "linspace"]:
                    for steps in [1, 4, 5, 9, 20] if full else [4, 9]:
                        if steps == 1 and schedule != "default":
                            continue
                        config = dict(cfg, timestep_spacing=spacing, **options)
                        config.update(SCHEDULES[schedule])
                        name = f"{cfg_name}-{sampler}-{schedule}-{spacing}-{steps}"
                        trace(name, cls, cfg_name, config, steps, sampler=sampler, schedule=schedule,
                              timestep_spacing=spacing, overrides={})
    for n, (sampler, cfg_name, schedule, overrides, opts) in enumerate(VARIANTS):
        cls, options = SAMPLERS[sampler]
        cfg = {"sd1": SD1_SCHEDULER, "sd2": SD2_SCHEDULER}[cfg_name]
        spacing = overrides.get("timestep_spacing", "linspace")
        for steps in [1, 5, 12, 20]:
            if steps == 1 and schedule != "default":
                continue
            config = dict(cfg, timestep_spacing=spacing, **options)
            config.update(SCHEDULES[schedule])
            config.update(overrides)
            config.update(opts)
            name = f"variant{n}-{cfg_name}-{sampler}-{schedule}-{steps}"
            trace(name, cls, cfg_name, config, steps, options=opts, sampler=sampler, schedule=schedule,
                  timestep_spacing=spacing, overrides=overrides)

    (out / "sd3_scheduler_config.json").write_text(json.dumps(SD3_SCHEDULER, indent=2))
    (out / "flux_scheduler_config.json").write_text(json.dumps(FLUX_SCHEDULER, indent=2))
    for sampler, (cls, options) in FLOW_SAMPLERS.items():
        for schedule in ["default", "karras", "exponential", "beta"]:
            for steps in [1, 4, 5, 9, 20, 28] if schedule == "default" else [4, 9]:
                trace(f"sd3-{sampler}-{schedule}-{steps}", cls, "sd3",
                      dict(SD3_SCHEDULER, **options, **SCHEDULES[schedule]), steps, flow=True,
                      sampler=sampler, schedule=schedule, timestep_spacing="linspace", overrides={})
        trace(f"sd3-{sampler}-terminal-9", cls, "sd3", dict(SD3_SCHEDULER, shift_terminal=0.1), 9, flow=True,
              sampler=sampler, schedule="default", timestep_spacing="linspace", overrides={"shift_terminal": 0.1})
        # FLUX: resolution-dependent shift, mu from the token count (as the FLUX pipeline computes it),
        # from the default sigmas and from the pipeline's explicit linspace(1, 1/n, n).
        for seq_len in [256, 1024, 4096]:
            m = (1.15 - 0.5) / (4096 - 256)
            mu = seq_len * m + (0.5 - m * 256)
            for steps in [4, 28]:
                trace(f"flux-{sampler}-default-{seq_len}-{steps}", cls, "flux", dict(FLUX_SCHEDULER), steps,
                      options={"image_seq_len": seq_len}, set_kwargs={"mu": mu}, flow=True,
                      sampler=sampler, schedule="default", timestep_spacing="linspace", overrides={})
                sig = [float(v) for v in np.linspace(1.0, 1 / steps, steps)]
                trace(f"flux-{sampler}-explicit-{seq_len}-{steps}", cls, "flux", dict(FLUX_SCHEDULER), steps,
                      options={"image_seq_len": seq_len, "flow_sigmas": sig},
                      set_kwargs={"sigmas": sig, "mu": mu}, flow=True, sampler=sampler, schedule="default",
                      timestep_spacing="linspace", overrides={})
    img2img(out)
    # gzip (no timestamp, so the bytes are reproducible): 9.4 → 6.0 MB, room under the GPU
    # machine's 64 MiB carry limit, which the whole tracked tree counts against.
    (out / "traces.safetensors.gz").write_bytes(gzip.compress(save(tensors), compresslevel=9, mtime=0))
    (out / "traces.json").write_text(json.dumps({"seed": SEED, "shape": SHAPE, "traces": index}))
    print(f"{len(index)} traces written to {out}")


def img2img(out: Path):
    """Image-to-image starts: diffusers' pipelines take timesteps[t_start * order:], call
    set_begin_index, and noise the clean latents with add_noise at the first of them."""
    index, tensors = [], {}
    for cfg_name, cfg in [("sd1", SD1_SCHEDULER), ("sd2", SD2_SCHEDULER)]:
        for sampler, (cls, options) in SAMPLERS.items():
            for spacing in ["leading", "linspace"]:
                for steps, strength in [(9, 0.6), (20, 0.3), (10, 1.0)]:
                    s = cls.from_config(dict(cfg, timestep_spacing=spacing, **options))
                    s.set_timesteps(steps)
                    init_timestep = min(int(steps * strength), steps)
                    t_start = max(steps - init_timestep, 0)
                    begin = t_start * s.order
                    ts = s.timesteps[begin:]
                    if hasattr(s, "set_begin_index"):
                        s.set_begin_index(begin)
                    g = torch.Generator("cpu").manual_seed(SEED)
                    x0 = torch.randn(SHAPE, generator=g)
                    noise = torch.randn(SHAPE, generator=g)
                    x = s.add_noise(x0, noise, ts[:1])
                    name = f"{cfg_name}-{sampler}-{spacing}-{steps}-{strength}"
                    inputs, outputs, samples = [], [], [x.clone()]
                    for t in ts:
                        inp = s.scale_model_input(x, t)
                        eps = fake_model(inp, t)
                        extra = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
                        x = s.step(eps, t, x, **extra).prev_sample
                        inputs.append(inp)
                        outputs.append(eps)
                        samples.append(x.clone())
                    tensors[f"{name}/x0"] = x0.contiguous()
                    tensors[f"{name}/noise"] = noise.contiguous()
                    tensors[f"{name}/inputs"] = torch.stack(inputs).contiguous()
                    tensors[f"{name}/model_outputs"] = torch.stack(outputs).contiguous()
                    tensors[f"{name}/samples"] = torch.stack(samples).contiguous()
                    index.append(dict(name=name, config=cfg_name, sampler=sampler, timestep_spacing=spacing,
                                      steps=steps, strength=strength, begin=begin, order=s.order))
    save_file(tensors, out / "img2img.safetensors")
    (out / "img2img.json").write_text(json.dumps({"seed": SEED, "shape": SHAPE, "traces": index}))
    print(f"{len(index)} image-to-image traces")


if __name__ == "__main__":
    main()
