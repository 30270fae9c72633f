//! Text-to-image pipelines, one per model family, and the checks they share.

pub mod autoencoder;
pub mod flux;
pub mod params;
pub mod prompt_cache;
pub mod sd;
pub mod sd3;
pub mod timing;

use candle_core::{DType, Device};

use crate::engine::models::blocks::{compute_dtype, cpu_half_dtype, weights_dtype};

use crate::engine::error::{EngineError, Result};
use params::GenerateParams;

/// Where a pipeline's components get their weights: the folder's files (single or sharded), or
/// random values for benchmarks (speed does not depend on the values; nothing is downloaded).
pub(crate) struct WeightSource<'a> {
    pub dir: &'a ModelDir,
    pub random: bool,
    /// What random weights stand in for: the repos' files, stored in this dtype (SD's and
    /// SDXL's main files f32, SD3's f16, FLUX's bf16).
    pub random_stored: DType,
}

impl WeightSource<'_> {
    /// A denoiser's or VAE's weights, read in `dtype` — on the CPU in f32, as a file storing them
    /// in half precision stores them ([`weights_dtype`]).
    pub(crate) fn get(
        &self,
        stem: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<candle_nn::VarBuilder<'static>> {
        if self.random {
            Ok(self.random_weights(dtype, device))
        } else {
            let file =
                crate::engine::loader::weights::SafetensorsFile::open_component(self.dir, stem)?;
            let dtype = weights_dtype(device, dtype, file.products_stored_in_half());
            Ok(file.into_var_builder(dtype, device))
        }
    }

    fn random_weights(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        let stored = crate::engine::models::cpu_half_linear::is_half(self.random_stored)
            .then_some(self.random_stored);
        candle_nn::VarBuilder::from_backend(
            Box::new(crate::engine::loader::weights::RandomWeights),
            weights_dtype(device, dtype, stored),
            device.clone(),
        )
    }

    /// A text encoder's weights for a model asked for in `dtype`, read in the dtype `device`
    /// computes in ([`compute_dtype`]), with the dtype each tensor is held in: as stored, and on
    /// the CPU under f16/bf16 what is stored in f32 in that precision (the text encoders hold
    /// their weights so through `cpu_half_linear::Holding`).
    pub(crate) fn get_with_stored(
        &self,
        stem: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<(
        candle_nn::VarBuilder<'static>,
        crate::engine::loader::weights::StoredDtypes,
    )> {
        use crate::engine::loader::weights::{RandomWeights, SafetensorsFile, StoredDtypes};
        use candle_nn::VarBuilder;
        let (compute, half) = (compute_dtype(device, dtype), cpu_half_dtype(device, dtype));
        if self.random {
            let weights =
                VarBuilder::from_backend(Box::new(RandomWeights), compute, device.clone());
            return Ok((
                weights,
                StoredDtypes::Every(self.random_stored).narrowed_to(half),
            ));
        }
        let file = SafetensorsFile::open_component(self.dir, stem)?;
        let stored = file.stored_dtypes().narrowed_to(half);
        Ok((file.into_var_builder(compute, device), stored))
    }

    /// T5's weights (`stem`: its folder's file) on `device`, with the dtype each tensor is
    /// stored in: `options.t5_file` when given, in transformers' or llama.cpp's naming, a GGUF
    /// file's blocks held as it stores them.
    pub(crate) fn t5(
        &self,
        options: &LoadOptions,
        stem: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<(LayerWeights, crate::engine::loader::weights::StoredDtypes)> {
        use crate::engine::loader::single_file::{Naming, TransformerFile};
        let format = options.t5_blocks_format()?;
        let Some(path) = &options.t5_file else {
            let (vb, stored) = self.get_with_stored(stem, dtype, device)?;
            let weights = LayerWeights {
                vb,
                format,
                file: None,
            };
            return Ok((weights, stored));
        };
        let file = TransformerFile::open(path)?;
        let stored = file
            .stored_dtypes()
            .narrowed_to(cpu_half_dtype(device, dtype));
        let compute = compute_dtype(device, dtype);
        let weights = LayerWeights::of(file, Naming::T5, format, compute, device)?;
        Ok((weights, stored))
    }

    /// The transformer's weights: `options.transformer_file` when given, else the folder's
    /// `transformer/` files; either may use the model makers' single-file `naming`, and a
    /// GGUF file's block-format layers are held as it stores them.
    pub(crate) fn transformer(
        &self,
        options: &LoadOptions,
        naming: crate::engine::loader::single_file::Naming,
        dtype: DType,
        device: &Device,
    ) -> Result<LayerWeights> {
        use crate::engine::loader::single_file::TransformerFile;
        use crate::engine::loader::weights::SafetensorsFile;
        const STEM: &str = "transformer/diffusion_pytorch_model";
        let format = options.transformer_blocks_format()?;
        // Random weights stand in for what no file names (a benchmark of a transformer file
        // takes the file's).
        if self.random && options.transformer_file.is_none() {
            return Ok(LayerWeights {
                vb: self.random_weights(dtype, device),
                format,
                file: None,
            });
        }
        let file = match &options.transformer_file {
            Some(path) => TransformerFile::open(path)?,
            None => TransformerFile::Safetensors(SafetensorsFile::open_component(self.dir, STEM)?),
        };
        let dtype = weights_dtype(device, dtype, file.products_stored_in_half());
        LayerWeights::of(file, naming, format, dtype, device)
    }
}

/// A model's weights as its constructor reads them (the transformer's, T5's): a var builder,
/// and the format its Linear layers are held in, from a GGUF file's stored blocks under
/// `Stored`.
pub(crate) struct LayerWeights {
    pub vb: candle_nn::VarBuilder<'static>,
    format: crate::engine::models::quantized::WeightFormat,
    file: Option<std::sync::Arc<crate::engine::loader::single_file::SingleFileWeights>>,
}

impl LayerWeights {
    /// `file` read through `naming` (or the library's own names) in `dtype` on `device`.
    fn of(
        file: crate::engine::loader::single_file::TransformerFile,
        naming: crate::engine::loader::single_file::Naming,
        format: crate::engine::models::quantized::WeightFormat,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use crate::engine::loader::single_file::SingleFileWeights;
        let file = std::sync::Arc::new(SingleFileWeights::new(file, naming)?);
        Ok(Self {
            vb: file.var_builder(dtype, device),
            format,
            file: Some(file),
        })
    }

    /// Where the Linear layers come from: the format, and a GGUF file's stored blocks.
    pub fn layers(&self) -> crate::engine::models::quantized::LayerSource<'_> {
        use crate::engine::models::quantized::StoredBlocks;
        crate::engine::models::quantized::LayerSource {
            format: self.format,
            stored: self.file.as_deref().map(|f| f as &dyn StoredBlocks),
        }
    }
}

/// The folder's `model_index.json` class, refused unless it is one of `classes`.
pub(crate) fn pipeline_class(dir: &ModelDir, classes: &[&str], what: &str) -> Result<String> {
    let index: IndexHead = dir.read_json("model_index.json")?;
    if !classes.contains(&index.class_name.as_str()) {
        return Err(EngineError::Unsupported(format!(
            "{}: pipeline `{}` is not a {what} pipeline",
            dir.file("model_index.json").display(),
            index.class_name
        )));
    }
    Ok(index.class_name)
}

/// The scheduler config, checked for what the samplers support.
pub(crate) fn read_scheduler(dir: &ModelDir) -> Result<crate::engine::schedulers::SchedulerConfig> {
    let scheduler: crate::engine::schedulers::SchedulerConfig =
        dir.read_json("scheduler/scheduler_config.json")?;
    scheduler.check()?;
    Ok(scheduler)
}

/// Validate a batch: every request on its own, and all sharing the first one's [`params::BatchKey`].
pub(crate) fn check_batch(
    requests: &[GenerateParams],
    validate: impl Fn(&GenerateParams) -> Result<()>,
) -> Result<Option<&GenerateParams>> {
    let Some(first) = requests.first() else {
        return Ok(None);
    };
    let key = first.batch_key();
    for p in requests {
        validate(p)?;
        if p.batch_key() != key {
            return Err(EngineError::Internal(
                "requests with different sizes, samplers, steps or guidance cannot share a batch"
                    .into(),
            ));
        }
    }
    Ok(Some(first))
}

/// One prompt's CLIP token ids as a (1, 77) tensor on `device`, warning when the end was cut.
pub(crate) fn clip_token_ids(
    tokenizer: &crate::engine::tokenizer::ClipTokenizer,
    prompt: &str,
    device: &Device,
) -> Result<candle_core::Tensor> {
    let (ids, cut) = tokenizer.encode_counting_cut(prompt)?;
    if cut > 0 {
        tracing::warn!(
            tokens = cut,
            "prompt longer than CLIP's {} tokens; the end was cut",
            tokenizer.max_length()
        );
    }
    Ok(candle_core::Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Where a flow-matching image-to-image run starts (diffusers' SD3 / FLUX `get_timesteps`): it
/// skips `int(steps − steps × strength)` steps; text-to-image starts at 0.
pub(crate) fn image_to_image_begin(first: &GenerateParams, timesteps: usize) -> Result<usize> {
    let begin = match &first.init {
        Some(init) => {
            let steps = first.steps as f64;
            (steps - (steps * init.strength).min(steps)).max(0.0) as usize
        }
        None => 0,
    };
    if begin >= timesteps {
        return Err(no_step_left(first));
    }
    Ok(begin)
}

/// An image-to-image request whose strength skips every step.
pub(crate) fn no_step_left(first: &GenerateParams) -> EngineError {
    EngineError::invalid(
        "strength",
        format!(
            "strength {} with {} steps leaves no step to run; raise strength or steps",
            first.init.as_ref().map_or(0.0, |i| i.strength),
            first.steps
        ),
    )
}

/// Gives back, when a run or a model's load ends however it ends (done, failed, cancelled), what
/// the CPU kernels kept for their next call: this thread's Winograd buffer and the freed blocks
/// kept for reuse — an idle server holds neither.
struct ReleaseScratchAtEnd;

impl Drop for ReleaseScratchAtEnd {
    fn drop(&mut self) {
        crate::engine::models::cpu_winograd::release_thread_buffer();
        crate::large_pages::release_cached();
    }
}

/// Split a batch's final latents back into each request's `n` rows and decode them.
pub(crate) fn split_rows(
    requests: &[GenerateParams],
    latents: &candle_core::Tensor,
    decode: impl Fn(&GenerateParams, &candle_core::Tensor) -> Result<Vec<GeneratedImage>>,
) -> Result<Vec<Generated>> {
    let mut results = Vec::with_capacity(requests.len());
    let mut row = 0;
    for p in requests {
        let mine = latents.narrow(0, row, p.n)?;
        row += p.n;
        let images = decode(p, &mine)?;
        results.push(Generated {
            latents: mine,
            images,
        });
    }
    Ok(results)
}

/// Where the text encoders of SD3 / FLUX run: on the CPU (in f32 whatever the model's dtype,
/// [`WeightSource::get_with_stored`]; T5 overflows in f16) with `--text-encoders-on-cpu`.
pub(crate) fn text_encoder_device(device: &Device, options: &LoadOptions) -> Device {
    if options.text_encoders_on_cpu {
        Device::Cpu
    } else {
        device.clone()
    }
}

/// The limits every pipeline applies: steps, images per request, guidance.
pub(crate) fn check_common(p: &GenerateParams, train_steps: usize) -> Result<()> {
    let max_steps = train_steps.min(1000);
    if p.steps == 0 || p.steps > max_steps {
        return Err(EngineError::invalid(
            "steps",
            format!("steps must be between 1 and {max_steps}"),
        ));
    }
    if p.n == 0 || p.n > 16 {
        return Err(EngineError::invalid("n", "n must be between 1 and 16"));
    }
    if !p.guidance_scale.is_finite() || !(0.0..=100.0).contains(&p.guidance_scale) {
        return Err(EngineError::invalid(
            "guidance_scale",
            "guidance_scale must be between 0 and 100",
        ));
    }
    Ok(())
}

/// Makes denoising loops replay their steps as CUDA graphs (or not) from now on; nothing to do
/// without the cuda feature.
///
/// # Safety
/// As [`crate::engine::cuda::step_graph::set_enabled`]: the process's CUDA tensors made with
/// cudarc's event tracking off.
pub unsafe fn set_step_graphs(on: bool) {
    #[cfg(feature = "cuda")]
    crate::engine::cuda::step_graph::set_enabled(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// Whether denoising loops replay their steps as CUDA graphs ([`set_step_graphs`]).
pub fn step_graphs_enabled() -> bool {
    #[cfg(feature = "cuda")]
    return crate::engine::cuda::step_graph::enabled();
    #[cfg(not(feature = "cuda"))]
    false
}

/// The denoiser forward of one loop, replayed as a CUDA graph where step graphs are enabled
/// ([`crate::engine::cuda::step_graph`]); elsewhere each step runs `forward` as it is.
#[derive(Default)]
pub(crate) struct StepRunner {
    #[cfg(feature = "cuda")]
    replay: crate::engine::cuda::step_graph::StepReplay,
}

impl StepRunner {
    /// `forward` on `inputs` (the inputs that change between steps; what stays fixed it holds).
    pub fn run<const N: usize>(
        &mut self,
        inputs: [&candle_core::Tensor; N],
        forward: &dyn Fn(&[candle_core::Tensor; N]) -> candle_core::Result<candle_core::Tensor>,
    ) -> candle_core::Result<candle_core::Tensor> {
        #[cfg(feature = "cuda")]
        return self.replay.run(&inputs, &|given| match given.try_into() {
            Ok(given) => forward(given),
            Err(_) => candle_core::bail!("a step of {N} inputs given {}", given.len()),
        });
        #[cfg(not(feature = "cuda"))]
        forward(&inputs.map(candle_core::Tensor::clone))
    }
}

use crate::engine::loader::ModelDir;
use crate::engine::schedulers::SamplerKind;
use crate::engine::{GeneratedImage, Progress};
use params::SkipLayerGuidance;
use sd::{Generated, StableDiffusion};
use sd3::StableDiffusion3;

/// Which pipeline a model folder needs, from `model_index.json` (and, for the SD families, the
/// scheduler's prediction type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
    SdxlRefiner,
    Sd3,
    Flux,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "sd1",
            Self::Sd2 => "sd2",
            Self::Sdxl => "sdxl",
            Self::SdxlRefiner => "sdxl_refiner",
            Self::Sd3 => "sd3",
            Self::Flux => "flux",
        }
    }

    /// Flow-matching models (SD3, FLUX) take flow samplers only.
    pub fn is_flow(self) -> bool {
        matches!(self, Self::Sd3 | Self::Flux)
    }
}

/// What a model is and how it is used by default, read from its configs (no weights).
#[derive(Debug, Clone)]
pub struct ModelCard {
    pub family: Family,
    /// A finer name where the family has several (`sd3-medium`, `sd3.5-medium`, `sd3.5-large`,
    /// `sd3.5-large-turbo`).
    pub variant: String,
    pub default_size: usize,
    pub size_multiple: usize,
    pub default_sampler: SamplerKind,
    pub default_steps: usize,
    pub default_guidance: f64,
    /// The Skip Layer Guidance the model's makers recommend (on request only).
    pub recommended_skip_layer_guidance: Option<SkipLayerGuidance>,
}

#[derive(serde::Deserialize)]
struct IndexHead {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    requires_aesthetics_score: Option<bool>,
}

/// Read what `dir` holds. `name` (the folder or repo id) tells SD3.5 Large Turbo from Large,
/// which share every config.
pub fn read_card(dir: &ModelDir, name: &str) -> Result<ModelCard> {
    let index: IndexHead = dir.read_json("model_index.json")?;
    let class = index.class_name.as_str();
    if sd3::SD3_PIPELINES.contains(&class) {
        let config: crate::engine::models::mmdit::Sd3TransformerConfig =
            dir.read_json("transformer/config.json")?;
        let vae: crate::engine::models::vae::VaeConfig = dir.read_json("vae/config.json")?;
        let scale = vae.scale_factor();
        let turbo = name.to_ascii_lowercase().contains("turbo");
        // Stability's recommended settings per variant (model cards).
        let (variant, steps, guidance, slg) = if !config.dual_attention_layers.is_empty() {
            (
                "sd3.5-medium",
                40,
                4.5,
                Some(SkipLayerGuidance::sd35_medium()),
            )
        } else if config.qk_norm.is_some() && turbo {
            ("sd3.5-large-turbo", 4, 0.0, None)
        } else if config.qk_norm.is_some() {
            ("sd3.5-large", 28, 3.5, None)
        } else {
            ("sd3-medium", 28, 7.0, None)
        };
        return Ok(ModelCard {
            family: Family::Sd3,
            variant: variant.into(),
            default_size: config.sample_size * scale,
            size_multiple: scale * config.patch_size,
            default_sampler: SamplerKind::FlowEuler,
            default_steps: steps,
            default_guidance: guidance,
            recommended_skip_layer_guidance: slg,
        });
    }
    if flux::FLUX_PIPELINES.contains(&class) {
        let config: crate::engine::models::flux::FluxTransformerConfig =
            dir.read_json("transformer/config.json")?;
        let vae: crate::engine::models::vae::VaeConfig = dir.read_json("vae/config.json")?;
        // Black Forest Labs' recommended settings: dev 28–50 steps at guidance 3.5; schnell 1–4
        // steps without guidance.
        let (variant, steps, guidance) = if config.guidance_embeds {
            ("flux-dev", 28, 3.5)
        } else {
            ("flux-schnell", 4, 0.0)
        };
        return Ok(ModelCard {
            family: Family::Flux,
            variant: variant.into(),
            default_size: 1024,
            size_multiple: vae.scale_factor() * 2,
            default_sampler: SamplerKind::FlowEuler,
            default_steps: steps,
            default_guidance: guidance,
            recommended_skip_layer_guidance: None,
        });
    }
    let scheduler: crate::engine::schedulers::SchedulerConfig =
        dir.read_json("scheduler/scheduler_config.json")?;
    let unet: serde_json::Value = dir.read_json("unet/config.json")?;
    let vae: crate::engine::models::vae::VaeConfig = dir.read_json("vae/config.json")?;
    let scale = vae.scale_factor();
    let family = if class.starts_with("StableDiffusionXL") {
        if index.requires_aesthetics_score == Some(true) {
            Family::SdxlRefiner
        } else {
            Family::Sdxl
        }
    } else if scheduler.prediction_type() == crate::engine::schedulers::PredictionType::VPrediction
    {
        Family::Sd2
    } else {
        Family::Sd1
    };
    Ok(ModelCard {
        family,
        variant: family.name().into(),
        default_size: unet["sample_size"].as_u64().unwrap_or(64) as usize * scale,
        size_multiple: scale,
        default_sampler: SamplerKind::EulerA,
        default_steps: 20,
        default_guidance: 7.5,
        recommended_skip_layer_guidance: None,
    })
}

/// How to load a model (options that apply to some families only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// SD3: leave T5-XXL out (9 GB in f16): its part of the prompt becomes zeros, as diffusers
    /// does with `text_encoder_3=None`.
    pub without_t5: bool,
    /// The transformer blocks' Linear layers (SD3's and FLUX's blocks; the UNet's attention and
    /// feed-forward layers) as loaded or quantized on load.
    pub transformer_format: crate::engine::models::quantized::WeightFormat,
    /// SD3 / FLUX: T5-XXL's Linear layers as loaded or quantized on load (q8_0: 5 GB where its
    /// checkpoints store 9.5).
    pub t5_format: crate::engine::models::quantized::WeightFormat,
    /// SD3 / FLUX: keep the text encoders in system memory and run them on the CPU in f32 (held
    /// as their checkpoints store them, T5-XXL 9.5 GB in bf16 or f16, and widened per product), so
    /// device memory holds only the transformer and the VAE; each prompt's states are then
    /// copied to the device. Costs prompt-encoding time, not quality.
    pub text_encoders_on_cpu: bool,
    /// SD3 / FLUX: the transformer from this single file (diffusers' naming, Stability's
    /// `model.diffusion_model.*` as in `sd3.5_large.safetensors`, or Black Forest Labs' as in
    /// `flux1-dev.safetensors` and fine-tunes) instead of the folder's `transformer/` weights.
    pub transformer_file: Option<std::path::PathBuf>,
    /// SD3 / FLUX: T5 from this single file (transformers' naming, or a GGUF file in llama.cpp's:
    /// city96's `t5-v1_1-xxl-encoder-Q8_0.gguf`) instead of the folder's.
    pub t5_file: Option<std::path::PathBuf>,
    /// Decode (and encode) images larger than the VAE's tile in tiles, as diffusers'
    /// `vae.enable_tiling()`: the VAE's memory stays that of one tile (SDXL at 2048² on a 24 GB
    /// card); seams are blended, the pixels differ slightly from a whole decode.
    pub vae_tiling: bool,
}

impl LoadOptions {
    /// Whether the transformer comes from a GGUF file.
    pub fn transformer_is_gguf(&self) -> bool {
        (self.transformer_file.as_deref())
            .is_some_and(crate::engine::loader::gguf::GgufFile::is_gguf)
    }

    /// The format T5's Linear layers are held in: `t5_format`, except that a GGUF file's are
    /// held as it stores them ([`Self::transformer_blocks_format`]'s rule).
    pub fn t5_blocks_format(&self) -> Result<crate::engine::models::quantized::WeightFormat> {
        let gguf =
            (self.t5_file.as_deref()).is_some_and(crate::engine::loader::gguf::GgufFile::is_gguf);
        as_stored_in_gguf(gguf, self.t5_format, "T5", "--quantize-t5", "--t5")
    }

    /// The format the transformer blocks are held in: `transformer_format`, except that a GGUF
    /// file's blocks are held as it stores them ([`WeightFormat::Stored`]: `dense`, the
    /// default, reads as `gguf`). Another format for a GGUF file, or `gguf` for another file,
    /// is refused.
    ///
    /// [`WeightFormat::Stored`]: crate::engine::models::quantized::WeightFormat::Stored
    pub fn transformer_blocks_format(
        &self,
    ) -> Result<crate::engine::models::quantized::WeightFormat> {
        let (gguf, format) = (self.transformer_is_gguf(), self.transformer_format);
        as_stored_in_gguf(gguf, format, "transformer", "--quantize", "--transformer")
    }
}

/// A component's format: as asked, or for a GGUF file (`gguf`) `Stored` (`dense`, the default,
/// reads so); a format to quantize to for a GGUF file, or `gguf` without one, is refused naming
/// `flag` and the `file_flag` that gives one.
fn as_stored_in_gguf(
    gguf: bool,
    format: crate::engine::models::quantized::WeightFormat,
    what: &str,
    flag: &str,
    file_flag: &str,
) -> Result<crate::engine::models::quantized::WeightFormat> {
    use crate::engine::models::quantized::{CpuQuantized, WeightFormat};
    match (gguf, format) {
        (true, WeightFormat::Dense) => Ok(WeightFormat::Stored(CpuQuantized::Fastest)),
        (true, WeightFormat::Stored(_)) => Ok(format),
        (true, _) => Err(EngineError::Unsupported(format!(
            "the {what} file is GGUF: its layers are held in the formats it stores, so `{flag} {format}` does not apply (leave it out, or use `gguf-compact` to hold its blocks once on the CPU)"
        ))),
        (false, WeightFormat::Stored(_)) => Err(EngineError::Unsupported(format!(
            "`{flag} {format}` holds a GGUF {what} file's blocks as stored: give one with `{file_flag} FILE.gguf`"
        ))),
        (false, _) => Ok(format),
    }
}

/// A loaded model of any family. Each variant is `Send + Sync`, so the scheduler's worker can own
/// it and move it between threads.
pub enum Pipeline {
    Sd(StableDiffusion),
    Sd3(StableDiffusion3),
    Flux(flux::Flux),
}

impl Pipeline {
    pub fn load(
        dir: &ModelDir,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::build(dir, device, dtype, options, false)
    }

    /// The architecture with random weights (benchmarks).
    pub fn with_random_weights(
        dir: &ModelDir,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::build(dir, device, dtype, options, true)
    }

    fn build(
        dir: &ModelDir,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
        random: bool,
    ) -> Result<Self> {
        // Loading's temporaries (conversions, layouts) are not kept past it either.
        let _release = ReleaseScratchAtEnd;
        let card = read_card(dir, "")?;
        let mut pipeline = match (card.family, random) {
            (Family::Sd3, _) => Self::Sd3(StableDiffusion3::build(
                dir, device, dtype, options, random,
            )?),
            (Family::Flux, _) => {
                Self::Flux(flux::Flux::build(dir, device, dtype, options, random)?)
            }
            _ => Self::Sd(StableDiffusion::build(dir, device, dtype, options, random)?),
        };
        pipeline.vae_mut().set_tiling(options.vae_tiling);
        Ok(pipeline)
    }

    fn vae_mut(&mut self) -> &mut autoencoder::Autoencoder {
        match self {
            Self::Sd(m) => &mut m.vae,
            Self::Sd3(m) => &mut m.vae,
            Self::Flux(m) => &mut m.vae,
        }
    }

    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        match self {
            Self::Sd(m) => m.validate(p),
            Self::Sd3(m) => m.validate(p),
            Self::Flux(m) => m.validate(p),
        }
    }

    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        let _release = ReleaseScratchAtEnd;
        match self {
            Self::Sd(m) => m.generate(p, progress),
            Self::Sd3(m) => m.generate(p, progress),
            Self::Flux(m) => m.generate(p, progress),
        }
    }

    pub fn generate_batch(
        &self,
        requests: &[GenerateParams],
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Generated>> {
        let _release = ReleaseScratchAtEnd;
        match self {
            Self::Sd(m) => m.generate_batch(requests, progress),
            Self::Sd3(m) => m.generate_batch(requests, progress),
            Self::Flux(m) => m.generate_batch(requests, progress),
        }
    }

    /// SDXL base + refiner; both must be Stable Diffusion (UNet) pipelines.
    pub fn generate_with_refiner(
        &self,
        refiner: &Pipeline,
        p: &GenerateParams,
        switch: f64,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        let _release = ReleaseScratchAtEnd;
        match (self, refiner) {
            (Self::Sd(base), Self::Sd(refiner)) => {
                base.generate_with_refiner(refiner, p, switch, progress)
            }
            _ => Err(EngineError::Incompatible {
                param: "refiner",
                message: "a refiner follows an SDXL base model".into(),
            }),
        }
    }

    pub fn decode_to_images(&self, latents: &candle_core::Tensor) -> Result<Vec<GeneratedImage>> {
        match self {
            Self::Sd(m) => m.decode_to_images(latents),
            Self::Sd3(m) => m.vae().decode_to_images(latents),
            Self::Flux(m) => m.vae().decode_to_images(latents),
        }
    }

    /// The image side the model was trained at.
    pub fn default_size(&self) -> usize {
        match self {
            Self::Sd(m) => m.default_size(),
            Self::Sd3(m) => m.default_size(),
            Self::Flux(m) => m.default_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random weights standing in for a checkpoint stored in half precision: on the CPU in f32
    /// the denoiser and VAE read as stored (as a real file's would be), the text encoders in
    /// f32 with the stored dtypes beside (they hold as stored themselves and compute in f32 —
    /// read in f16 they would compute in candle's f16 ops, twice as slow). On a GPU, the dtype.
    #[test]
    fn random_weights_read_as_the_checkpoints_they_stand_in_for() -> Result<()> {
        let dir = ModelDir {
            root: std::path::PathBuf::new(),
            prefer_fp16_variant: false,
        };
        let source = WeightSource {
            dir: &dir,
            random: true,
            random_stored: DType::BF16,
        };
        let cpu = Device::Cpu;
        assert_eq!(source.get("unet", DType::F32, &cpu)?.dtype(), DType::BF16);
        // f16 asked for, a checkpoint stored in bf16: held in its own values.
        assert_eq!(source.get("unet", DType::F16, &cpu)?.dtype(), DType::BF16);
        let f16_source = WeightSource {
            random_stored: DType::F16,
            ..source
        };
        let (text, stored) = f16_source.get_with_stored("te", DType::F32, &cpu)?;
        assert_eq!(
            (text.dtype(), stored.of("any")),
            (DType::F32, Some(DType::F16))
        );
        // Under bf16 what is stored in f32 is held in bf16, computing in f32.
        let f32_source = WeightSource {
            random_stored: DType::F32,
            ..source
        };
        let (text, stored) = f32_source.get_with_stored("te", DType::BF16, &cpu)?;
        assert_eq!(
            (text.dtype(), stored.of("any")),
            (DType::F32, Some(DType::BF16))
        );
        assert_eq!(
            f32_source.get("unet", DType::F32, &cpu)?.dtype(),
            DType::F32
        );
        Ok(())
    }
}
