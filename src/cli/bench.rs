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
        clip_skip: 0,
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
