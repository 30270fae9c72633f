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
import inspect
import json
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LMSDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, DDPMScheduler, HeunDiscreteScheduler, PNDMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, DDIMScheduler
from safetensors.torch import save_file

from make_fixtures import SD1_SCHEDULER, SD2_SCHEDULER

# SD 3.x's scheduler config (flow matching, static shift); saved next to the traces for the test.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
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
}
SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}
SUPPORTED_SCHEDULES = {
    "euler": ["default", "karras", "exponential"],
    "euler_a": ["default"],
    "ddim": ["default"],
    "dpmpp_2m": ["default", "karras", "exponential"],
    "dpmpp_2m_sde": ["default", "karras", "exponential"],
    "pndm": ["default"],
    "heun": ["default", "karras", "exponential"],
    "ddpm": ["default"],
    "lcm": ["default"],
    "dpm_2": ["default", "karras", "exponential"],
    "dpm_2_a": ["default", "karras", "exponential"],
    "lms": ["default", "karras", "exponential"],
}


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
    for cfg_name, cfg in [("sd1", SD1_SCHEDULER), ("sd2", SD2_SCHEDULER)]:
        for sampler, (cls, options) in SAMPLERS.items():
            for schedule in SUPPORTED_SCHEDULES[sampler]:
                for spacing in ["leading", "trailing", "linspace"]:
                    for steps in [1, 4, 5, 9, 20]:
                        if steps == 1 and schedule != "default":
                            continue
                        config = dict(cfg, timestep_spacing=spacing, **options, **SCHEDULES[schedule])
                        s = cls.from_config(config)
                        s.set_timesteps(steps)
                        name = f"{cfg_name}-{sampler}-{schedule}-{spacing}-{steps}"
                        g = torch.Generator("cpu").manual_seed(SEED)
                        x = torch.randn(SHAPE, generator=g) * s.init_noise_sigma
                        inputs, outputs, samples = [], [], [x.clone()]
                        for t in s.timesteps:
                            inp = s.scale_model_input(x, t)
                            eps = fake_model(inp, t)
                            extra = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
                            x = s.step(eps, t, x, **extra).prev_sample
                            inputs.append(inp)
                            outputs.append(eps)
                            samples.append(x.clone())
                        tensors[f"{name}/inputs"] = torch.stack(inputs).contiguous()
                        tensors[f"{name}/model_outputs"] = torch.stack(outputs).contiguous()
                        tensors[f"{name}/samples"] = torch.stack(samples).contiguous()
                        index.append(
                            {
                                "name": name,
                                "config": cfg_name,
                                "sampler": sampler,
                                "schedule": schedule,
                                "timestep_spacing": spacing,
                                "steps": steps,
                                "timesteps": [float(t) for t in s.timesteps],
                                "sigmas": [float(v) for v in s.sigmas] if hasattr(s, "sigmas") else None,
                                "init_noise_sigma": float(s.init_noise_sigma),
                            }
                        )
    (out / "sd3_scheduler_config.json").write_text(json.dumps(SD3_SCHEDULER, indent=2))
    for sampler, (cls, options) in FLOW_SAMPLERS.items():
        for steps in [1, 4, 5, 9, 20, 28]:
            s = cls.from_config(dict(SD3_SCHEDULER, **options))
            s.set_timesteps(steps)
            name = f"sd3-{sampler}-default-linspace-{steps}"
            g = torch.Generator("cpu").manual_seed(SEED)
            x = torch.randn(SHAPE, generator=g)
            inputs, outputs, samples = [], [], [x.clone()]
            for t in s.timesteps:
                inputs.append(x.clone())  # flow samplers feed the sample to the model unscaled
                eps = fake_model(x, t)
                x = s.step(eps, t, x, generator=g).prev_sample
                outputs.append(eps)
                samples.append(x.clone())
            tensors[f"{name}/inputs"] = torch.stack(inputs).contiguous()
            tensors[f"{name}/model_outputs"] = torch.stack(outputs).contiguous()
            tensors[f"{name}/samples"] = torch.stack(samples).contiguous()
            index.append({"name": name, "config": "sd3", "sampler": sampler, "schedule": "default",
                          "timestep_spacing": "linspace", "steps": steps,
                          "timesteps": [float(t) for t in s.timesteps], "sigmas": [float(v) for v in s.sigmas],
                          "init_noise_sigma": 1.0})
    save_file(tensors, out / "traces.safetensors")
    (out / "traces.json").write_text(json.dumps({"seed": SEED, "shape": SHAPE, "traces": index}))
    print(f"{len(index)} traces written to {out}")


if __name__ == "__main__":
    main()
