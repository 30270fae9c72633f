#!/usr/bin/env python3
"""diffusers' side of `candela bench`: the same configs (benches/<model>, random weights), the same
inputs and the same measurements, written as the JSON `candela bench --reference` reads.

  python bench_diffusers.py --configs benches/sd15 [--device cuda --dtype f16] [--width 512 --height 512]
                            [--steps 4] [--repeats 10] [--compile] --out diffusers.json

Measured (each after a warm-up call): one prompt's encoding (median of --repeats), the denoiser forward at the batch a guided step runs (2 with
classifier-free guidance, 1 for FLUX), one VAE decode (after a warm-up), an end-to-end run of --steps, the memory the
weights take and the peak during the end-to-end run (CUDA: torch's reserved pool, which is what the
driver sees; CPU: resident set). Works with torch's CPU build (all cores) and on CUDA.
"""
import argparse
import copy
import importlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import PIL.Image
import torch

import kernel_table  # next to this file

def high_water_mark():
    """The resident set's high-water mark in bytes: VmHWM (Linux; reset by reset_high_water_mark),
    elsewhere ru_maxrss (the process's lifetime peak; bytes on macOS, KiB elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_high_water_mark():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


PROMPT = "a photo of a cat sitting on a windowsill, soft morning light"  # = timing.rs BENCH_PROMPT
# The guidance each family runs at by default in candela (what decides CFG's batch of 2).
GUIDANCE = {"StableDiffusionPipeline": 7.5, "StableDiffusionXLPipeline": 5.0,
            "StableDiffusion3Pipeline": 3.5, "FluxPipeline": 3.5}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def build(root: Path, device, dtype, without_t5=False):
    """The pipeline of model_index.json with every model built from its config, random weights
    (SD3 `without_t5`: T5-XXL left out, as `text_encoder_3=None`)."""
    import diffusers
    import transformers
    index = json.loads((root / "model_index.json").read_text())
    components = {}
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no f32 copy of a 12B model
    try:
        with torch.device(device):
            for name, spec in index.items():
                if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                    continue
                if without_t5 and name in ("text_encoder_3", "tokenizer_3"):
                    continue
                library, cls_name = spec
                folder = root / name
                if name.startswith("tokenizer"):
                    components[name] = transformers.AutoTokenizer.from_pretrained(folder)
                elif name == "scheduler":
                    # Schedulers keep their tables on the CPU (EulerDiscrete turns them into numpy).
                    cls = getattr(diffusers, cls_name)
                    with torch.device("cpu"):
                        components[name] = cls.from_config(json.loads((folder / "scheduler_config.json").read_text()))
                elif library == "transformers":
                    config = transformers.AutoConfig.from_pretrained(folder)
                    components[name] = getattr(transformers, cls_name)(config).eval()
                else:
                    cls = getattr(diffusers, cls_name)
                    components[name] = cls.from_config(json.loads((folder / "config.json").read_text())).eval()
    finally:
        torch.set_default_dtype(previous)
    cls = getattr(diffusers, index["_class_name"])
    import inspect
    for name, param in inspect.signature(cls.__init__).parameters.items():
        # Optional parts (safety checker, feature extractor, image encoder) stay out.
        if name != "self" and name not in components and param.default is inspect.Parameter.empty:
            components[name] = None
    kwargs = {"requires_safety_checker": False} if index["_class_name"] == "StableDiffusionPipeline" else {}
    pipe = cls(**components, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, index["_class_name"]


# `candela bench --profile` labels: diffusers' module classes by the name of our equivalent.
PROFILED = {"Conv2d": "Conv2d", "GroupNorm": "GroupNorm", "Linear": "Linear",
            "ResnetBlock2D": "ResnetBlock2D", "Downsample2D": "Downsample2D", "Upsample2D": "Upsample2D",
            "Attention": "Attention", "FluxAttention": "Attention", "FeedForward": "FeedForward",
            "BasicTransformerBlock": "BasicTransformerBlock", "Transformer2DModel": "Transformer2DModel",
            "JointTransformerBlock": "JointTransformerBlock", "FluxTransformerBlock": "JointTransformerBlock",
            "FluxSingleTransformerBlock": "FluxSingleTransformerBlock"}


def profile(models, run, sync, passes=1, whole="forward"):
    """Inclusive time per module kind, the device synchronised before and after every profiled
    module (as `candela bench --profile`), averaged over `passes` runs of `run`."""
    totals, calls, starts = {}, {}, {}

    def record(label, seconds):
        totals[label] = totals.get(label, 0.0) + seconds
        calls[label] = calls.get(label, 0) + 1

    def pre(module, _args):
        sync()
        starts[id(module)] = time.perf_counter()

    def post(module, _args, _out):
        sync()
        record(PROFILED[type(module).__name__], time.perf_counter() - starts.pop(id(module)))

    handles = [m.register_forward_pre_hook(pre) for model in models for m in model.modules()
               if type(m).__name__ in PROFILED]
    handles += [m.register_forward_hook(post) for model in models for m in model.modules()
                if type(m).__name__ in PROFILED]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def timed_sdpa(*a, **k):
        sync()
        t = time.perf_counter()
        out = sdpa(*a, **k)
        sync()
        record("sdpa", time.perf_counter() - t)
        return out

    torch.nn.functional.scaled_dot_product_attention = timed_sdpa
    try:
        for _ in range(passes):
            sync()
            t = time.perf_counter()
            run()
            sync()
            record(whole, time.perf_counter() - t)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    rows = [{"label": k, "calls": calls[k] // passes, "ms": totals[k] * 1000 / passes} for k in totals]
    return sorted(rows, key=lambda r: (r["label"] != whole, -r["ms"]))


def kernel_windows(part, run, sync, runs):
    """Each of `runs` calls of `run` under torch.profiler: (part, wall ms, [(kernel, start, end) ns])."""
    from torch.profiler import ProfilerActivity
    cuda = torch.cuda.is_available()
    # On a CPU the table has walls only (no device kernels): a dry run of the script. On a GPU,
    # device activity alone (no CPU op records to slow the host down) unless that yields no
    # kernel events, then both.
    activities = [[ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]] if cuda \
        else [[ProfilerActivity.CPU]]
    windows = []
    for _ in range(runs):
        for activity in activities:
            sync()
            with torch.profiler.profile(activities=activity) as prof:
                start = time.perf_counter()
                run()
                sync()
                wall_ms = (time.perf_counter() - start) * 1000
            kernels = [(e.name, int(e.time_range.start * 1000), int(e.time_range.end * 1000))
                       for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            if kernels or not cuda:
                break
        windows.append((part, wall_ms, kernels))
    return windows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=str(Path(__file__).resolve().parents[2] / "benches" / "sd15"))
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser (max-autotune-no-cudagraphs)")
    ap.add_argument("--profile", action="store_true", help="also time the denoiser and VAE decode by module")
    ap.add_argument("--kernel-trace", metavar="TABLE",
                    help="also write the kernels of each denoiser forward and a VAE decode (torch.profiler) "
                         "as kernel_table.py's JSON, to set beside candela's (tools/cuda/kernel_trace.c)")
    ap.add_argument("--without-t5", action="store_true",
                    help="SD3: leave T5-XXL out (text_encoder_3=None), as `candela bench --without-t5`")
    ap.add_argument("--out", default="diffusers.json")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def used():
        if cuda:
            return torch.cuda.memory_allocated()
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    before = used()
    pipe, kind = build(Path(args.configs), device, dtype, args.without_t5)
    sync()
    if cuda:
        weights = used() - before
    else:  # the resident set also grows with torch's own start-up: count the tensors
        weights = sum(t.numel() * t.element_size() for m in pipe.components.values()
                      if isinstance(m, torch.nn.Module) for t in (*m.parameters(), *m.buffers()))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if args.compile:
        denoiser = torch.compile(denoiser, mode="max-autotune-no-cudagraphs")
    vae = pipe.vae
    # FLUX's transformer has no sample_size; its pipeline's default is 128 latents (1024 px).
    size = denoiser.config.get("sample_size", 128) * pipe.vae_scale_factor
    width, height = args.width or size, args.height or size
    guidance = GUIDANCE[kind]
    batch = 1 if kind == "FluxPipeline" else (2 if guidance > 1 else 1)
    scale = pipe.vae_scale_factor
    h, w = height // scale, width // scale

    def timed(f):
        sync()
        t = time.perf_counter()
        out = f()
        sync()
        return out, (time.perf_counter() - t) * 1000

    def warm_timed(f, repeats=1):
        """The first output and the median of `repeats` timed calls, after a warm-up call (first-use
        costs stay out, as in candela)."""
        f()
        out, first = timed(f)
        return out, statistics.median([first] + [timed(f)[1] for _ in range(repeats - 1)])

    with torch.no_grad():
        # One prompt's encoding, without the negative side (as candela times it).
        if kind == "StableDiffusionPipeline":
            (ctx, _), text_ms = warm_timed(lambda: pipe.encode_prompt(PROMPT, device, 1, False), args.repeats)
            forward = lambda x: denoiser(x, 500.0, encoder_hidden_states=ctx.repeat(batch, 1, 1))
        elif kind == "StableDiffusionXLPipeline":
            (ctx, _, pooled, _), text_ms = warm_timed(lambda: pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False), args.repeats)
            ids = torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype)
            cond = {"text_embeds": pooled.repeat(batch, 1), "time_ids": ids}
            forward = lambda x: denoiser(x, 500.0, encoder_hidden_states=ctx.repeat(batch, 1, 1), added_cond_kwargs=cond)
        elif kind == "StableDiffusion3Pipeline":
            (ctx, _, pooled, _), text_ms = warm_timed(lambda: pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device=device,
                                                                              do_classifier_free_guidance=False,
                                                                              max_sequence_length=256), args.repeats)
            t = torch.full((batch,), 500.0, device=device)
            forward = lambda x: denoiser(hidden_states=x, timestep=t, encoder_hidden_states=ctx.repeat(batch, 1, 1),
                                         pooled_projections=pooled.repeat(batch, 1))
        elif kind == "FluxPipeline":
            tokens = 512 if denoiser.config.guidance_embeds else 256
            (ctx, pooled, text_ids), text_ms = warm_timed(lambda: pipe.encode_prompt(PROMPT, PROMPT, device=device,
                                                                                  max_sequence_length=tokens), args.repeats)
            img_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, dtype)
            t = torch.full((batch,), 0.5, device=device, dtype=dtype)
            g = torch.full((batch,), 3.5, device=device, dtype=torch.float32) if denoiser.config.guidance_embeds else None
            forward = lambda x: denoiser(hidden_states=pipe._pack_latents(x, batch, x.shape[1], h, w), timestep=t,
                                         guidance=g, pooled_projections=pooled.repeat(batch, 1),
                                         encoder_hidden_states=ctx.repeat(batch, 1, 1), txt_ids=text_ids, img_ids=img_ids)
        else:
            raise SystemExit(f"no benchmark for {kind}")
        sample = torch.randn(batch, vae.config.latent_channels, h, w, device=device, dtype=dtype)
        times = []
        for i in range(args.repeats + 1):
            _, ms = timed(lambda: forward(sample))
            print(f"denoiser forward {i}: {ms:.1f} ms{' (warm-up)' if i == 0 else ''}", flush=True)
            if i > 0:
                times.append(ms)
        # The decode as the pipeline runs it: StableDiffusionXLPipeline upcasts a half-precision
        # VAE whose config says `force_upcast` (as candela does), the other pipelines do not.
        decoder, latent = vae, sample[:1]
        if kind == "StableDiffusionXLPipeline" and dtype == torch.float16 and vae.config.force_upcast:
            decoder, latent = copy.deepcopy(vae).to(torch.float32), latent.float()
        decode = lambda: decoder.decode(latent)
        _, vae_ms = warm_timed(decode)
        # One picture's encode, from 8-bit RGB as uploaded (candela times the same).
        picture = PIL.Image.fromarray(((torch.arange(width * height * 3) * 7919) % 64 + 96)
                                      .to(torch.uint8).reshape(height, width, 3).numpy())
        _, vae_encode_ms = warm_timed(lambda: vae.encode(
            pipe.image_processor.preprocess(picture).to(device=device, dtype=dtype)).latent_dist.mean)
        profiles = {}
        if args.profile:  # as candela: 3 forwards and one decode (PROFILED_FORWARDS in bench.rs)
            profiles["denoiser_profile"] = profile([denoiser], lambda: forward(sample), sync, passes=3)
            profiles["vae_profile"] = profile([decoder], decode, sync, whole="decode")
        if args.kernel_trace:
            try:
                windows = kernel_windows("denoiser", lambda: forward(sample), sync, args.repeats)
                windows += kernel_windows("vae decode", decode, sync, 1)
                table = {"label": f"diffusers {args.dtype}", "windows": kernel_table.summarize(windows)}
                Path(args.kernel_trace).write_text(json.dumps(table, indent=1))
            except Exception as e:  # a diagnostic: the timed figures above still count
                print(f"kernel trace failed: {e!r}", flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # The high-water mark so far (for the process peak), then reset to the resident set (Linux;
        # as candela's PeakMeter) so that the run's own peak is read, not an earlier one.
        peak_before_run = high_water_mark()
        reset_high_water_mark()
        rss_before = used()
        _, e2e_ms = timed(lambda: pipe(PROMPT, width=width, height=height, num_inference_steps=args.steps,
                                       guidance_scale=guidance))
    run_high_water = high_water_mark()
    if cuda:
        peak = torch.cuda.max_memory_reserved()
    else:
        # The run's growth of the resident set over the weights.
        peak = weights + max(0, run_high_water - rss_before)
    process_peak = max(peak_before_run, run_high_water)
    import diffusers
    threads = f" threads={torch.get_num_threads()}" if not cuda else f" {torch.cuda.get_device_name()}"
    figures = {
        "label": f"diffusers {diffusers.__version__} torch {torch.__version__} {args.device} {args.dtype}{threads}"
                 + (" compiled" if args.compile else ""),
        "variant": kind,
        "width": width, "height": height, "batch": batch, "steps": args.steps,
        "text_encode_ms": text_ms,
        "denoiser_step_ms": statistics.median(times),
        "vae_decode_ms": vae_ms,
        "vae_encode_ms": vae_encode_ms,
        "end_to_end_s": e2e_ms / 1000,
        "weights_gib": weights / 2**30,
        "peak_gib": peak / 2**30,
        "process_peak_gib": process_peak / 2**30,
        **profiles,
    }
    Path(args.out).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
