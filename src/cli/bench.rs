//! `candela bench`: UNet step time, VAE decode time and end-to-end time, printed as a table next
//! to diffusers' figures for the same configs (from `tools/reference/bench_diffusers.py`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::CommonArgs;
use crate::engine::{
    self,
    loader::ModelDir,
    pipelines::sd::{GenerateParams, StableDiffusion},
    schedulers::SchedulerConfig,
    schedulers::SigmaSchedule,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A folder of diffusers configs to build with random weights (the real SD1.5 architecture by default).
    #[arg(long, default_value = "benches/sd15")]
    pub configs: PathBuf,
    /// Benchmark a real model (folder or repo id) with its weights instead of random ones.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Denoising steps of the end-to-end run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Timed UNet forwards (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// diffusers' figures (JSON from tools/reference/bench_diffusers.py) to print alongside.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Write our figures as JSON here too.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Instead of timing: measure each sampler's accuracy against a 1000-step solve with an
    /// exact analytic denoiser, using the noise schedule of --configs.
    #[arg(long)]
    pub sampler_study: bool,
    /// Instead: time the CPU kernels (convolutions, attention, GroupNorm) against candle's ops
    /// at SD 1.5 and VAE shapes.
    #[arg(long)]
    pub kernels: bool,
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

#[derive(Debug, Serialize, Deserialize)]
pub struct BenchFigures {
    pub unet_step_ms: f64,
    pub vae_decode_ms: f64,
    pub end_to_end_s: f64,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    #[serde(default)]
    pub label: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(common: &CommonArgs, args: BenchArgs) -> anyhow::Result<()> {
    let device = engine::parse_device(&args.device)?;
    let dtype = engine::parse_dtype(&args.dtype)?;
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
    if args.kernels {
        return super::kernel_bench::run(args.repeats);
    }
    if args.sampler_study {
        let dir = ModelDir {
            root: args.configs.clone(),
            prefer_fp16_variant: false,
        };
        return sampler_study(&dir.read_json("scheduler/scheduler_config.json")?);
    }
    let load_start = Instant::now();
    let (pipeline, label) = match &args.model {
        Some(spec) => {
            let dir = super::generate::resolve_model(common, Some(spec), dtype)?;
            (StableDiffusion::load(&dir, &device, dtype)?, spec.clone())
        }
        None => {
            let dir = ModelDir {
                root: args.configs.clone(),
                prefer_fp16_variant: false,
            };
            (
                StableDiffusion::with_random_weights(&dir, &device, dtype).with_context(|| {
                    format!("building {} with random weights", args.configs.display())
                })?,
                format!("{} (random weights)", args.configs.display()),
            )
        }
    };
    eprintln!(
        "built {label} in {:.1}s",
        load_start.elapsed().as_secs_f64()
    );

    let scale = pipeline.vae_scale();
    let (h, w) = (args.height / scale, args.width / scale);
    let context = Tensor::cat(
        &[
            pipeline.encode_prompt("", 0)?,
            pipeline.encode_prompt("a photo of a cat", 0)?,
        ],
        0,
    )?;
    let sample = Tensor::randn(0f32, 1f32, (2, 4, h, w), &device)?.to_dtype(dtype)?;
    let sync = || device.synchronize();

    let mut unet_ms = Vec::new();
    for i in 0..=args.repeats.max(1) {
        let t = Instant::now();
        let out = pipeline.unet_forward(&sample, 500.0, &context)?;
        out.to_dtype(DType::F32)?;
        sync()?;
        if i > 0 {
            unet_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        eprintln!(
            "unet forward {i}: {:.0} ms{}",
            t.elapsed().as_secs_f64() * 1000.0,
            if i == 0 { " (warm-up)" } else { "" }
        );
    }
    let t = Instant::now();
    pipeline.vae_decode(&sample.narrow(0, 0, 1)?)?;
    sync()?;
    let vae_ms = t.elapsed().as_secs_f64() * 1000.0;

    let params = GenerateParams {
        transformer: Default::default(),
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: 7.5,
        seed: 0,
        sampler: "euler".parse()?,
        schedule: SigmaSchedule::Default,
        n: 1,
        solver_order: None,
        clip_skip: 0,
        refiner: None,
        stage: None,
        init: None,
    };
    let t = Instant::now();
    pipeline.generate(&params, &mut |p| {
        eprintln!(
            "step {}/{}: {:.2} steps/s",
            p.step,
            p.total,
            p.steps_per_second()
        );
        true
    })?;
    let end_to_end = t.elapsed().as_secs_f64();

    let ours = BenchFigures {
        unet_step_ms: median(unet_ms),
        vae_decode_ms: vae_ms,
        end_to_end_s: end_to_end,
        steps: args.steps,
        width: args.width,
        height: args.height,
        label: format!("candela {} {} {}", args.device, args.dtype, label),
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
    Ok(())
}

fn print_table(ours: &BenchFigures, reference: Option<&BenchFigures>) {
    println!(
        "{} at {}x{}, {} steps, CFG batch 2",
        ours.label, ours.width, ours.height, ours.steps
    );
    if let Some(r) = reference {
        println!(
            "reference: {} at {}x{}, {} steps",
            r.label, r.width, r.height, r.steps
        );
    }
    println!("| metric | candela | diffusers | candela / diffusers |");
    println!("|---|---|---|---|");
    let rows = [
        (
            "UNet step (ms)",
            ours.unet_step_ms,
            reference.map(|r| r.unet_step_ms),
        ),
        (
            "VAE decode (ms)",
            ours.vae_decode_ms,
            reference.map(|r| r.vae_decode_ms),
        ),
        (
            "end-to-end (s)",
            ours.end_to_end_s,
            reference.map(|r| r.end_to_end_s),
        ),
    ];
    for (name, v, r) in rows {
        match r {
            Some(r) => println!("| {name} | {v:.1} | {r:.1} | {:.2}x |", v / r),
            None => println!("| {name} | {v:.1} | - | - |"),
        }
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
