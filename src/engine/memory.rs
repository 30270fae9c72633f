//! Memory estimates the scheduler plans with: resident weights per component (exact, from the
//! safetensors headers at the load dtype) and working memory per job (a per-architecture model).
//!
//! SD 1.x/2.x working memory, per denoising step with `r` = batch rows (×2 with classifier-free
//! guidance), `T` = latent tokens = (H/8)·(W/8), `s` = bytes per element:
//! * attention without a fused kernel materialises the first block's scores and softmax,
//!   `2 · r · heads · T² · s` (SD 1.5, 512², CFG, f16: 1.07 GB), but a slice of queries at a time
//!   past `attention::MAX_SCORE_BYTES`: at most three slices' worth (768 MiB) is counted;
//! * feature maps kept for the skip connections and the ResNet temporaries, counted as
//!   24 tensors of the first block's size: `24 · r · T · C₀ · s`.
//!
//! SD3 / diffusion transformers, with `T` = image tokens (H/16)·(W/16) + text tokens (77 CLIP +
//! the T5 length, 256 by default) and `D` the transformer width: joint attention's
//! `2 · r · heads · T² · s` (SD3.5 Large, 1024², CFG, f16: 6.0 GB), bounded the same way, plus
//! `16 · r · T · D · s` for the block's live tensors (q, k, v, the 4·D MLP hidden state,
//! residuals).
//!
//! VAE decoding (one image at a time, in the VAE's own dtype: f32 for SDXL's upcast VAE) needs
//! `m · C_max · H · W · s` for the full-resolution feature maps (m = 4 on a GPU, 3 on the CPU:
//! measured 3.8 and 2.0–2.1) plus the single-head mid-block attention `2 · T² · s`, bounded as
//! above. The job needs the larger of the two phases. These
//! coefficients are an upper-bound model; lease 4 on an H200 measured (peak − weights, 1024²)
//! SDXL 7.6 GiB (model: 8.8, its f32 VAE decode), SD3.5 Large 3.5 (4.8), FLUX-dev 3.1 (4.8),
//! SD 1.5 at 512² 0.85 (1.1); on the CPU in f32 (session 9) SD 1.5 at 512² 1.1 (1.6) and at 1024²
//! 4.1 (6.8), SDXL at 512² 1.1 (1.6).

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use crate::engine::error::Result;
use crate::engine::loader::gguf::{is_block_format, GgufFile};
use crate::engine::loader::weights::narrowed;
use crate::engine::loader::{single_file, weights::SafetensorsFile, ModelDir};
use crate::engine::models::blocks::{
    compute_dtype, cpu_half_dtype, cpu_holds_in_model_dtype, weights_dtype,
};
use crate::engine::models::{
    flux::FluxTransformerConfig,
    mmdit::Sd3TransformerConfig,
    quantized::{CpuQuantized, WeightFormat},
    unet::{self, UNetConfig},
    vae::VaeConfig,
};
use crate::engine::pipelines::params::Guidance;
use crate::engine::pipelines::LoadOptions;

/// Whether the pipeline keeps this model's VAE in f32 under f16 (SDXL with `force_upcast`).
fn vae_upcast(dir: &ModelDir) -> Result<bool> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(rename = "_class_name")]
        class_name: String,
    }
    let index: Index = dir.read_json("model_index.json")?;
    if !crate::engine::pipelines::sd::SDXL_PIPELINES.contains(&index.class_name.as_str()) {
        return Ok(false);
    }
    let vae: VaeConfig = dir.read_json("vae/config.json")?;
    Ok(vae.force_upcast)
}

/// The denoiser's shape, as far as working memory goes.
#[derive(Debug, Clone)]
enum Denoiser {
    Unet {
        heads: usize,
        channels: usize,
    },
    Transformer {
        heads: usize,
        width: usize,
        patch: usize,
        text_tokens: usize,
    },
}

/// What one model needs on a device.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// (component folder, resident bytes at the load dtype)
    pub components: Vec<(String, u64)>,
    denoiser: Denoiser,
    vae_channels: usize,
    /// Full-size feature maps of `vae_channels` a decode holds at its peak (see the module docs).
    vae_maps: u64,
    latent_scale: usize,
    dtype_bytes: usize,
    /// The VAE's element size: f32 for SDXL's `force_upcast` VAE under f16.
    vae_dtype_bytes: usize,
    /// The VAE decodes in tiles of this many pixels a side (`LoadOptions::vae_tiling`).
    vae_tile: Option<usize>,
    /// FLUX: `guidance_scale` is an input of the one row, not classifier-free guidance.
    distilled_guidance: bool,
    /// GGML blocks on a GPU: the largest layer widened for its product
    /// (`quantized::widened_product`: an f16 copy and one in the activations' dtype, together).
    widened_layer_bytes: u64,
    /// Denoising steps replayed as CUDA graphs (`engine::enable_step_graphs`): while a loop runs,
    /// the graph's pool holds the forward's activations beside those the eager pool keeps.
    graph_steps: bool,
}

/// A change to how a model is loaded that makes it hold less, for [`Footprint::shrink_to_fit`]:
/// `serve`'s flags of the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shrink {
    /// SD / SDXL on the CPU in f32: the weights held in this half precision, the arithmetic still
    /// f32 (`blocks::compute_dtype`; the result of the rounded weights). DiT repos store theirs
    /// in half precision, which the CPU holds as stored already.
    HalfWeights(DType),
    /// SD3 / FLUX on a GPU: the text encoders in system memory, run on the CPU (the same states).
    TextEncodersOnCpu,
    /// SD3 / FLUX: T5-XXL's Linear layers quantized (its states move by the format's rounding,
    /// ~1 % in q8_0).
    T5(WeightFormat),
    /// The transformer blocks quantized (SD3's and FLUX's; a UNet's attention and feed-forward
    /// layers).
    Transformer(WeightFormat),
}

impl Shrink {
    /// The steps that apply to a model loaded in `dtype` with `options`, from the least costly
    /// in quality: a UNet's weights in f16 on the CPU; the text encoders off the GPU, T5 in
    /// q8_0; then the transformer blocks in q8_0, then in q4k.
    fn ladder(
        dir: &ModelDir,
        device: &candle_core::Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Vec<Self>> {
        let mut ladder = Vec::new();
        let q8_0 = WeightFormat::Quantized(GgmlDType::Q8_0, CpuQuantized::Fastest);
        if !dir.file("transformer/config.json").is_file() {
            if device.is_cpu() && dtype == DType::F32 {
                ladder.push(Self::HalfWeights(DType::F16));
            }
        } else {
            if !device.is_cpu() && !options.text_encoders_on_cpu {
                ladder.push(Self::TextEncodersOnCpu);
            }
            let mut has_t5 = false;
            for folder in ["text_encoder_2", "text_encoder_3"] {
                let config = dir.file(&format!("{folder}/config.json"));
                if config.is_file() && !(folder == "text_encoder_3" && options.without_t5) {
                    let config: serde_json::Value =
                        dir.read_json(&format!("{folder}/config.json"))?;
                    has_t5 |= config["model_type"] == "t5";
                }
            }
            // A GGUF T5 is held as stored (`t5_blocks_format` reads `Stored` for it).
            if has_t5 && options.t5_blocks_format()? == WeightFormat::Dense {
                ladder.push(Self::T5(q8_0));
            }
        }
        // A GGUF file's blocks are held as stored: its quantization was chosen with the file.
        let blocks = options.transformer_blocks_format()?;
        if let WeightFormat::Stored(_) = blocks {
            return Ok(ladder);
        }
        if blocks == WeightFormat::Dense {
            ladder.push(Self::Transformer(q8_0));
        }
        let q4k = WeightFormat::Quantized(GgmlDType::Q4K, CpuQuantized::Fastest);
        let bits = |f: WeightFormat| f.bits_per_weight().unwrap_or(f64::INFINITY);
        if bits(blocks) > bits(q4k) {
            ladder.push(Self::Transformer(q4k));
        }
        Ok(ladder)
    }

    fn apply(self, options: &mut LoadOptions, dtype: &mut DType) {
        match self {
            Self::HalfWeights(half) => *dtype = half,
            Self::TextEncodersOnCpu => options.text_encoders_on_cpu = true,
            Self::T5(format) => options.t5_format = format,
            Self::Transformer(format) => options.transformer_format = format,
        }
    }
}

impl std::fmt::Display for Shrink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HalfWeights(dtype) => write!(f, "--dtype {}", dtype.as_str()),
            Self::TextEncodersOnCpu => write!(f, "--text-encoders-on-cpu"),
            Self::T5(format) => write!(f, "--quantize-t5 {format}"),
            Self::Transformer(format) => write!(f, "--quantize {format}"),
        }
    }
}

/// What a forward holds besides its activations to multiply its largest layer (`widest_values`
/// weights) held in `format`: on CUDA with half-precision activations, GGML blocks are widened to
/// f16 and then to the activations' dtype for one GEMM (`quantized::widens_on_device`), both
/// copies at once. Dense and FP8 weights, f32 activations and other devices multiply in place.
fn widened_layer_bytes(
    format: WeightFormat,
    on_cuda: bool,
    activations: DType,
    widest_values: usize,
) -> u64 {
    let half = matches!(activations, DType::F16 | DType::BF16);
    match format {
        WeightFormat::Quantized(..) | WeightFormat::Stored(_) if on_cuda && half => {
            let per_value = DType::F16.size_in_bytes() + activations.size_in_bytes();
            (widest_values * per_value) as u64
        }
        _ => 0,
    }
}

impl Footprint {
    /// `device` matters for the CPU, whose f32 convolutions transform the UNet's and VAE's wide
    /// 3×3 weights into Winograd's domain at each call, into a buffer the model's thread keeps.
    pub fn read(
        dir: &ModelDir,
        device: &candle_core::Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        let mut components = Vec::new();
        // The widest 3×3 convolution's transform, which the model's thread keeps.
        let mut winograd_buffer = 0;
        // SDXL's pipelines run a force_upcast VAE in f32 under f16 (autoencoder.rs).
        let vae_dtype = if dtype == DType::F16 && vae_upcast(dir)? {
            DType::F32
        } else {
            dtype
        };
        let is_transformer = dir.file("transformer/config.json").is_file();
        let denoiser_folder = if is_transformer {
            "transformer"
        } else {
            "unet"
        };
        let class: serde_json::Value = if is_transformer {
            dir.read_json("transformer/config.json")?
        } else {
            serde_json::Value::Null
        };
        for (folder, stem) in [
            ("text_encoder", "text_encoder/model"),
            ("text_encoder_2", "text_encoder_2/model"),
            ("text_encoder_3", "text_encoder_3/model"),
            (denoiser_folder, ""),
            ("vae", "vae/diffusion_pytorch_model"),
        ] {
            // Text encoders are optional: SD has no second one, the SDXL refiner no first one,
            // SD3 may run without T5.
            // Text encoders kept on the CPU take no device memory.
            if folder.starts_with("text_encoder")
                && (!dir.file(&format!("{folder}/config.json")).is_file()
                    || (folder == "text_encoder_3" && options.without_t5)
                    || (options.text_encoders_on_cpu && is_transformer))
            {
                continue;
            }
            let stem = if stem.is_empty() {
                format!("{folder}/diffusion_pytorch_model")
            } else {
                stem.to_string()
            };
            let component_dtype = if folder == "vae" { vae_dtype } else { dtype };
            let text_config: serde_json::Value = if folder.starts_with("text_encoder") {
                dir.read_json(&format!("{folder}/config.json"))?
            } else {
                serde_json::Value::Null
            };
            let is_t5 = text_config["model_type"] == "t5";
            // A single file in the folder's place: the transformer's, or T5's.
            let single_file = match (&options.transformer_file, &options.t5_file) {
                (Some(path), _) if is_transformer && folder == denoiser_folder => Some(path),
                (_, Some(path)) if is_t5 => Some(path),
                _ => None,
            };
            if let Some(path) = single_file.filter(|p| GgufFile::is_gguf(p)) {
                let file = GgufFile::open(path)?;
                let held = if is_t5 {
                    let compute = compute_dtype(device, component_dtype);
                    gguf_held_bytes(&file, device, compute, options.t5_blocks_format()?, |n| {
                        n.starts_with("enc.blk.") && !n.contains(".attn_rel_b.")
                    })
                } else {
                    let format = options.transformer_blocks_format()?;
                    let blocks = single_file::in_transformer_blocks;
                    gguf_held_bytes(&file, device, component_dtype, format, blocks)
                };
                components.push((folder.to_string(), held));
                continue;
            }
            let file = match single_file {
                Some(path) => SafetensorsFile::open(path)?,
                None => SafetensorsFile::open_component(dir, &stem)?,
            };
            // The dtype a denoiser's or VAE's products' weights are held in: on the CPU, as its
            // file stores them when that is one half precision (`blocks::weights_dtype`).
            let products_dtype =
                weights_dtype(device, component_dtype, file.products_stored_in_half());
            let bytes = if folder.starts_with("text_encoder") {
                // Text encoders compute in f32 on the CPU and hold as stored there, what is
                // stored in f32 in the half precision asked for (`WeightSource::get_with_stored`).
                let half = cpu_half_dtype(device, component_dtype);
                let component_dtype = compute_dtype(device, component_dtype);
                // T5's rules (and format), or the holding every text encoder on the CPU follows.
                let on_cpu = device.is_cpu();
                if is_t5 {
                    let t5_format = options.t5_blocks_format()?;
                    file.loaded_bytes_with(|name, stored, shape| {
                        let held = (component_dtype, t5_format);
                        let stored = narrowed(stored, half);
                        crate::engine::models::t5::held_bytes(name, stored, shape, held, on_cpu)
                    })
                } else {
                    file.loaded_bytes_by(|name, stored| {
                        crate::engine::models::cpu_half_linear::held_dtype(
                            name,
                            narrowed(stored, half),
                            component_dtype,
                            on_cpu,
                        )
                    })
                }
            } else {
                // On the CPU the products' weights in their held dtype, the rest in the f32 the
                // CPU computes in (`blocks::compute_dtype`); the layers `--quantize` holds in
                // blocks (a DiT's block weights, a UNet's transformer blocks' projections) at
                // the format's resident bits, in the format their rows take.
                let compute = compute_dtype(device, component_dtype);
                let quantizes = |name: &str| match folder {
                    "unet" => unet::quantizes(name),
                    _ => is_transformer && single_file::in_transformer_blocks(name),
                };
                file.loaded_bytes_with(|name, _, shape| match shape {
                    [rows, inputs] if folder == denoiser_folder && quantizes(name) => {
                        (held_columns(name, *rows, *inputs).into_iter())
                            .map(|columns| {
                                let format = options.transformer_format.for_inputs(columns);
                                let part = [*rows, columns];
                                format
                                    .layer_bytes(part, device.is_cpu(), compute)
                                    .unwrap_or_else(|| {
                                        dense_held_bytes(name, &part, device, products_dtype)
                                    })
                            })
                            .sum()
                    }
                    _ => dense_held_bytes(name, shape, device, products_dtype),
                })
            };
            components.push((folder.to_string(), bytes));
            if device.is_cpu() && (folder == "unet" || folder == "vae") {
                winograd_buffer = winograd_buffer.max(file.winograd_buffer_bytes());
            }
        }
        if winograd_buffer > 0 {
            components.push(("Winograd buffer".to_string(), winograd_buffer));
        }
        let distilled_guidance = class["_class_name"] == "FluxTransformer2DModel";
        // With the widest product a forward runs over its tokens, in values (the adaLN
        // modulations' one row a sample stays in blocks): FLUX's single blocks' output projection
        // (5w → w), SD3's MLP (w → 4w), a UNet's GEGLU projection (c → 8c) at its widest block.
        let (denoiser, widest_product_values) = if distilled_guidance {
            let c: FluxTransformerConfig = dir.read_json("transformer/config.json")?;
            let width = c.inner_dim();
            let denoiser = Denoiser::Transformer {
                heads: c.num_attention_heads,
                width,
                // 2×2 latent packing: one token per four latents.
                patch: 2,
                text_tokens: crate::engine::pipelines::flux::default_t5_tokens(c.guidance_embeds),
            };
            (denoiser, 5 * width * width)
        } else if is_transformer {
            let c: Sd3TransformerConfig = dir.read_json("transformer/config.json")?;
            let width = c.inner_dim();
            let denoiser = Denoiser::Transformer {
                heads: c.num_attention_heads,
                width,
                patch: c.patch_size,
                text_tokens: 77 + crate::engine::pipelines::sd3::DEFAULT_T5_TOKENS,
            };
            (denoiser, 4 * width * width)
        } else {
            let unet: UNetConfig = dir.read_json("unet/config.json")?;
            // diffusers' quirk: `attention_head_dim` is the head count unless
            // `num_attention_heads` is set.
            let heads = unet
                .num_attention_heads
                .as_ref()
                .unwrap_or(&unet.attention_head_dim)
                .expand(unet.block_out_channels.len())
                .and_then(|h| h.first().copied())
                .unwrap_or(8);
            let widest = unet.block_out_channels.iter().copied().max().unwrap_or(320);
            let denoiser = Denoiser::Unet {
                heads,
                channels: unet.block_out_channels.first().copied().unwrap_or(320),
            };
            (denoiser, 8 * widest * widest)
        };
        let widened_layer_bytes = widened_layer_bytes(
            options.transformer_blocks_format()?,
            device.is_cuda(),
            compute_dtype(device, dtype),
            widest_product_values,
        );
        let vae: VaeConfig = dir.read_json("vae/config.json")?;
        Ok(Self {
            widened_layer_bytes,
            components,
            denoiser,
            vae_channels: vae.block_out_channels.iter().copied().max().unwrap_or(512),
            vae_maps: if device.is_cpu() {
                CPU_VAE_MAPS
            } else {
                DEVICE_VAE_MAPS
            },
            latent_scale: vae.scale_factor(),
            // Activations in the dtype the device computes in.
            dtype_bytes: compute_dtype(device, dtype).size_in_bytes(),
            vae_dtype_bytes: compute_dtype(device, vae_dtype).size_in_bytes(),
            vae_tile: if options.vae_tiling {
                vae.tile_pixels()
            } else {
                None
            },
            distilled_guidance,
            graph_steps: device.is_cuda() && crate::engine::pipelines::step_graphs_enabled(),
        })
    }

    /// Pixels per latent along each side.
    pub fn latent_scale(&self) -> usize {
        self.latent_scale
    }

    /// [`Self::read`] with `options` fitted to `budget` bytes of `device`: on the CPU a
    /// transformer quantized to a format whose fastest product there holds more than its blocks
    /// — candle's tiles beside them, twice
    /// ([`held_twice_on_cpu`](crate::engine::models::quantized::WeightFormat::held_twice_on_cpu)), or
    /// our k-quant tiles' super-block scales widened to f32 (q4k 4.75 bits a weight against 4.5,
    /// q6k 6.625 against 6.5625) — is held once as blocks
    /// ([`compact`](crate::engine::models::quantized::WeightFormat::compact)) when it would not fit
    /// beside a default-size image's working memory. Trades speed for fitting: the tiles run
    /// 0.4–0.85× the f32 layer's time, the blocks held once ~1.0–1.1×. The options as fitted,
    /// with their footprint.
    pub fn read_fitted(
        dir: &ModelDir,
        device: &candle_core::Device,
        dtype: DType,
        options: &LoadOptions,
        budget: u64,
    ) -> Result<(LoadOptions, Self)> {
        let (fitted, footprint, traded) = Self::fit(dir, device, dtype, options, budget)?;
        if let Some([fastest, once]) = traded {
            tracing::info!(
                fastest,
                once,
                budget,
                "quantized blocks held once on the CPU: in the format's faster tiles they would not fit the memory budget"
            );
        }
        Ok((fitted, footprint))
    }

    /// [`Self::read_fitted`] without its log: also what it traded, [what the fastest product
    /// needs, what held once needs], when it did.
    fn fit(
        dir: &ModelDir,
        device: &candle_core::Device,
        dtype: DType,
        options: &LoadOptions,
        budget: u64,
    ) -> Result<(LoadOptions, Self, Option<[u64; 2]>)> {
        let footprint = Self::read(dir, device, dtype, options)?;
        let compact = LoadOptions {
            transformer_format: options.transformer_blocks_format()?.compact(),
            t5_format: options.t5_blocks_format()?.compact(),
            ..options.clone()
        };
        if !device.is_cpu() || compact == *options {
            return Ok((options.clone(), footprint, None));
        }
        let size = crate::engine::pipelines::read_card(dir, "")?.default_size;
        let need = |f: &Self| f.default_need(size);
        if need(&footprint) <= budget {
            return Ok((options.clone(), footprint, None));
        }
        let held_once = Self::read(dir, device, dtype, &compact)?;
        if need(&held_once) >= need(&footprint) {
            // Held once anyway (no tiles for the format, or its fallback, on this CPU).
            return Ok((options.clone(), footprint, None));
        }
        let traded = [need(&footprint), need(&held_once)];
        Ok((compact, held_once, Some(traded)))
    }

    /// The weights and the working memory of one image of `size`² with default guidance: what
    /// must fit the budget for a model to serve its default request.
    pub fn default_need(&self, size: usize) -> u64 {
        self.weights_bytes() + self.activation_bytes(1, size, size, Guidance::DEFAULT)
    }

    /// For a model that does not fit `budget` with a default-size image as `options` load it:
    /// the fewest [`Shrink`] steps, taken in order from the least costly in quality, that make
    /// it fit (read as [`Self::read_fitted`] would then hold it), with what it then needs;
    /// `None` when all of them together do not (or none applies).
    pub fn shrink_to_fit(
        dir: &ModelDir,
        device: &candle_core::Device,
        dtype: DType,
        options: &LoadOptions,
        budget: u64,
    ) -> Result<Option<(Vec<Shrink>, u64)>> {
        let size = crate::engine::pipelines::read_card(dir, "")?.default_size;
        let mut steps = Vec::new();
        let (mut shrunk, mut shrunk_dtype) = (options.clone(), dtype);
        for step in Shrink::ladder(dir, device, dtype, options)? {
            step.apply(&mut shrunk, &mut shrunk_dtype);
            steps.push(step);
            // Quietly: these are what-ifs, not what loads.
            let (_, footprint, _) = Self::fit(dir, device, shrunk_dtype, &shrunk, budget)?;
            let need = footprint.default_need(size);
            if need <= budget {
                return Ok(Some((steps, need)));
            }
        }
        Ok(None)
    }

    pub fn weights_bytes(&self) -> u64 {
        self.components.iter().map(|(_, b)| b).sum()
    }

    /// Working memory of one denoising run of `rows` images at `width`×`height`: the larger of
    /// the denoiser's and the VAE decode's.
    pub fn activation_bytes(
        &self,
        rows: usize,
        width: usize,
        height: usize,
        guidance: Guidance,
    ) -> u64 {
        self.denoiser_bytes(rows, width, height, guidance)
            .max(self.vae_decode_bytes(width, height))
    }

    fn denoiser_bytes(&self, rows: usize, width: usize, height: usize, guidance: Guidance) -> u64 {
        let s = self.dtype_bytes as u64;
        let scale = self.latent_scale.max(1);
        let latent_tokens = ((width / scale) * (height / scale)) as u64;
        // Two rows per image under classifier-free guidance; FLUX's guidance scale is an input
        // of one row, only its true CFG doubles them.
        let doubled = if self.distilled_guidance {
            guidance.true_cfg
        } else {
            guidance.scale
        };
        let r = (rows * if doubled { 2 } else { 1 }) as u64;
        let pools = if self.graph_steps { 2 } else { 1 };
        self.widened_layer_bytes
            + pools
                * match self.denoiser {
                    Denoiser::Unet { heads, channels } => {
                        attention_scores(2 * r * heads as u64 * latent_tokens * latent_tokens * s)
                            + 24 * r * latent_tokens * channels as u64 * s
                    }
                    Denoiser::Transformer {
                        heads,
                        width,
                        patch,
                        text_tokens,
                    } => {
                        let t = latent_tokens / (patch * patch).max(1) as u64 + text_tokens as u64;
                        attention_scores(2 * r * heads as u64 * t * t * s)
                            + 16 * r * t * width as u64 * s
                    }
                }
    }

    /// Working memory of one image's VAE decode at `width`×`height`.
    pub fn vae_decode_bytes(&self, width: usize, height: usize) -> u64 {
        let s = self.vae_dtype_bytes as u64;
        let scale = self.latent_scale.max(1);
        // Tiled: one tile's activations, plus every decoded tile kept for blending (3 channels,
        // overlapping by a quarter: under 2× the image).
        let (vw, vh, kept) = match self.vae_tile {
            Some(t) if width > t || height > t => {
                (width.min(t), height.min(t), 6 * (width * height) as u64 * s)
            }
            _ => (width, height, 0),
        };
        let vae_tokens = ((vw / scale) * (vh / scale)) as u64;
        // The mid block's single-head attention.
        let attention = attention_scores(2 * vae_tokens * vae_tokens * s);
        self.vae_maps * self.vae_channels as u64 * (vw * vh) as u64 * s + attention + kept
    }
}

/// A VAE decode's peak, in feature maps of its widest channel count at the full image size: on a
/// GPU (cuDNN workspaces, the caching pool) SDXL's f32 decode at 1024² measured 3.8; on the CPU SD
/// 1.5 at 512² and 1024² and SDXL at 512² measured 2.0–2.1 (docs/memory.md).
const DEVICE_VAE_MAPS: u64 = 4;
const CPU_VAE_MAPS: u64 = 3;

/// The input widths of the parts a block weight of `rows` × `inputs` is held in: FLUX's
/// single-block output projection as its attention and MLP columns (`SingleOutput`, `rows` of
/// each and the rest), every other weight whole.
fn held_columns(name: &str, rows: usize, inputs: usize) -> Vec<usize> {
    let single_output = (name.contains("single_transformer_blocks.")
        && name.ends_with(".proj_out.weight"))
        || (name.contains("single_blocks.") && name.ends_with(".linear2.weight"));
    if single_output && inputs > rows {
        vec![rows, inputs - rows]
    } else {
        vec![inputs]
    }
}

/// Bytes a dense denoiser or VAE tensor is held in: on a GPU in the model's dtype; on the CPU
/// the products' weights in `products_dtype` (as stored where that is one half precision), the
/// rest in the f32 it computes in (`blocks::compute_dtype`).
fn dense_held_bytes(
    name: &str,
    shape: &[usize],
    device: &candle_core::Device,
    products_dtype: DType,
) -> u64 {
    let held = match device.is_cpu() {
        false => products_dtype,
        true if cpu_holds_in_model_dtype(name, shape) => products_dtype,
        true => DType::F32,
    };
    (shape.iter().product::<usize>() * held.size_in_bytes()) as u64
}

/// Bytes a component from a GGUF `file` is held in under `format` ([`WeightFormat::Stored`]):
/// the Linear layers `quantized_layer` names in their own format at the resident bits of the
/// product they take; everything else (embedders, norms, a transformer's final layer — some
/// files store those in block formats too) dense.
fn gguf_held_bytes(
    file: &GgufFile,
    device: &candle_core::Device,
    dtype: DType,
    format: WeightFormat,
    quantized_layer: impl Fn(&str) -> bool,
) -> u64 {
    file.names()
        .map(|name| {
            let (Some(stored), Some(dims)) = (file.format(name), file.dims(name)) else {
                return 0;
            };
            let held = match dims {
                [rows, inputs] if quantized_layer(name) && is_block_format(stored) => {
                    let held = format.stored_as(stored);
                    held.and_then(|f| f.layer_bytes([*rows, *inputs], device.is_cpu(), dtype))
                }
                _ => None,
            };
            held.unwrap_or_else(|| dense_held_bytes(name, dims, device, dtype))
        })
        .sum()
}

/// What attention whose whole scores and softmax would take `bytes` holds at once: unfused, the
/// queries go in slices past [`MAX_SCORE_BYTES`](crate::engine::models::attention::MAX_SCORE_BYTES)
/// (scores, softmax and an f32 upcast at most); the fused kernels (CPU f32, CUDA f16/bf16) hold
/// none of it.
fn attention_scores(bytes: u64) -> u64 {
    bytes.min(3 * crate::engine::models::attention::MAX_SCORE_BYTES as u64)
}

/// Peak memory while a stretch of work runs. CUDA: the device's used memory as the driver
/// reports it (allocator pools included), sampled every millisecond by a thread, minus what was
/// in use when the meter started — so start it before the model is built to count the weights.
/// CPU: the kernel's own high-water mark of this process's resident set (reset at start), minus
/// the resident set at start.
pub struct PeakMeter {
    baseline: u64,
    sampler: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    )>,
}

impl PeakMeter {
    pub fn start(device: &candle_core::Device) -> Self {
        Self::start_from(device, None)
    }

    /// Memory in use when the meter started (what [`Self::finish`] subtracts).
    pub fn baseline(&self) -> u64 {
        self.baseline
    }

    /// A meter whose figures count from `baseline` (an earlier meter's) rather than from now.
    pub fn start_from(device: &candle_core::Device, baseline: Option<u64>) -> Self {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(cuda) = device {
            use std::sync::atomic::{AtomicBool, Ordering};
            let context = cuda.cuda_stream().context().clone();
            let used = move || -> u64 {
                context
                    .mem_get_info()
                    .map(|(free, total)| (total - free) as u64)
                    .unwrap_or(0)
            };
            let baseline = baseline.unwrap_or_else(&used);
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let handle = std::thread::spawn(move || {
                let mut peak = used();
                while !flag.load(Ordering::Relaxed) {
                    peak = peak.max(used());
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                peak.max(used())
            });
            return Self {
                baseline,
                sampler: Some((stop, handle)),
            };
        }
        let _ = device;
        // Writing 5 to clear_refs resets VmHWM to the current resident set; the mark so far is
        // kept for `process_peak_resident`.
        if let Some(kib) = process_status_kib("VmHWM:") {
            PEAK_BEFORE_RESET.fetch_max(kib * 1024, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Self {
            baseline: baseline.unwrap_or_else(|| process_status_kib("VmRSS:").unwrap_or(0) * 1024),
            sampler: None,
        }
    }

    /// Peak bytes above the starting point (None where the platform does not tell).
    pub fn finish(self) -> Option<u64> {
        let peak = match self.sampler {
            Some((stop, handle)) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                handle.join().ok()?
            }
            None => process_status_kib("VmHWM:")? * 1024,
        };
        Some(peak.saturating_sub(self.baseline))
    }
}

/// The highest high-water mark a [`PeakMeter`] has reset.
static PEAK_BEFORE_RESET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// This process's largest resident set since it started, runtime and libraries included: the
/// memory a machine must have to run it (None where the platform does not tell).
pub fn process_peak_resident() -> Option<u64> {
    let now = process_status_kib("VmHWM:")? * 1024;
    Some(now.max(PEAK_BEFORE_RESET.load(std::sync::atomic::Ordering::Relaxed)))
}

/// A `kB` field of `/proc/self/status` (Linux).
fn process_status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::models::cpu_half_linear::held_dtype;
    use crate::engine::models::cpu_int8_tiles as int8_tiles;
    use crate::engine::models::quantized::WeightFormat;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    const UNGUIDED: Guidance = Guidance {
        scale: false,
        true_cfg: false,
    };

    /// A meter's reset of the kernel's high-water mark does not lose the process's peak.
    #[cfg(target_os = "linux")]
    #[test]
    fn process_peak_survives_a_meter_reset() {
        const BLOCK: usize = 256 << 20;
        let mut block = vec![0u8; BLOCK];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        drop(std::hint::black_box(block));
        let _meter = PeakMeter::start(&Device::Cpu);
        // (The kernel's mark is now the resident set, well under the block unless other tests
        // hold as much.)
        assert!(process_peak_resident().unwrap() >= BLOCK as u64);
    }

    /// Two rows per image where the model runs them: SD under its guidance scale, FLUX (whose
    /// scale is an input of one row) only under true CFG.
    #[test]
    fn guidance_doubles_the_rows_the_model_doubles() {
        let sd = sd1_dir();
        let true_cfg = Guidance {
            scale: true,
            true_cfg: true,
        };
        for (dir, doubled_by_default) in [(sd, true), (flux_dir(), false)] {
            let f =
                Footprint::read(&dir, &Device::Cpu, DType::F32, &LoadOptions::default()).unwrap();
            let one_row = f.denoiser_bytes(1, 512, 512, UNGUIDED);
            assert!(f.denoiser_bytes(2, 512, 512, UNGUIDED) > one_row);
            let default = f.denoiser_bytes(1, 512, 512, Guidance::DEFAULT);
            assert_eq!(default > one_row, doubled_by_default, "{:?}", dir.root);
            assert_eq!(
                f.denoiser_bytes(1, 512, 512, true_cfg),
                f.denoiser_bytes(2, 512, 512, UNGUIDED),
                "{:?}",
                dir.root
            );
        }
    }

    fn sd1_dir() -> ModelDir {
        ModelDir {
            root: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models/sd1-tiny"),
            prefer_fp16_variant: false,
        }
    }

    fn flux_dir() -> ModelDir {
        ModelDir {
            root: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models/flux-dev-tiny"),
            prefer_fp16_variant: false,
        }
    }

    #[test]
    fn options_change_the_device_footprint() {
        let dir = flux_dir();
        let full =
            Footprint::read(&dir, &Device::Cpu, DType::F32, &LoadOptions::default()).unwrap();
        let folders: Vec<&str> = full.components.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            folders,
            [
                "text_encoder",
                "text_encoder_2",
                "transformer",
                "vae",
                "Winograd buffer"
            ]
        );
        let bytes = |f: &Footprint, folder: &str| {
            f.components
                .iter()
                .find(|(name, _)| name == folder)
                .map(|(_, b)| *b)
        };
        // Text encoders on the CPU leave the device.
        let cpu_text = Footprint::read(
            &dir,
            &Device::Cpu,
            DType::F32,
            &LoadOptions {
                text_encoders_on_cpu: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(bytes(&cpu_text, "text_encoder_2"), None);
        assert_eq!(bytes(&cpu_text, "transformer"), bytes(&full, "transformer"));
        // The blocks' layers in the format (byte for byte as held:
        // `quantized_dit_blocks_are_planned_as_they_are_held`): held twice on the CPU where
        // candle repacks q8_0 into tiles kept beside the blocks, once when asked (`-compact`),
        // where ours take it, or where candle has no tiles for the format (q5_0). The tiny
        // transformer's rows are 32 wide, so q6k's and q4k's 256-value blocks fall back to
        // q8_0's and q5_0's.
        let read_as = |format: &str| {
            let options = LoadOptions {
                transformer_format: format.parse().unwrap(),
                ..Default::default()
            };
            let f = Footprint::read(&dir, &Device::Cpu, DType::F32, &options).unwrap();
            bytes(&f, "transformer").unwrap()
        };
        let dense = bytes(&full, "transformer").unwrap();
        assert_eq!(read_as("q6k"), read_as("q8_0"));
        assert_eq!(read_as("q6k-compact"), read_as("q8_0-compact"));
        assert_eq!(read_as("q4k"), read_as("q5_0"));
        let twice = crate::engine::models::quantized::cpu_repacks(GgmlDType::Q8_0);
        assert_eq!(read_as("q8_0") > read_as("q8_0-compact"), twice);
        assert!(read_as("q5_0") < read_as("q8_0-compact"));
        assert!(read_as("q8_0-compact") < dense / 2);
        // A transformer's working memory grows with the square of the token count.
        let small = full.activation_bytes(1, 512, 512, UNGUIDED);
        let large = full.activation_bytes(1, 1024, 1024, UNGUIDED);
        assert!(large > 2 * small);
    }

    #[test]
    fn sdxl_counts_its_upcast_vae_in_f32() {
        let fixture = |name: &str| ModelDir {
            root: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models")
                .join(name),
            prefer_fp16_variant: false,
        };
        let read = |name: &str, dtype: DType| {
            Footprint::read(&fixture(name), &Device::Cpu, dtype, &LoadOptions::default()).unwrap()
        };
        let vae_bytes = |name: &str, dtype: DType| {
            read(name, dtype)
                .components
                .into_iter()
                .find(|(folder, _)| folder == "vae")
                .map(|(_, b)| b)
                .unwrap()
        };
        // Its weights, and its decode's working memory (lease 4: SDXL's peak at 1024² was the
        // f32 decode); SD 1.5's VAE holds its products' weights in the dtype. The CPU decodes
        // in f32 under either.
        let decode = |name: &str, dtype: DType| read(name, dtype).vae_decode_bytes(512, 512);
        for measure in [&vae_bytes as &dyn Fn(&str, DType) -> u64, &decode] {
            assert_eq!(
                measure("sdxl-tiny", DType::F16),
                measure("sdxl-tiny", DType::F32)
            );
        }
        assert!(10 * vae_bytes("sd1-tiny", DType::F16) < 6 * vae_bytes("sd1-tiny", DType::F32));
        assert_eq!(
            decode("sd1-tiny", DType::F16),
            decode("sd1-tiny", DType::F32)
        );
    }

    /// FLUX-dev's widest product widened from q8_0 or a GGUF file's blocks on CUDA: 3 072 ×
    /// 15 360 values in f16 and then bf16, ~180 MiB; nothing for dense or FP8 weights, f32
    /// activations, or elsewhere.
    #[test]
    fn widened_ggml_layers_are_counted_on_cuda_only() {
        let flux = 5 * 3072 * 3072;
        let q8 = WeightFormat::Quantized(GgmlDType::Q8_0, CpuQuantized::default());
        let gguf = WeightFormat::Stored(CpuQuantized::default());
        assert_eq!(
            widened_layer_bytes(q8, true, DType::BF16, flux),
            4 * flux as u64
        );
        assert_eq!(
            widened_layer_bytes(gguf, true, DType::F16, flux),
            4 * flux as u64
        );
        for (format, on_cuda, activations) in [
            (q8, false, DType::BF16),
            (gguf, true, DType::F32),
            (WeightFormat::Dense, true, DType::BF16),
            (WeightFormat::Fp8, true, DType::BF16),
        ] {
            assert_eq!(widened_layer_bytes(format, on_cuda, activations, flux), 0);
        }
    }

    #[test]
    fn sdxl_at_2048_with_vae_tiling_is_planned_within_a_24_gb_card() {
        // SDXL's shape (benches/sdxl: 5 heads and 320 channels in the first block, a 512-channel
        // VAE of 1024-pixel tiles, decoding in f32) and the weights lease 4 measured in f16.
        let tiled = Footprint {
            components: vec![("all".into(), (6.91 * (1u64 << 30) as f64) as u64)],
            denoiser: Denoiser::Unet {
                heads: 5,
                channels: 320,
            },
            vae_channels: 512,
            vae_maps: DEVICE_VAE_MAPS,
            latent_scale: 8,
            dtype_bytes: 2,
            vae_dtype_bytes: 4,
            vae_tile: Some(1024),
            distilled_guidance: false,
            widened_layer_bytes: 0,
            graph_steps: false,
        };
        // Issue #9: 2048² on a 24 GB card (the default budget: 90 % of it). Counting the whole
        // attention score matrix (172 GB at 2048² with CFG) refused it on any card.
        let budget = 24_000_000_000 * 9 / 10;
        let need = |f: &Footprint| {
            f.weights_bytes() + f.activation_bytes(1, 2048, 2048, Guidance::DEFAULT)
        };
        assert!(need(&tiled) < budget, "{}", need(&tiled));
        // Untiled, the f32 decode of the whole image alone is more than the card holds.
        let whole = Footprint {
            vae_tile: None,
            ..tiled
        };
        assert!(need(&whole) > budget, "{}", need(&whole));
    }

    #[test]
    fn graph_steps_count_the_denoisers_activations_twice() {
        // FLUX-dev's shape at 1024² (24 heads of 128, 512 text tokens). The VAE decode, which
        // runs after the loop's graph is gone, is counted once either way.
        let eager = Footprint {
            components: vec![],
            denoiser: Denoiser::Transformer {
                heads: 24,
                width: 3072,
                patch: 2,
                text_tokens: 512,
            },
            vae_channels: 512,
            vae_maps: DEVICE_VAE_MAPS,
            latent_scale: 8,
            dtype_bytes: 2,
            vae_dtype_bytes: 2,
            vae_tile: None,
            distilled_guidance: true,
            widened_layer_bytes: 180 << 20,
            graph_steps: false,
        };
        let graphs = Footprint {
            graph_steps: true,
            ..eager.clone()
        };
        let denoiser = |f: &Footprint| f.denoiser_bytes(1, 1024, 1024, Guidance::DEFAULT);
        // The graph's pool copies the activations, not the widened layer (freed in the forward).
        assert_eq!(
            denoiser(&graphs) - eager.widened_layer_bytes,
            2 * (denoiser(&eager) - eager.widened_layer_bytes)
        );
        assert_eq!(
            graphs.vae_decode_bytes(1024, 1024),
            eager.vae_decode_bytes(1024, 1024)
        );
        // Off the GPU there is no graph to replay.
        let cpu = Footprint::read(
            &flux_dir(),
            &Device::Cpu,
            DType::F32,
            &LoadOptions::default(),
        )
        .unwrap();
        assert!(!cpu.graph_steps);
    }

    /// On the CPU, blocks candle would hold twice are held once exactly when twice would not
    /// fit the budget beside a default-size image; dense models and formats held once anyway
    /// are left as asked. The tiny FLUX's rows are 32 wide, where every k-quant falls back to a
    /// 32-value format; with heads of 128 (a transformer file of that width, zeros: the planner
    /// reads only its header) its rows are 256 wide and keep q6k, which candle tiles on x86 with
    /// AVX2 and our tiles hold once on CPUs with VNNI. candle's boundary is tested as on a CPU
    /// without ours, so it runs on every x86 machine.
    #[test]
    fn quantized_blocks_are_held_once_on_the_cpu_when_twice_would_not_fit() {
        let tmp = tempfile::tempdir().unwrap();
        copy_tree(&flux_dir().root, tmp.path());
        let config_path = tmp.path().join("transformer/config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["attention_head_dim"] = serde_json::json!(128);
        config["axes_dims_rope"] = serde_json::json!([32, 48, 48]);
        std::fs::write(&config_path, config.to_string()).unwrap();
        let wide: std::collections::HashMap<String, candle_core::Tensor> =
            crate::engine::loader::single_file::bfl_tensors(
                &serde_json::from_value(config).unwrap(),
            )
            .into_iter()
            .map(|(name, shape)| {
                let zeros = candle_core::Tensor::zeros(shape, DType::F32, &Device::Cpu);
                (name, zeros.unwrap())
            })
            .collect();
        let transformer = tmp.path().join("flux1-dev-wide-bfl.safetensors");
        candle_core::safetensors::save(&wide, &transformer).unwrap();
        let dir = ModelDir {
            root: tmp.path().to_path_buf(),
            prefer_fp16_variant: false,
        };
        let size = crate::engine::pipelines::read_card(&dir, "")
            .unwrap()
            .default_size;
        let fitted = |format: &str, budget: u64| {
            let options = LoadOptions {
                transformer_format: format.parse().unwrap(),
                transformer_file: Some(transformer.clone()),
                ..Default::default()
            };
            let (options, f) =
                Footprint::read_fitted(&dir, &Device::Cpu, DType::F32, &options, budget).unwrap();
            let need = f.weights_bytes() + f.activation_bytes(1, size, size, Guidance::DEFAULT);
            (options.transformer_format, need)
        };
        // q5_0 has no tiles: held once as asked, whatever the budget.
        let (no_tiles, _) = fitted("q5_0", 1);
        assert_eq!(no_tiles, "q5_0".parse().unwrap());
        // A dense transformer has no second copy to drop.
        let (dense, _) = fitted("dense", 1);
        assert_eq!(dense, WeightFormat::Dense);
        let (asked, need_asked) = fitted("q6k", u64::MAX);
        let (once, need_once) = fitted("q6k-compact", u64::MAX);
        let ours = int8_tiles::takes(GgmlDType::Q6K);
        if ours {
            // Our tiles hold q6k once, its d in f32: a little more than the blocks, so the same
            // boundary holds.
            assert!(need_once < need_asked, "{need_once} {need_asked}");
            assert_eq!(fitted("q6k", need_asked), (asked, need_asked));
            assert_eq!(fitted("q6k", need_asked - 1), (once, need_once));
        }
        int8_tiles::as_if_absent(|| {
            let (twice, need_twice) = fitted("q6k", u64::MAX);
            if !crate::engine::models::quantized::cpu_repacks(GgmlDType::Q6K) {
                // No q6k tiles on this CPU: held once either way.
                assert_eq!(need_once, need_twice);
                assert_eq!(fitted("q6k", 1), (twice, need_twice));
                return;
            }
            // Ours (where they run) hold less than candle's twice.
            assert_eq!(need_asked < need_twice, ours, "{need_asked} {need_twice}");
            // Room for twice: the faster tiles stay.
            assert_eq!(fitted("q6k", need_twice), (twice, need_twice));
            // One byte short of it: held once, and the footprint says so.
            assert_eq!(fitted("q6k", need_twice - 1), (once, need_once));
            // Not even once fits: still held once, the closest to fitting.
            assert_eq!(fitted("q6k", need_once / 2), (once, need_once));
        });
    }

    /// A FLUX that does not fit is told the fewest of the ladder's steps that make it fit, in
    /// order (on the CPU: T5 in q8_0, then the transformer in q8_0, then in q4k), with what it
    /// then needs (a UNet on the CPU: its weights in f16, then its transformer blocks
    /// quantized); a budget none reach gets none.
    #[test]
    fn a_model_that_does_not_fit_is_told_the_fewest_steps_that_would() {
        let dir = flux_dir();
        let size = crate::engine::pipelines::read_card(&dir, "")
            .unwrap()
            .default_size;
        let need = |t5: &str, transformer: &str| {
            let options = LoadOptions {
                t5_format: t5.parse().unwrap(),
                transformer_format: transformer.parse().unwrap(),
                ..Default::default()
            };
            Footprint::read(&dir, &Device::Cpu, DType::F32, &options)
                .unwrap()
                .default_need(size)
        };
        let (dense, t5) = (need("dense", "dense"), need("q8_0", "dense"));
        let (both, q4k) = (need("q8_0", "q8_0"), need("q8_0", "q4k"));
        assert!(
            dense > t5 && t5 > both && both > q4k,
            "{dense} {t5} {both} {q4k}"
        );
        let advise = |budget: u64| {
            Footprint::shrink_to_fit(&dir, &Device::Cpu, DType::F32, &Default::default(), budget)
                .unwrap()
        };
        let f = |s: &str| s.parse::<WeightFormat>().unwrap();
        assert_eq!(advise(t5), Some((vec![Shrink::T5(f("q8_0"))], t5)));
        let two = vec![Shrink::T5(f("q8_0")), Shrink::Transformer(f("q8_0"))];
        assert_eq!(advise(t5 - 1), Some((two.clone(), both)));
        assert_eq!(advise(both), Some((two, both)));
        let three = vec![
            Shrink::T5(f("q8_0")),
            Shrink::Transformer(f("q8_0")),
            Shrink::Transformer(f("q4k")),
        ];
        assert_eq!(advise(both - 1), Some((three, q4k)));
        assert_eq!(advise(q4k - 1), None);
        // Already quantized: only the steps that still shrink it.
        let asked = LoadOptions {
            t5_format: f("q8_0"),
            transformer_format: f("q6k"),
            ..Default::default()
        };
        let advice = Footprint::shrink_to_fit(&dir, &Device::Cpu, DType::F32, &asked, q4k);
        assert_eq!(
            advice.unwrap(),
            Some((vec![Shrink::Transformer(f("q4k"))], q4k))
        );
        // A UNet on the CPU in f32: its weights in f16, then its transformer blocks in q8_0,
        // then in q4k (the tiny model's rows take q5_0 for it).
        let unet = |dtype: DType, budget: u64| {
            Footprint::shrink_to_fit(&sd1_dir(), &Device::Cpu, dtype, &Default::default(), budget)
                .unwrap()
        };
        let sd1_size = crate::engine::pipelines::read_card(&sd1_dir(), "")
            .unwrap()
            .default_size;
        let sd1_need = |dtype: DType, transformer: &str| {
            let options = LoadOptions {
                transformer_format: f(transformer),
                ..Default::default()
            };
            Footprint::read(&sd1_dir(), &Device::Cpu, dtype, &options)
                .unwrap()
                .default_need(sd1_size)
        };
        let half = sd1_need(DType::F16, "dense");
        let (half_q8_0, half_q4k) = (sd1_need(DType::F16, "q8_0"), sd1_need(DType::F16, "q4k"));
        assert!(
            sd1_need(DType::F32, "dense") > half && half > half_q8_0 && half_q8_0 > half_q4k,
            "{half} {half_q8_0} {half_q4k}"
        );
        let mut steps = vec![Shrink::HalfWeights(DType::F16)];
        assert_eq!(unet(DType::F32, half), Some((steps.clone(), half)));
        steps.push(Shrink::Transformer(f("q8_0")));
        assert_eq!(unet(DType::F32, half - 1), Some((steps.clone(), half_q8_0)));
        steps.push(Shrink::Transformer(f("q4k")));
        assert_eq!(unet(DType::F32, half_q8_0 - 1), Some((steps, half_q4k)));
        assert_eq!(unet(DType::F32, half_q4k - 1), None);
        // Already in half precision: the quantization steps only.
        let quantized = vec![Shrink::Transformer(f("q8_0"))];
        assert_eq!(unet(DType::F16, half - 1), Some((quantized, half_q8_0)));
        // Told as `serve`'s flags.
        let flags: Vec<String> = [
            Shrink::HalfWeights(DType::F16),
            Shrink::TextEncodersOnCpu,
            Shrink::T5(f("q8_0")),
            Shrink::Transformer(f("q4k-compact")),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            flags,
            [
                "--dtype f16",
                "--text-encoders-on-cpu",
                "--quantize-t5 q8_0",
                "--quantize q4k-compact"
            ]
        );
    }

    /// The bytes a DiT's transformer holds under `--quantize` / a GGUF file against the dense
    /// model of `dense_file` (`None`: the folder's weights), as held and as planned.
    fn dit_bytes(dir: &ModelDir, file: Option<&str>, format: &str) -> (i64, i64) {
        use crate::engine::loader::single_file::Naming;
        use crate::engine::models::{flux::FluxTransformer, mmdit::Sd3Transformer};
        use crate::engine::pipelines::WeightSource;
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let options = LoadOptions {
            transformer_file: file.map(|f| models.join(f)),
            transformer_format: format.parse().unwrap(),
            ..Default::default()
        };
        let source = WeightSource {
            dir,
            random: false,
            random_stored: DType::BF16,
        };
        let config_path = dir.file("transformer/config.json");
        let class: serde_json::Value = crate::engine::loader::read_json(&config_path).unwrap();
        let held = if class["_class_name"] == "FluxTransformer2DModel" {
            let weights = source
                .transformer(&options, Naming::Bfl, DType::F32, &Device::Cpu)
                .unwrap();
            let config = serde_json::from_value(class).unwrap();
            FluxTransformer::new(weights.vb.clone(), config, &config_path, weights.layers())
                .unwrap()
                .block_layer_bytes()
        } else {
            let config: crate::engine::models::mmdit::Sd3TransformerConfig =
                serde_json::from_value(class).unwrap();
            let naming = Naming::Sai {
                blocks: config.num_layers,
            };
            let weights = source
                .transformer(&options, naming, DType::F32, &Device::Cpu)
                .unwrap();
            Sd3Transformer::new(weights.vb.clone(), config, &config_path, weights.layers())
                .unwrap()
                .block_layer_bytes()
        };
        let footprint = Footprint::read(dir, &Device::Cpu, DType::F32, &options).unwrap();
        let planned = footprint
            .components
            .iter()
            .find(|(c, _)| c == "transformer");
        (held as i64, planned.unwrap().1 as i64)
    }

    /// `--quantize` on a DiT is planned tensor by tensor as the model holds its blocks: what each
    /// format saves in the built transformer equals, byte for byte, what the planner's figure
    /// drops — FLUX and SD3.5 Medium from their folders (diffusers' names) and from single files
    /// (BFL's fused q/k/v, `linear2` held as two column parts; Stability's `joint_blocks`). The
    /// tiny models' rows take the fallbacks (q4k → q5_0, q6k → q8_0).
    #[test]
    fn quantized_dit_blocks_are_planned_as_they_are_held() {
        let sd35 = ModelDir {
            root: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models/sd35m-tiny"),
            prefer_fp16_variant: false,
        };
        let flux = flux_dir();
        for (dir, file) in [
            (&flux, None),
            (&flux, Some("flux1-dev-tiny-bfl.safetensors")),
            (&sd35, None),
            (&sd35, Some("sd3.5-medium-tiny-sai.safetensors")),
        ] {
            let (dense_held, dense_planned) = dit_bytes(dir, file, "dense");
            for format in ["q8_0", "q8_0-compact", "q4k", "q6k-compact", "fp8"] {
                let (held, planned) = dit_bytes(dir, file, format);
                let model = dir.root.display();
                assert!(
                    held < dense_held * 55 / 100,
                    "{model} {file:?} {format}: {held} of {dense_held}"
                );
                assert_eq!(
                    dense_held - held,
                    dense_planned - planned,
                    "{model} {file:?} {format}: saved as held vs as planned"
                );
            }
        }
    }

    /// A GGUF T5 (llama.cpp's naming; its layers in q8_0 and q4_0, its embedding in f16) is
    /// planned byte for byte as the encoder holds it, in the fastest products and held once.
    #[test]
    fn a_gguf_t5_is_planned_as_it_is_held() {
        use crate::engine::loader::single_file::{
            t5_source, Naming, SingleFileWeights, TransformerFile,
        };
        use crate::engine::loader::weights::StoredDtypes;
        use candle_core::quantized::{gguf_file, QTensor};
        use candle_nn::var_builder::SimpleBackend;
        let dir = flux_dir();
        let file = SafetensorsFile::open_component(&dir, "text_encoder_2/model").unwrap();
        let mut names = file.names();
        names.sort();
        let stored: Vec<(String, QTensor)> = (names.iter().enumerate())
            .map(|(i, name)| {
                let t = file.get_unchecked(name, DType::F32, &Device::Cpu).unwrap();
                let llama = t5_source(name).unwrap();
                let format = match llama.as_str() {
                    "token_embd.weight" => GgmlDType::F16,
                    n if n.starts_with("enc.blk.")
                        && t.rank() == 2
                        && t.dim(1).unwrap() % 32 == 0
                        && !n.contains("attn_rel_b") =>
                    {
                        [GgmlDType::Q8_0, GgmlDType::Q4_0][i % 2]
                    }
                    _ => GgmlDType::F32,
                };
                (llama, QTensor::quantize(&t, format).unwrap())
            })
            .collect();
        let blocks = stored.iter().filter(|(_, q)| q.dtype() != GgmlDType::F32);
        assert!(blocks.count() > 2, "no layer in a block format");
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("t5-encoder.gguf");
        let refs: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let architecture = gguf_file::Value::String("t5encoder".into());
        let mut out = std::fs::File::create(&gguf).unwrap();
        gguf_file::write(&mut out, &[("general.architecture", &architecture)], &refs).unwrap();
        drop(out);
        for format in ["dense", "gguf-compact"] {
            let options = LoadOptions {
                t5_file: Some(gguf.clone()),
                t5_format: format.parse().unwrap(),
                ..Default::default()
            };
            let footprint = Footprint::read(&dir, &Device::Cpu, DType::F32, &options).unwrap();
            let planned = footprint
                .components
                .iter()
                .find(|(c, _)| c == "text_encoder_2");
            let weights = std::sync::Arc::new(
                SingleFileWeights::new(TransformerFile::open(&gguf).unwrap(), Naming::T5).unwrap(),
            );
            let encoder = crate::engine::models::t5::T5Encoder::new(
                weights.var_builder(DType::F32, &Device::Cpu),
                dir.read_json("text_encoder_2/config.json").unwrap(),
                &StoredDtypes::ByName(Default::default()),
                crate::engine::models::quantized::LayerSource {
                    format: options.t5_blocks_format().unwrap(),
                    stored: Some(&*weights),
                },
            )
            .unwrap();
            assert_eq!(
                encoder.weight_bytes() as u64,
                planned.unwrap().1,
                "{format}: held vs planned"
            );
        }
    }

    /// A GGUF transformer's blocks are planned as the model holds them: what the file's formats
    /// save against the dense f32 model, held in the fastest products and held once, equals,
    /// byte for byte, what the planner's figure drops. (The fixture mixes q8_0, q5_0, q4_0,
    /// q4_1, q5_1 and bf16 block layers, with q8_0 and f16 embedders held dense.)
    #[test]
    fn a_gguf_transformer_is_planned_as_its_blocks_are_held() {
        use crate::engine::loader::single_file::Naming;
        use crate::engine::models::flux::FluxTransformer;
        use crate::engine::pipelines::WeightSource;
        let dir = flux_dir();
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let build = |file: &str, format: &str| {
            let options = LoadOptions {
                transformer_file: Some(models.join(file)),
                transformer_format: format.parse().unwrap(),
                ..Default::default()
            };
            let source = WeightSource {
                dir: &dir,
                random: false,
                random_stored: DType::BF16,
            };
            let weights = source
                .transformer(&options, Naming::Bfl, DType::F32, &Device::Cpu)
                .unwrap();
            let config_path = dir.file("transformer/config.json");
            let config = crate::engine::loader::read_json(&config_path).unwrap();
            let transformer =
                FluxTransformer::new(weights.vb.clone(), config, &config_path, weights.layers())
                    .unwrap();
            let footprint = Footprint::read(&dir, &Device::Cpu, DType::F32, &options).unwrap();
            let planned = footprint
                .components
                .iter()
                .find(|(c, _)| c == "transformer");
            (
                transformer.block_layer_bytes() as i64,
                planned.unwrap().1 as i64,
            )
        };
        let (dense_held, dense_planned) = build("flux1-dev-tiny-bfl.safetensors", "dense");
        for format in ["dense", "gguf", "gguf-compact"] {
            let (held, planned) = build("flux1-dev-tiny-mixed.gguf", format);
            assert!(
                held < dense_held * 45 / 100,
                "{format}: {held} of {dense_held}"
            );
            assert_eq!(
                dense_held - held,
                dense_planned - planned,
                "{format}: saved as held vs as planned"
            );
        }
    }

    fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    #[test]
    fn attention_counts_at_most_the_slices_it_holds() {
        let dir = flux_dir();
        let f = Footprint::read(&dir, &Device::Cpu, DType::F16, &LoadOptions::default()).unwrap();
        // The tiny transformer's joint attention scores dominate past 1024²: whole, they would
        // grow 16× from 2048² to 4096²; sliced, what is held grows with the image (4×).
        let (at_2k, at_4k) = (
            f.activation_bytes(1, 2048, 2048, UNGUIDED),
            f.activation_bytes(1, 4096, 4096, UNGUIDED),
        );
        assert!(at_4k <= 4 * at_2k + 1, "{at_2k} → {at_4k}");
        assert!(at_2k > 3 * crate::engine::models::attention::MAX_SCORE_BYTES as u64);
    }

    #[test]
    fn the_cpu_counts_the_winograd_buffer_and_its_half_precision_weights() {
        let dir = sd1_dir();
        let options = LoadOptions::default();
        let f32_cpu = Footprint::read(&dir, &Device::Cpu, DType::F32, &options).unwrap();
        let f16_cpu = Footprint::read(&dir, &Device::Cpu, DType::F16, &options).unwrap();
        let buffer = |f: &Footprint| -> Vec<u64> {
            f.components
                .iter()
                .filter(|(name, _)| name.contains("Winograd"))
                .map(|(_, b)| *b)
                .collect()
        };
        // One buffer, the size of the widest transform among the UNet's and the VAE's 3×3
        // weights with enough input channels (the convolutions hold the weights at their own
        // size, counted with their component).
        let widest = ["unet", "vae"]
            .iter()
            .flat_map(|folder| {
                candle_core::safetensors::load(
                    dir.file(&format!("{folder}/diffusion_pytorch_model.safetensors")),
                    &Device::Cpu,
                )
                .unwrap()
                .into_values()
            })
            .filter_map(|t| match t.dims() {
                &[co, ci, 3, 3] if crate::engine::models::cpu_winograd::worthwhile(ci) => Some(
                    crate::engine::models::cpu_winograd::WinogradWeight::transformed_bytes(co, ci)
                        as u64,
                ),
                _ => None,
            })
            .max()
            .unwrap();
        // The CPU computes in f32 under f16 too.
        assert_eq!(buffer(&f32_cpu), [widest]);
        assert_eq!(buffer(&f16_cpu), [widest]);
        // Under f16 the UNet's and VAE's products' weights and the text encoder's Linear
        // weights and embeddings in f16 (all stored in f32), the rest in f32.
        let loaded = |half: bool| -> u64 {
            [
                "text_encoder/model",
                "unet/diffusion_pytorch_model",
                "vae/diffusion_pytorch_model",
            ]
            .iter()
            .flat_map(|stem| {
                let file = dir.file(&format!("{stem}.safetensors"));
                let text = stem.starts_with("text");
                candle_core::safetensors::load(file, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(move |(name, t)| {
                        let held = half
                            && if text {
                                let held = held_dtype(&name, DType::F16, DType::F32, true);
                                held == DType::F16
                            } else {
                                cpu_holds_in_model_dtype(&name, t.dims())
                            };
                        (t.elem_count() * if held { 2 } else { 4 }) as u64
                    })
            })
            .sum()
        };
        assert_eq!(f32_cpu.weights_bytes(), loaded(false) + widest);
        assert_eq!(f16_cpu.weights_bytes(), loaded(true) + widest);
        assert!(loaded(true) * 10 < loaded(false) * 6);
    }

    #[test]
    fn tiled_vae_decode_is_counted_at_one_tile() {
        let dir = sd1_dir();
        let read = |vae_tiling| {
            let options = LoadOptions {
                vae_tiling,
                ..Default::default()
            };
            Footprint::read(&dir, &Device::Cpu, DType::F16, &options).unwrap()
        };
        let (whole, tiled) = (read(false), read(true));
        // The tiny VAE's tiles are 64 pixels: at 64² nothing changes; at 1024² the tiled
        // decode needs a small fraction.
        assert_eq!(
            whole.vae_decode_bytes(64, 64),
            tiled.vae_decode_bytes(64, 64)
        );
        let (w, t) = (
            whole.vae_decode_bytes(1024, 1024),
            tiled.vae_decode_bytes(1024, 1024),
        );
        assert!(t * 10 < w, "tiled {t} vs whole {w}");
    }
}
