//! `candela bench`: prompt encoding, denoiser step, VAE decode and end-to-end times plus weights
//! and peak memory, for any family, printed as a table next to diffusers' figures for the same
//! configs and shapes (from `tools/bench/bench_diffusers.py`, run on the same machine).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};

use serde::{Deserialize, Serialize};

use super::CommonArgs;
use crate::engine::{
    self,
    loader::ModelDir,
    memory::{self, PeakMeter},
    pipelines::{
        read_card,
        sd::GenerateParams,
        timing::{BenchShape, BENCH_PROMPT},
        Family, LoadOptions, Pipeline,
    },
    schedulers::SchedulerConfig,
    schedulers::SigmaSchedule,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A folder of diffusers configs to build with random weights: any family (`benches/` has
    /// the real SD 1.5, SDXL, SD3.5 Large and FLUX.1-dev architectures).
    #[arg(long, default_value = "benches/sd15")]
    pub configs: PathBuf,
    /// Benchmark a real model (folder or repo id) with its weights instead of random ones.
    #[arg(long)]
    pub model: Option<String>,
    /// Image side in pixels (the model's default size when unset).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// Rows of the timed denoiser forward: 2 (guidance) for models that use classifier-free
    /// guidance by default, 1 for guidance-distilled ones (FLUX, Turbo).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Denoising steps of the end-to-end run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Timed denoiser forwards and prompt encodings (after one warm-up); the medians are
    /// reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// diffusers' figures (JSON from tools/bench/bench_diffusers.py) to print alongside.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Write our figures as JSON here too.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Also replay the denoiser forward as one CUDA graph and time it, and run the end-to-end
    /// generation again with its steps replayed as CUDA graphs (every family), timed and
    /// compared with the eager run's latents (an experiment: turns off cudarc's event tracking
    /// for this process, which graph capture cannot record).
    #[arg(long)]
    pub cuda_graph: bool,
    /// Load as `serve --quantize FMT` (transformer blocks: fp8, q8_0, q4k, …; on the
    /// CPU, `q8_0-compact` holds the blocks once, as serve does where twice would not fit).
    #[arg(long)]
    pub quantize: Option<String>,
    /// The transformer from this file (a path, or `owner/name/file` on the hub; GGUF or
    /// safetensors), the other components random: what a community file's formats cost.
    #[arg(long)]
    pub transformer: Option<String>,
    /// Instead: write the FLUX transformer of --configs with random weights to this GGUF file,
    /// in BFL's naming, its blocks' layers in --quantize's format (q4k, q8_0, …), other
    /// matrices f16 — a real-size GGUF file to bench with --transformer.
    #[arg(long)]
    pub write_random_gguf: Option<PathBuf>,
    /// Load as `serve --quantize-t5 FMT` (T5-XXL's Linear layers: q8_0, q6k, q4k, …).
    #[arg(long)]
    pub quantize_t5: Option<String>,
    /// Load as `serve --vae-tiling`.
    #[arg(long)]
    pub vae_tiling: bool,
    /// Load as `serve --without-t5` (SD3: T5-XXL left out, its part of the prompt zeros): SD3.5
    /// on a machine whose memory T5-XXL (9.5 GB as its checkpoints store it) would not leave
    /// room for the transformer.
    #[arg(long)]
    pub without_t5: bool,
    /// The fused CUDA attention kernel the models run: `auto` (the default: on H100/H200
    /// `hopper-128` at head size 128 and `hopper` at 64, `tiled` elsewhere), one kernel for
    /// every head size (`hopper`, `hopper-128`, `tiled`, or a candidate: `pipelined`, `wide`,
    /// the 128-key tiles `hopper-k128`, `hopper-128-k128`) to time whole models with it, or
    /// `cudnn`: cuDNN's fused attention (graph API; the default kernels for a shape it has no
    /// plan for), or `fastest`: per shape, the fastest of every kernel that runs it and cuDNN's
    /// plan, each timed on the shape's first call and checked against the default kernel (every
    /// entrant's time is logged).
    #[arg(long, default_value = "auto")]
    pub attention_kernel: String,
    /// The cuDNN API of the half-precision convolutions: `auto` (the default: the graph API on
    /// H100/H200, where it was measured, with the legacy plan for a shape it cannot run; on
    /// other cards `fastest`: per shape, the API whose plan ran it faster when first met), or
    /// `graph`, `legacy` or `fastest`, to time whole models with it.
    #[arg(long, default_value = "auto")]
    pub conv_engine: String,
    /// Fused CUDA paths to switch off for this run, comma-separated (`deferred-bias`, `qk-norm`,
    /// `upsample`, `layer-norm-modulate`, `token-major-rope`, `fp8-linear`, `attention`, `group-norm`,
    /// `strided-gemm`, `layer-norm`, `fp8-gemv`): a whole
    /// model timed without them, against the default run — what each one buys.
    #[arg(long, value_delimiter = ',')]
    pub switch_off: Vec<String>,
    /// Also time the denoiser and the VAE decode module by module (the device waits at every
    /// module boundary): the table diffusers' side prints with `--profile` too.
    #[arg(long)]
    pub profile: bool,
    /// Instead of timing: measure each sampler's accuracy against a 1000-step solve with an
    /// exact analytic denoiser, using the noise schedule of --configs.
    #[arg(long)]
    pub sampler_study: bool,
    /// Instead: time the CPU kernels (convolutions, attention, GroupNorm, GEGLU) against
    /// candle's ops at SD 1.5 and VAE shapes; on a GPU, the ops of every family's step at its
    /// shapes (each cuDNN algorithm for the convolutions), as JSON lines to --json-out for
    /// tools/bench/gpu/kernels_torch.py.
    #[arg(long)]
    pub kernels: bool,
    /// Instead: generate with the tiny test models of every family on the CPU (f32) and on
    /// --device/--dtype, and report how far apart the results are.
    #[arg(long)]
    pub device_parity: bool,
    /// Where --device-parity finds the tiny models.
    #[arg(long, default_value = "tests/fixtures/models")]
    pub fixtures: PathBuf,
    /// Instead: start a real server on loopback and drive it with concurrent clients (scheduler
    /// overhead per job, throughput with and without batching).
    #[arg(long)]
    pub server_load: bool,
    /// Concurrent clients of --server-load.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests per --server-load pass.
    #[arg(long, default_value_t = 48)]
    pub requests: usize,
}

/// One side's figures; diffusers' script writes the same fields.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchFigures {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub variant: String,
    pub width: usize,
    pub height: usize,
    #[serde(default)]
    pub batch: usize,
    pub steps: usize,
    #[serde(default)]
    pub text_encode_ms: Option<f64>,
    #[serde(alias = "unet_step_ms")]
    pub denoiser_step_ms: f64,
    pub vae_decode_ms: f64,
    /// One picture's VAE encode (img2img, inpainting); absent from older figures.
    #[serde(default)]
    pub vae_encode_ms: Option<f64>,
    pub end_to_end_s: f64,
    /// Memory held once the model is built (weights), GiB.
    #[serde(default)]
    pub weights_gib: Option<f64>,
    /// Peak memory during the end-to-end run, weights included, GiB.
    #[serde(default)]
    pub peak_gib: Option<f64>,
    /// The process's largest resident set (host memory) over the whole benchmark, runtime and
    /// libraries included, GiB: what a machine needs to run it. The same on any device.
    #[serde(default)]
    pub process_peak_gib: Option<f64>,
    /// `--cuda-graph`: the denoiser forward replayed as one CUDA graph (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoiser_step_graph_ms: Option<f64>,
    /// `--cuda-graph`: why the capture failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graph_error: Option<String>,
    /// `--cuda-graph`: the end-to-end run again with its steps replayed as CUDA graphs (s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_to_end_graph_s: Option<f64>,
    /// `--cuda-graph`: the largest difference between that run's final latents and the eager
    /// run's (the same kernels on the same inputs: 0 expected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_latents_max_diff: Option<f64>,
    /// `--profile`: one denoiser forward and one VAE decode by module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denoiser_profile: Vec<ProfileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vae_profile: Vec<ProfileEntry>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Denoiser forwards `--profile` runs (their per-module times are averaged).
const PROFILED_FORWARDS: usize = 3;

/// One module kind in a `--profile` table: calls per pass and their inclusive time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileEntry {
    pub label: String,
    pub calls: usize,
    pub ms: f64,
}

/// The layers a run held quantized, for its label (nothing when dense).
fn quantized_label(options: &LoadOptions) -> String {
    let dense = crate::engine::models::quantized::WeightFormat::Dense;
    let mut label = String::new();
    if options.transformer_format != dense {
        label += &format!(" quantize={}", options.transformer_format);
    }
    if options.t5_format != dense {
        label += &format!(" quantize-t5={}", options.t5_format);
    }
    if let Some(name) = (options.transformer_file.as_deref()).and_then(|f| f.file_name()) {
        label += &format!(" transformer={}", name.to_string_lossy());
    }
    label
}

fn profile_entries(rows: &[engine::profile::ProfileRow]) -> Vec<ProfileEntry> {
    rows.iter()
        .map(|r| ProfileEntry {
            label: r.label.to_string(),
            calls: r.calls,
            ms: r.total_ms,
        })
        .collect()
}

pub fn run(common: &CommonArgs, args: BenchArgs) -> anyhow::Result<()> {
    if args.server_load {
        return super::load_bench::run(
            common,
            super::load_bench::LoadSettings {
                clients: args.clients.max(1),
                requests: args.requests.max(1),
                size: 64,
                steps: args.steps,
            },
        );
    }
    run_engine(common, args)
}

/// The one of `choices` that `name_of` calls `name`, or an error listing them.
#[cfg(feature = "cuda")]
fn choice<T: Copy>(
    flag: &str,
    name: &str,
    choices: &[T],
    name_of: fn(T) -> &'static str,
) -> anyhow::Result<T> {
    choices
        .iter()
        .copied()
        .find(|c| name_of(*c) == name)
        .ok_or_else(|| {
            let names: Vec<_> = choices.iter().map(|c| name_of(*c)).collect();
            anyhow::anyhow!("{flag} {name}: one of {}", names.join(", "))
        })
}

/// `--attention-kernel`: the fused attention kernel the models run in this process.
fn select_attention_kernel(name: &str) -> anyhow::Result<()> {
    // The default: a Hopper kernel by head size (engine::cuda::attention::model_kernel).
    if name == "auto" {
        return Ok(());
    }
    // cuDNN's fused attention, with the default kernels for shapes it has no plan for.
    #[cfg(feature = "cudnn")]
    if name == "cudnn" {
        engine::cuda::attention::set_selection(engine::cuda::attention::Selection::Cudnn);
        return Ok(());
    }
    // Per shape, the fastest of every kernel that runs it and cuDNN's plan.
    #[cfg(feature = "cuda")]
    if name == "fastest" {
        engine::cuda::attention::set_selection(engine::cuda::attention::Selection::Fastest);
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        use engine::cuda::attention::{set_model_kernel, Kernel};
        set_model_kernel(choice(
            "--attention-kernel",
            name,
            &Kernel::ALL,
            Kernel::name,
        )?);
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    match name {
        // The kernels the default picks from, and the one it falls back on: nothing to choose
        // without CUDA.
        "hopper" | "hopper-128" | "tiled" => Ok(()),
        other => anyhow::bail!("--attention-kernel {other} needs a build with the cuda feature"),
    }
}

/// `--conv-engine`: the cuDNN API of the models' half-precision convolutions in this process.
fn select_conv_engine(name: &str) -> anyhow::Result<()> {
    if name == "auto" {
        return Ok(());
    }
    #[cfg(feature = "cudnn")]
    {
        use engine::cuda::conv_graph::{set_engine, ConvEngine};
        set_engine(choice(
            "--conv-engine",
            name,
            &ConvEngine::ALL,
            ConvEngine::name,
        )?);
        Ok(())
    }
    #[cfg(not(feature = "cudnn"))]
    match name {
        // Without cuDNN no convolution goes through either API.
        "graph" | "legacy" => Ok(()),
        other => anyhow::bail!("--conv-engine {other} needs a build with the cudnn feature"),
    }
}

/// `--switch-off`: fused CUDA paths this process runs without.
fn switch_off(names: &[String]) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    for name in names {
        use engine::cuda::self_check::{switch_off, Fused};
        switch_off(choice("--switch-off", name, &Fused::ALL, Fused::name)?);
    }
    #[cfg(not(feature = "cuda"))]
    if let Some(name) = names.first() {
        anyhow::bail!("--switch-off {name} needs a build with the cuda feature");
    }
    Ok(())
}

/// Every benchmark but the server's (the `candela-bench` binary has no server in it).
pub fn run_engine(common: &CommonArgs, args: BenchArgs) -> anyhow::Result<()> {
    if args.server_load {
        anyhow::bail!("--server-load needs the server: run `candela bench --server-load`");
    }
    // Before the device opens: its self-check tests the kernels the models will run.
    select_attention_kernel(&args.attention_kernel)?;
    select_conv_engine(&args.conv_engine)?;
    switch_off(&args.switch_off)?;
    let device = engine::parse_device(&args.device)?;
    let dtype = engine::parse_dtype(&args.dtype)?;
    // Graph capture cannot record cudarc's cross-stream events; this process runs on one thread
    // and one stream, so it can do without them (tensors made from now on).
    #[cfg(feature = "cuda")]
    if let (true, candle_core::Device::Cuda(dev)) = (args.cuda_graph, &device) {
        unsafe { dev.disable_event_tracking() };
    }
    if args.device_parity {
        return super::device_parity::run(
            &args.fixtures,
            &device,
            dtype,
            &format!("{} {}", args.device, args.dtype),
        );
    }
    if args.kernels {
        if device.is_cpu() && dtype == candle_core::DType::F32 {
            return super::kernel_bench::run(args.repeats);
        }
        return super::device_kernel_bench::run(
            &device,
            dtype,
            args.repeats,
            args.json_out.as_deref(),
        );
    }
    let configs = ModelDir {
        root: args.configs.clone(),
        prefer_fp16_variant: false,
    };
    if args.sampler_study {
        return sampler_study(&configs.read_json("scheduler/scheduler_config.json")?);
    }
    if let Some(path) = &args.write_random_gguf {
        let format = super::weight_format(args.quantize.as_deref())?;
        super::random_gguf::write(&configs, format, path)?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    let transformer_file = (args.transformer.as_deref())
        .map(|spec| {
            let source = crate::engine::loader::FileSource::parse(spec)?;
            crate::engine::loader::resolve_file(&source, &common.hub_options())
        })
        .transpose()?;
    let (dir, label) = match &args.model {
        Some(spec) => (
            super::generate::resolve_model(common, Some(spec), dtype)?,
            spec.clone(),
        ),
        None => (
            configs,
            format!("{} (random weights)", args.configs.display()),
        ),
    };
    let card = read_card(&dir, &label)?;
    let width = args.width.unwrap_or(card.default_size);
    let height = args.height.unwrap_or(card.default_size);
    let batch = args.batch.unwrap_or(
        if card.family != Family::Flux && card.default_guidance > 1.0 {
            2
        } else {
            1
        },
    );

    let sync = || -> engine::error::Result<()> { Ok(device.synchronize()?) };
    let meter = PeakMeter::start(&device);
    let baseline = meter.baseline();
    let load_start = Instant::now();
    let options = LoadOptions {
        vae_tiling: args.vae_tiling,
        without_t5: args.without_t5,
        transformer_format: super::weight_format(args.quantize.as_deref())?,
        t5_format: super::t5_format(args.quantize_t5.as_deref())?,
        transformer_file,
        ..Default::default()
    };
    let pipeline = if args.model.is_some() {
        Pipeline::load(&dir, &device, dtype, &options)?
    } else {
        Pipeline::with_random_weights(&dir, &device, dtype, &options)
            .with_context(|| format!("building {} with random weights", args.configs.display()))?
    };
    sync()?;
    let weights = meter.finish();
    eprintln!(
        "built {label} ({}) in {:.1}s{}",
        card.variant,
        load_start.elapsed().as_secs_f64(),
        weights
            .map(|b| format!(", {:.2} GiB", b as f64 / GIB))
            .unwrap_or_default()
    );

    let parts = pipeline.time_parts(
        BenchShape {
            width,
            height,
            batch,
            repeats: args.repeats,
            profiled_forwards: if args.profile { PROFILED_FORWARDS } else { 0 },
            cuda_graph: args.cuda_graph,
        },
        &sync,
        &mut |line| eprintln!("{line}"),
    )?;

    let params = GenerateParams {
        steps: args.steps,
        ..GenerateParams::with_defaults(&card, BENCH_PROMPT, width, height)
    };
    // Counted from before the build: weights, kernels' caches (the CPU's Winograd buffer) and the
    // run's working memory.
    let meter = PeakMeter::start_from(&device, Some(baseline));
    let generate = || -> anyhow::Result<TimedGeneration> {
        let t = Instant::now();
        let generated = pipeline.generate(&params, &mut |p| {
            eprintln!(
                "step {}/{}: {:.2} steps/s",
                p.step,
                p.total,
                p.steps_per_second()
            );
            true
        })?;
        sync()?;
        Ok((generated, t.elapsed().as_secs_f64()))
    };
    let (eager, end_to_end) = generate()?;
    let peak = meter.finish();
    let graph_run = graph_generation(args.cuda_graph, &device, &generate, &eager)?;
    drop(eager);

    let ours = BenchFigures {
        label: format!(
            "candela {} {} {}{}{}",
            args.device,
            args.dtype,
            label,
            // As diffusers' label: what the CPU figures depend on.
            if device.is_cpu() {
                format!(" threads={}", rayon::current_num_threads())
            } else {
                String::new()
            },
            quantized_label(&options),
        ),
        variant: card.variant.clone(),
        width,
        height,
        batch,
        steps: args.steps,
        text_encode_ms: Some(parts.text_encode_ms),
        denoiser_step_ms: engine::pipelines::timing::median(parts.denoiser_ms),
        vae_decode_ms: parts.vae_decode_ms,
        vae_encode_ms: Some(parts.vae_encode_ms),
        end_to_end_s: end_to_end,
        weights_gib: weights.map(|b| b as f64 / GIB),
        peak_gib: peak.map(|b| b as f64 / GIB),
        process_peak_gib: memory::process_peak_resident().map(|b| b as f64 / GIB),
        denoiser_step_graph_ms: parts.graph_forward_ms.clone().and_then(|r| r.ok()),
        cuda_graph_error: parts.graph_forward_ms.clone().and_then(|r| r.err()),
        end_to_end_graph_s: graph_run.map(|(s, _)| s),
        graph_latents_max_diff: graph_run.map(|(_, d)| d),
        denoiser_profile: profile_entries(&parts.profiles.denoiser),
        vae_profile: profile_entries(&parts.profiles.vae_decode),
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&ours)?)?;
    }
    let reference: Option<BenchFigures> = match &args.reference {
        Some(p) => Some(serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    print_table(&ours, reference.as_ref());
    if let Some(error) = &ours.cuda_graph_error {
        println!("CUDA graph: {error}");
    }
    if let (Some(s), Some(diff)) = (ours.end_to_end_graph_s, ours.graph_latents_max_diff) {
        println!(
            "end to end with CUDA-graph steps: {s:.3} s (eager {:.3} s), latents within {diff:.3e} of the eager run's",
            ours.end_to_end_s
        );
    }
    for (name, ours, theirs) in [
        (
            "denoiser forward",
            &ours.denoiser_profile,
            reference.as_ref().map(|r| &r.denoiser_profile),
        ),
        (
            "VAE decode",
            &ours.vae_profile,
            reference.as_ref().map(|r| &r.vae_profile),
        ),
    ] {
        print_profile(name, ours, theirs);
    }
    Ok(())
}

type TimedGeneration = (engine::pipelines::sd::Generated, f64);

/// `--cuda-graph`: the same generation with its steps replayed as CUDA graphs, its time (s) and
/// its latents' largest difference from the eager run's.
fn graph_generation(
    asked: bool,
    device: &candle_core::Device,
    generate: &dyn Fn() -> anyhow::Result<TimedGeneration>,
    eager: &engine::pipelines::sd::Generated,
) -> anyhow::Result<Option<(f64, f64)>> {
    if !asked || !device.is_cuda() {
        return Ok(None);
    }
    // SAFETY: event tracking was turned off when the device was opened, for `--cuda-graph`.
    unsafe { engine::pipelines::set_step_graphs(true) };
    let run = generate();
    unsafe { engine::pipelines::set_step_graphs(false) };
    let (graphed, seconds) = run?;
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32);
    let diff = (f32(&graphed.latents)? - f32(&eager.latents)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    Ok(Some((seconds, diff as f64)))
}

/// Per-module times side by side, rows in our order then the reference's own.
fn print_profile(name: &str, ours: &[ProfileEntry], theirs: Option<&Vec<ProfileEntry>>) {
    if ours.is_empty() {
        return;
    }
    println!("\n{name} by module (inclusive ms per pass, device synchronised at each module)");
    println!("| module | calls | candela ms | diffusers calls | diffusers ms | ratio |");
    println!("|---|---|---|---|---|---|");
    let theirs = theirs.map(Vec::as_slice).unwrap_or_default();
    let find = |label: &str| theirs.iter().find(|t| t.label == label);
    for row in ours {
        let (calls, ms, ratio) = match find(&row.label) {
            Some(t) => (
                t.calls.to_string(),
                format!("{:.2}", t.ms),
                format!("{:.2}x", row.ms / t.ms.max(1e-9)),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.2} | {calls} | {ms} | {ratio} |",
            row.label, row.calls, row.ms
        );
    }
    for t in theirs
        .iter()
        .filter(|t| !ours.iter().any(|o| o.label == t.label))
    {
        println!("| {} | - | - | {} | {:.2} | - |", t.label, t.calls, t.ms);
    }
}

fn print_table(ours: &BenchFigures, reference: Option<&BenchFigures>) {
    println!(
        "{} [{}] at {}x{}, denoiser batch {}, {} steps end to end",
        ours.label, ours.variant, ours.width, ours.height, ours.batch, ours.steps
    );
    if let Some(r) = reference {
        println!(
            "reference: {} at {}x{}, batch {}, {} steps",
            r.label, r.width, r.height, r.batch, r.steps
        );
    }
    println!("| metric | candela | diffusers | candela / diffusers |");
    println!("|---|---|---|---|");
    let rows = [
        (
            "text encoding (ms)",
            ours.text_encode_ms,
            reference.and_then(|r| r.text_encode_ms),
        ),
        (
            "denoiser step (ms)",
            Some(ours.denoiser_step_ms),
            reference.map(|r| r.denoiser_step_ms),
        ),
        (
            "VAE decode (ms)",
            Some(ours.vae_decode_ms),
            reference.map(|r| r.vae_decode_ms),
        ),
        (
            "VAE encode (ms)",
            ours.vae_encode_ms,
            reference.and_then(|r| r.vae_encode_ms),
        ),
        (
            "end-to-end (s)",
            Some(ours.end_to_end_s),
            reference.map(|r| r.end_to_end_s),
        ),
        (
            "weights (GiB)",
            ours.weights_gib,
            reference.and_then(|r| r.weights_gib),
        ),
        (
            "peak memory (GiB)",
            ours.peak_gib,
            reference.and_then(|r| r.peak_gib),
        ),
        (
            "process peak resident (GiB)",
            ours.process_peak_gib,
            reference.and_then(|r| r.process_peak_gib),
        ),
    ];
    let show = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let graph = ours
        .denoiser_step_graph_ms
        .map(|ms| ("denoiser step, one CUDA graph (ms)", Some(ms), None));
    for (name, v, r) in rows.into_iter().chain(graph) {
        let ratio = match (v, r) {
            (Some(v), Some(r)) if r > 0.0 => format!("{:.2}x", v / r),
            _ => "-".into(),
        };
        println!("| {name} | {} | {} | {ratio} |", show(v), show(r));
    }
}

/// Solver accuracy without a trained network: the exact denoiser of a known data distribution
/// (each latent element drawn from an equal mixture of N(-1, 0.3²) and N(+1, 0.3²)) stands in
/// for the UNet, so the probability-flow ODE has a true solution. Every sampler runs the same
/// seed with `trailing` spacing (all start at t = 999); the table gives the RMS distance of its
/// result from a 1000-step Euler solve. Deterministic samplers should shrink towards 0.
pub fn sampler_study(config: &SchedulerConfig) -> anyhow::Result<()> {
    use crate::engine::rng::BatchNoise;
    use crate::engine::schedulers::{self, SamplerKind, TimestepSpacing};
    let mut config = config.clone();
    config.timestep_spacing = Some(TimestepSpacing::Trailing);
    config.prediction_type = Some(crate::engine::schedulers::PredictionType::Epsilon);
    let alphas = config.alphas_cumprod();
    let train_sigmas: Vec<f64> = alphas
        .iter()
        .map(|&a| (((1.0 - a) / a) as f64).sqrt())
        .collect();
    let sigma_at = |t: f32| -> f64 {
        let t = (t as f64).clamp(0.0, (train_sigmas.len() - 1) as f64);
        let j = (t.floor() as usize).min(train_sigmas.len() - 2);
        train_sigmas[j] + (train_sigmas[j + 1] - train_sigmas[j]) * (t - j as f64)
    };
    // eps-prediction of the exact denoiser, given the VP-scaled input the samplers feed the model.
    let model = |x_vp: &Tensor, t: f32| -> anyhow::Result<Tensor> {
        let sigma = sigma_at(t);
        let (s2, var) = (0.09f64, 0.09 + sigma * sigma);
        let x: Vec<f32> = (x_vp * (1.0 + sigma * sigma).sqrt())?
            .flatten_all()?
            .to_vec1()?;
        let eps: Vec<f32> = x
            .iter()
            .map(|&xv| {
                let xv = xv as f64;
                let logit = |mu: f64| -(xv - mu).powi(2) / (2.0 * var);
                let (a, b) = (logit(-1.0), logit(1.0));
                let m = a.max(b);
                let (wa, wb) = ((a - m).exp(), (b - m).exp());
                let post = |mu: f64| mu + s2 / var * (xv - mu);
                let d = (wa * post(-1.0) + wb * post(1.0)) / (wa + wb);
                ((xv - d) / sigma) as f32
            })
            .collect();
        Ok(Tensor::from_vec(eps, x_vp.shape(), x_vp.device())?)
    };
    let run = |kind: SamplerKind,
               schedule: SigmaSchedule,
               order: Option<usize>,
               steps: usize|
     -> anyhow::Result<Tensor> {
        let options = schedulers::SamplerOptions {
            solver_order: order,
            ..Default::default()
        };
        let mut sampler = schedulers::build_with(&config, kind, schedule, steps, &options)?;
        let mut rng = BatchNoise::single(7, 1);
        let shape = (1, 4, 16, 16);
        let mut x = (Tensor::from_vec(
            rng.randn(4 * 16 * 16).map_err(anyhow::Error::msg)?,
            shape,
            &candle_core::Device::Cpu,
        )? * sampler.init_noise_sigma() as f64)?;
        let timesteps = sampler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(&x, i)?;
            let eps = model(&input, t)?;
            x = sampler.step(&eps, i, &x, &mut rng)?;
        }
        Ok(x)
    };
    let reference = run(SamplerKind::Euler, SigmaSchedule::Default, None, 1000)?;
    let rms = |a: &Tensor| -> anyhow::Result<f64> {
        Ok((a - &reference)?
            .sqr()?
            .mean_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .sqrt())
    };
    println!("RMS distance from a 1000-step Euler solve of the same seed (exact mixture denoiser; data RMS ~1.04)\n");
    println!(
        "| sampler | schedule | evaluations at 8 steps | 4 steps | 8 steps | 20 steps | 50 steps |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &kind in SamplerKind::ALL.iter().filter(|k| !k.is_flow()) {
        let orders: &[Option<usize>] = match kind {
            SamplerKind::DpmPp2m | SamplerKind::UniPc => &[None, Some(3)],
            _ => &[None],
        };
        for &order in orders {
            for &schedule in kind.schedules() {
                // The study already uses trailing spacing (= sgm_uniform); exponential sits
                // between default and Karras.
                if matches!(
                    schedule,
                    SigmaSchedule::Exponential | SigmaSchedule::SgmUniform
                ) {
                    continue;
                }
                let evals = schedulers::build(&config, kind, schedule, 8)?
                    .timesteps()
                    .len();
                let name = match order {
                    Some(o) => format!("{} (solver_order {o})", kind.name()),
                    None => kind.name().to_string(),
                };
                let mut row = format!("| {name} | {} | {evals} |", schedule.name());
                for steps in [4, 8, 20, 50] {
                    row.push_str(&format!(
                        " {:.4} |",
                        rms(&run(kind, schedule, order, steps)?)?
                    ));
                }
                println!("{row}");
            }
        }
    }
    println!();
    println!("Stochastic samplers (euler_a, dpm_2_a, dpmpp_2m_sde, ddpm, lcm) land on other samples of the same distribution,");
    println!("so their distance does not shrink; it is shown for completeness.");
    Ok(())
}
