use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use super::CommonArgs;
use crate::engine::{
    self, demo,
    loader::{self, ModelSource},
    pipelines::{
        params::{GenerateParams, InitImage, SkipLayerGuidance, TransformerOptions},
        read_card, LoadOptions, Pipeline,
    },
    GeneratedImage,
};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers folder or a Hugging Face repo id; the embedded demo model when omitted.
    #[arg(long, env = "CANDELA_MODEL")]
    pub model: Option<String>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Random seed; a random one is drawn (and printed) when omitted.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Denoising steps (default: the model's, e.g. 20 for SD 1.x/2.x/XL, 28 for SD3.5 Large).
    #[arg(long)]
    pub steps: Option<usize>,
    /// euler, euler_a, heun, lms, ddim, ddpm, pndm, dpm_2, dpm_2_a, dpmpp_2m, dpmpp_2m_sde, unipc, lcm
    /// for SD 1.x/2.x/XL, flow_euler for SD3 (A1111/ComfyUI names such as "DPM++ 2M Karras" or
    /// "UniPC" work too). Default: euler_a, or flow_euler for SD3.
    #[arg(long)]
    pub sampler: Option<String>,
    /// default, karras, exponential, beta or sgm_uniform (where the sampler offers it).
    #[arg(long, default_value = "default")]
    pub schedule: String,
    /// Order of the multistep samplers (dpmpp_2m, dpmpp_2m_sde, unipc): 1, 2 or 3.
    #[arg(long)]
    pub solver_order: Option<usize>,
    /// Classifier-free guidance (default: the model's, 7.5 for SD 1.x/2.x/XL).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// SD3: T5 prompt tokens (default 256).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// SD3.5: Skip Layer Guidance with Stability's settings for SD3.5 Medium (layers 7, 8, 9).
    #[arg(long)]
    pub skip_layer_guidance: bool,
    /// SD3 / FLUX: the transformer from this single file (diffusers', Stability's or Black Forest
    /// Labs' naming: sd3.5_large.safetensors, flux1-dev.safetensors, fine-tunes), safetensors or
    /// GGUF (city96's flux1-dev-Q4_K_S.gguf, …: its blocks held in the formats it stores); the
    /// rest comes from --model. A path, or a file of a hub repo: `owner/name/file[@revision]`
    /// (city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf), downloaded into the hub cache.
    #[arg(long)]
    pub transformer: Option<String>,
    /// SD3 / FLUX: T5 from this single file instead of the model's: transformers' naming, or
    /// GGUF in llama.cpp's (city96/t5-v1_1-xxl-encoder-gguf/t5-v1_1-xxl-encoder-Q8_0.gguf: its
    /// layers held in the formats it stores). A path or `owner/name/file[@revision]`.
    #[arg(long)]
    pub t5: Option<String>,
    /// Quantize the transformer blocks on load (q8_0, q6k, q5k, q4k, q4_0, …; SD3's and FLUX's,
    /// a UNet's attention and feed-forward layers) to fit smaller cards or memory; see the
    /// README for the measured quality cost. On the CPU, q8_0, q6k and
    /// q4k run as int8 tiles held once where VNNI exists (AVX-512 or AVX-VNNI); other blocks are
    /// held once (slower than candle's twice-held tiles) where twice would not fit 90 % of the
    /// memory, or when asked: `q6k-compact`.
    #[arg(long)]
    pub quantize: Option<String>,
    /// SD3 / FLUX: quantize T5-XXL's Linear layers on load (q8_0, q6k, q4k, …, as `--quantize`):
    /// q8_0 holds it in 5 GB where its checkpoints store 9.5, and runs it on the CPU's int8
    /// tiles where VNNI exists. The prompt's states move by the format's rounding.
    #[arg(long)]
    pub quantize_t5: Option<String>,
    /// Memory budget the model is fitted to, as `serve`'s: a fraction of the device's memory
    /// (0.9) or a size (12GiB, 500MB, bytes). Default 0.9. A model that does not fit it with a
    /// default-size image is warned about, with the flags that would make it fit.
    #[arg(long, env = "CANDELA_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// SD3 / FLUX: run the text encoders on the CPU (f32) so the device holds only the
    /// transformer and the VAE.
    #[arg(long)]
    pub text_encoders_on_cpu: bool,
    /// SD3: load without the T5 text encoder (saves ~9 GB; zeros in its place, as diffusers).
    #[arg(long)]
    pub without_t5: bool,
    /// Decode images larger than the VAE's tile (its `sample_size`) in blended tiles, as
    /// diffusers' `vae.enable_tiling()`: VAE memory of one tile at any size.
    #[arg(long)]
    pub vae_tiling: bool,
    /// CUDA: replay each denoising step as a CUDA graph captured at the loop's first step (as
    /// `serve --cuda-graphs`).
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Retired (accepted so existing command lines keep working; warns): the CPU's 3×3
    /// convolution weights are always held at their own size now.
    #[arg(long, hide = true)]
    pub low_memory: bool,
    /// Image width; the model's native size when omitted (512 for SD1.5, 768 for SD2.1).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// Image-to-image: start from this picture (PNG/JPEG/WebP). The output takes its size
    /// (rounded down to a multiple of 8) unless --width/--height say otherwise.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// How much image-to-image changes the picture: 0 < strength ≤ 1 (default 0.8, diffusers';
    /// 1.0 with --mask, as diffusers' inpainting).
    #[arg(long)]
    pub strength: Option<f64>,
    /// SDXL two-stage: hand over to this refiner model (folder or repo id) at --refiner-switch.
    #[arg(long)]
    pub refiner: Option<String>,
    /// Fraction of the noise schedule the base denoises before the refiner takes over.
    #[arg(long, default_value_t = 0.8)]
    pub refiner_switch: f64,
    /// Inpainting: a mask picture at the init image's size; white = repaint, black = keep.
    #[arg(long, requires = "init_image")]
    pub mask: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    /// Also write the final latents (before VAE decode) as safetensors tensor `latents`.
    #[arg(long)]
    pub latents_out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16. A GPU computes in it; the CPU holds the models' weights in it and
    /// computes in f32 (f16/bf16: half the weights' memory, f32's speed and results).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn resolve_model(
    common: &CommonArgs,
    model: Option<&str>,
    dtype: candle_core::DType,
) -> anyhow::Result<loader::ModelDir> {
    let source = match model {
        Some(spec) => ModelSource::parse(spec)?,
        None => ModelSource::Local(demo::install(&common.data_dir.join("models"))?),
    };
    Ok(loader::resolve(&source, dtype, &common.hub_options())?)
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, … for several.
/// The starting picture at the requested size, or its own size rounded down to a multiple of
/// `multiple` (Lanczos resampling when it changes, like diffusers' image processor — though not
/// bit-identical to PIL's).
pub fn load_init_image(
    path: &Path,
    width: Option<usize>,
    height: Option<usize>,
    multiple: usize,
) -> anyhow::Result<image::RgbImage> {
    let img = image::open(path)?.to_rgb8();
    let round = |v: usize| v - v % multiple.max(1);
    let w = width.unwrap_or_else(|| round(img.width() as usize));
    let h = height.unwrap_or_else(|| round(img.height() as usize));
    if w == 0 || h == 0 {
        anyhow::bail!("the picture is smaller than {multiple} pixels");
    }
    if (w, h) == (img.width() as usize, img.height() as usize) {
        return Ok(img);
    }
    Ok(image::imageops::resize(
        &img,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    ))
}

pub fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

pub fn save_image(img: &GeneratedImage, path: &Path) -> anyhow::Result<()> {
    let buffer = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
        .context("image buffer size")?;
    buffer
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(common: &CommonArgs, args: GenerateArgs) -> anyhow::Result<()> {
    let device = engine::parse_device(&args.device)?;
    if args.cuda_graphs {
        engine::enable_step_graphs(&device)?;
    }
    let dtype = engine::parse_dtype(&args.dtype)?;
    // Check cheap arguments before loading (or downloading) a model.
    if let Some(name) = &args.sampler {
        crate::engine::schedulers::SamplerKind::parse_with_schedule(name)?;
    }
    let transformer = args.transformer.as_deref().map(loader::FileSource::parse);
    let transformer = transformer.transpose()?;
    let t5 = args
        .t5
        .as_deref()
        .map(loader::FileSource::parse)
        .transpose()?;
    let dir = resolve_model(common, args.model.as_deref(), dtype)?;
    let transformer_file = transformer
        .map(|t| loader::resolve_file(&t, &common.hub_options()))
        .transpose()?;
    let t5_file = (t5.map(|t| loader::resolve_file(&t, &common.hub_options()))).transpose()?;
    let card = read_card(&dir, args.model.as_deref().unwrap_or_default())?;
    let (sampler, named_schedule) = crate::engine::schedulers::SamplerKind::parse_with_schedule(
        args.sampler
            .as_deref()
            .unwrap_or(card.default_sampler.name()),
    )?;
    let load_start = std::time::Instant::now();
    super::warn_retired_low_memory(args.low_memory);
    let options = LoadOptions {
        without_t5: args.without_t5,
        transformer_file,
        t5_file,
        text_encoders_on_cpu: args.text_encoders_on_cpu,
        transformer_format: super::weight_format(args.quantize.as_deref())?,
        t5_format: super::t5_format(args.quantize_t5.as_deref())?,
        vae_tiling: args.vae_tiling,
    };
    // As `serve` holds it within its budget (quantized blocks held once on the CPU where twice
    // would not fit).
    let budget = match &args.memory_budget {
        Some(b) => b
            .parse::<crate::jobs::MemoryBudget>()
            .map_err(|e| anyhow::anyhow!("--memory-budget: {e}"))?,
        None => crate::jobs::DEFAULT_MEMORY_BUDGET,
    }
    .resolve(&device)?;
    let (options, footprint) =
        crate::engine::memory::Footprint::read_fitted(&dir, &device, dtype, &options, budget)?;
    let need = footprint.default_need(card.default_size);
    if need > budget {
        let advice = crate::jobs::fit_advice(&dir, &device, dtype, &options, budget)?;
        tracing::warn!(
            need = %crate::jobs::budget::human_bytes(need),
            budget = %crate::jobs::budget::human_bytes(budget),
            "the model does not fit the memory budget with a default-size image and may run out of memory; {advice}"
        );
    }
    let pipeline = Pipeline::load(&dir, &device, dtype, &options)?;
    tracing::info!(model = %dir.root.display(), seconds = load_start.elapsed().as_secs_f64(), "model loaded");
    let init = match &args.init_image {
        Some(path) => Some(
            load_init_image(path, args.width, args.height, card.size_multiple)
                .with_context(|| format!("--init-image {}", path.display()))?,
        ),
        None => {
            if args.strength.is_some() {
                anyhow::bail!("--strength needs --init-image");
            }
            None
        }
    };
    let strength = args
        .strength
        .unwrap_or(if args.mask.is_some() { 1.0 } else { 0.8 });
    if init.is_some() && !(strength > 0.0 && strength <= 1.0) {
        anyhow::bail!("--strength must be in (0, 1], got {strength}");
    }
    let mask = match (&args.mask, &init) {
        (Some(path), Some(img)) => {
            let m = image::open(path)
                .with_context(|| format!("--mask {}", path.display()))?
                .to_luma8();
            let m = if m.dimensions() == img.dimensions() {
                m
            } else {
                image::imageops::resize(
                    &m,
                    img.width(),
                    img.height(),
                    image::imageops::FilterType::Lanczos3,
                )
            };
            Some(std::sync::Arc::new(m.into_raw()))
        }
        _ => None,
    };
    let (width, height) = match &init {
        Some(img) => (img.width() as usize, img.height() as usize),
        None => (
            args.width.unwrap_or_else(|| pipeline.default_size()),
            args.height.unwrap_or_else(|| pipeline.default_size()),
        ),
    };
    let params = GenerateParams {
        transformer: TransformerOptions {
            true_cfg_scale: None,
            max_sequence_length: args.max_sequence_length,
            skip_layer_guidance: args
                .skip_layer_guidance
                .then(SkipLayerGuidance::sd35_medium),
        },
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps: args.steps.unwrap_or(card.default_steps),
        guidance_scale: args.guidance.unwrap_or(card.default_guidance),
        seed: args.seed.unwrap_or_else(rand_seed),
        sampler,
        schedule: match named_schedule {
            Some(named) if args.schedule == "default" => named,
            _ => args.schedule.parse()?,
        },
        n: args.n,
        solver_order: args.solver_order,
        clip_skip: args.clip_skip,
        refiner: None,
        stage: None,
        init: init.map(|img| InitImage {
            rgb: std::sync::Arc::new(img.into_raw()),
            mask,
            strength,
        }),
    };

    let bar = ProgressBar::new(params.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut report = |p: crate::engine::Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!("{:.2} steps/s", p.steps_per_second()));
        true
    };
    let generated = match &args.refiner {
        Some(spec) => {
            let refiner_dir = resolve_model(common, Some(spec), dtype)?;
            let refiner = Pipeline::load(&refiner_dir, &device, dtype, &LoadOptions::default())?;
            pipeline.generate_with_refiner(&refiner, &params, args.refiner_switch, &mut report)?
        }
        None => pipeline.generate(&params, &mut report)?,
    };
    bar.finish();

    for (img, path) in generated
        .images
        .iter()
        .zip(output_paths(&args.out, params.n))
    {
        save_image(img, &path)?;
        println!("{}", path.display());
    }
    if let Some(path) = &args.latents_out {
        generated
            .latents
            .to_dtype(candle_core::DType::F32)?
            .save_safetensors("latents", path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("seed: {}", params.seed);
    Ok(())
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Keep seeds within 2^53 so they survive JSON clients that use doubles.
    h.finish() & ((1u64 << 53) - 1)
}
