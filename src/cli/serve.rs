//! `candela serve`: flags, with environment fallbacks, over an optional TOML config file.

use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

use super::CommonArgs;
use crate::api::Limits;
use crate::auth::AuthSettings;
use crate::engine::pipelines::LoadOptions;
use crate::engine::{self, demo, loader, loader::ModelSource};
use crate::jobs::{MemoryBudget, ModelSpec};
use crate::server::{self, ServerConfig};

#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "CANDELA_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "CANDELA_HOST")]
    pub host: Option<String>,
    /// 0 picks a free port (printed at start-up).
    #[arg(long, env = "CANDELA_PORT")]
    pub port: Option<u16>,
    /// Models to serve (folder or repo id), repeatable; the first is the default. The embedded demo model when none.
    #[arg(long = "model", env = "CANDELA_MODEL", value_delimiter = ',')]
    pub models: Vec<String>,
    /// SD3 models: leave the T5-XXL text encoder out (saves ~9 GB in f16; prompts lose T5's
    /// part, zeros as in diffusers with `text_encoder_3=None`).
    #[arg(long, env = "CANDELA_WITHOUT_T5")]
    pub without_t5: bool,
    /// SD3 / FLUX: keep the text encoders in system memory and run them on the CPU (f32 products;
    /// weights held as their checkpoints store them, T5-XXL 9.5 GB): the memory budget then
    /// counts only the transformer and the VAE (FLUX-dev: −9.5 GB).
    #[arg(long, env = "CANDELA_TEXT_ENCODERS_ON_CPU")]
    pub text_encoders_on_cpu: bool,
    /// Decode images larger than the VAE's tile (its `sample_size`) in blended tiles, as
    /// diffusers' `vae.enable_tiling()`: the VAE's memory stays that of one tile (SDXL at 2048²
    /// on a 24 GB card); the budget counts it so.
    #[arg(long, env = "CANDELA_VAE_TILING")]
    pub vae_tiling: bool,
    /// CUDA: replay each denoising step as a CUDA graph captured at a loop's first step (one
    /// launch a step in place of ~1 000-2 000; the same kernels on the same values, so the same
    /// images). The graph's pool holds a second copy of the denoiser's activations while a loop
    /// runs; the memory budget counts it. Not yet the default: not yet timed on a GPU.
    #[arg(long, env = "CANDELA_CUDA_GRAPHS")]
    pub cuda_graphs: bool,
    /// Retired (accepted so existing command lines keep working; warns): the CPU's 3×3
    /// convolution weights are always held at their own size now.
    #[arg(long, env = "CANDELA_LOW_MEMORY", hide = true)]
    pub low_memory: bool,
    /// Quantize the transformer blocks on load (fp8, q8_0, q6k, q5k, q4k, q4_0, …): SD3's and
    /// FLUX's, a UNet's attention and feed-forward layers (SDXL on the CPU in q8_0: 7.0 GiB and
    /// 0.73× the f32 step); FLUX-dev in q8_0 or fp8 needs ~12.7 / 12 GB instead of 23.8 GB in
    /// bf16. On the CPU, q8_0,
    /// q6k and q4k run as int8 tiles held once where VNNI exists (AVX-512 or AVX-VNNI); other
    /// blocks are held once (slower than candle's twice-held tiles) where twice would not fit the
    /// memory budget, or when asked: `q6k-compact`.
    #[arg(long, env = "CANDELA_QUANTIZE")]
    pub quantize: Option<String>,
    /// SD3 / FLUX: quantize T5-XXL's Linear layers on load (q8_0, q6k, q4k, …, as `--quantize`):
    /// q8_0 holds it in 5 GB where its checkpoints store 9.5, and runs it on the CPU's int8
    /// tiles where VNNI exists. The prompt's states move by the format's rounding.
    #[arg(long, env = "CANDELA_QUANTIZE_T5")]
    pub quantize_t5: Option<String>,
    #[arg(long, env = "CANDELA_DEVICE")]
    pub device: Option<String>,
    /// f32, f16 or bf16. A GPU computes in it; the CPU holds the models' weights in it and
    /// computes in f32 (f16/bf16: half the weights' memory, f32's speed and results).
    #[arg(long, env = "CANDELA_DTYPE")]
    pub dtype: Option<String>,
    /// HS256 secret file (default: <data-dir>/jwt_secret, created on first start).
    #[arg(long, env = "CANDELA_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key to verify RS256/EdDSA tokens instead of HS256.
    #[arg(long, env = "CANDELA_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// RS256 or EdDSA (with --jwt-public-key).
    #[arg(long, env = "CANDELA_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,
    #[arg(long, env = "CANDELA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    #[arg(long, env = "CANDELA_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Base URL for image links when behind a proxy (default: the listening address).
    #[arg(long, env = "CANDELA_PUBLIC_URL")]
    pub public_url: Option<String>,
    #[arg(long, env = "CANDELA_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    #[arg(long, env = "CANDELA_MAX_SIDE")]
    pub max_side: Option<usize>,
    #[arg(long, env = "CANDELA_URL_TTL_SECS")]
    pub url_ttl_secs: Option<u64>,
    #[arg(long, env = "CANDELA_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    #[arg(long, env = "CANDELA_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Most compatible jobs (same model, size, sampler, steps, guidance) denoised together (1 = no batching; default 4).
    #[arg(long, env = "CANDELA_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Most image rows in one batch (default 8).
    #[arg(long, env = "CANDELA_MAX_BATCH_ROWS")]
    pub max_batch_rows: Option<usize>,
    /// Device memory budget: a fraction of the device's memory (0.9) or a size (12GiB, 500MB, bytes). Default 0.9.
    #[arg(long, env = "CANDELA_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Fail jobs still queued or running after this many seconds (default: no limit).
    #[arg(long, env = "CANDELA_JOB_TIMEOUT_SECS")]
    pub job_timeout_secs: Option<u64>,
    /// Jobs a crash left queued/running: `fail` them (interrupted) or `requeue` them. Default fail.
    #[arg(long, env = "CANDELA_ON_RESTART", value_enum)]
    pub on_restart: Option<server::RestartPolicy>,
    /// Seconds a stopping server lets running jobs finish (default 30).
    #[arg(long, env = "CANDELA_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

/// The same settings as a config file (snake_case keys).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host: Option<String>,
    port: Option<u16>,
    models: Option<Vec<String>>,
    /// `[[model]]` tables: models with load options of their own (instead of `models`).
    model: Option<Vec<ModelTable>>,
    quantize: Option<String>,
    quantize_t5: Option<String>,
    without_t5: Option<bool>,
    text_encoders_on_cpu: Option<bool>,
    vae_tiling: Option<bool>,
    cuda_graphs: Option<bool>,
    device: Option<String>,
    dtype: Option<String>,
    jwt_secret_file: Option<PathBuf>,
    jwt_public_key: Option<PathBuf>,
    jwt_algorithm: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    public_url: Option<String>,
    max_body_bytes: Option<usize>,
    max_side: Option<usize>,
    url_ttl_secs: Option<u64>,
    queue_capacity: Option<usize>,
    http_workers: Option<usize>,
    max_batch: Option<usize>,
    max_batch_rows: Option<usize>,
    memory_budget: Option<String>,
    job_timeout_secs: Option<u64>,
    on_restart: Option<server::RestartPolicy>,
    shutdown_grace_secs: Option<u64>,
    threads: Option<std::num::NonZeroUsize>,
}

/// One `[[model]]` table of the config file: a model (folder or repo id) and the load options
/// it takes instead of the server-wide ones — FLUX quantized beside an SDXL that is not:
///
/// ```toml
/// [[model]]
/// source = "black-forest-labs/FLUX.1-dev"
/// quantize = "q8_0"
/// quantize_t5 = "q8_0"
///
/// [[model]]
/// source = "stabilityai/stable-diffusion-xl-base-1.0"
///
/// # FLUX.1-dev's transformer from a GGUF file, served beside the one above under its own id.
/// [[model]]
/// source = "black-forest-labs/FLUX.1-dev"
/// transformer = "/models/flux1-dev-Q4_K_S.gguf"
/// name = "flux1-dev-q4k"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelTable {
    source: String,
    /// SD3 / FLUX: the transformer from one file (safetensors in any of the namings, or GGUF):
    /// a path, or `owner/name/file[@revision]` on the hub.
    transformer: Option<String>,
    /// SD3 / FLUX: T5 from one file (transformers' naming, or GGUF in llama.cpp's): a path, or
    /// `owner/name/file[@revision]` on the hub.
    t5: Option<String>,
    /// The id clients use (default: the source's name).
    name: Option<String>,
    quantize: Option<String>,
    quantize_t5: Option<String>,
    without_t5: Option<bool>,
    text_encoders_on_cpu: Option<bool>,
    vae_tiling: Option<bool>,
}

impl ModelTable {
    fn spec(&self, server_wide: &LoadOptions) -> anyhow::Result<ModelSpec> {
        let context = || format!("model `{}` in the config file", self.source);
        let format = |arg: &Option<String>, parse: fn(Option<&str>) -> anyhow::Result<_>, or| {
            arg.as_deref()
                .map_or(Ok(or), |f| parse(Some(f)))
                .with_context(context)
        };
        Ok(ModelSpec {
            source: ModelSource::parse(&self.source).with_context(context)?,
            options: LoadOptions {
                transformer_format: format(
                    &self.quantize,
                    super::weight_format,
                    server_wide.transformer_format,
                )?,
                t5_format: format(&self.quantize_t5, super::t5_format, server_wide.t5_format)?,
                without_t5: self.without_t5.unwrap_or(server_wide.without_t5),
                text_encoders_on_cpu: (self.text_encoders_on_cpu)
                    .unwrap_or(server_wide.text_encoders_on_cpu),
                vae_tiling: self.vae_tiling.unwrap_or(server_wide.vae_tiling),
                transformer_file: None,
                t5_file: None,
            },
            name: self.name.clone(),
            t5: (self.t5.as_deref())
                .map(loader::FileSource::parse)
                .transpose()
                .with_context(context)?,
            transformer: (self.transformer.as_deref())
                .map(loader::FileSource::parse)
                .transpose()
                .with_context(context)?,
        })
    }
}

pub fn run(common: &CommonArgs, args: ServeArgs) -> anyhow::Result<()> {
    let file: FileConfig = match &args.config {
        Some(path) => toml::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?,
        None => FileConfig::default(),
    };
    if common.threads.is_none() {
        super::set_cpu_threads(file.threads);
    }
    let device = engine::parse_device(
        args.device
            .as_deref()
            .or(file.device.as_deref())
            .unwrap_or("cpu"),
    )?;
    // Before any model is loaded: the weights are then made without cross-stream events.
    if args.cuda_graphs || file.cuda_graphs.unwrap_or(false) {
        engine::enable_step_graphs(&device)?;
        tracing::info!("denoising steps replayed as CUDA graphs");
    }
    if device.is_cpu() {
        tracing::info!(
            threads = rayon::current_num_threads(),
            "inference on the CPU"
        );
    }
    let dtype = engine::parse_dtype(
        args.dtype
            .as_deref()
            .or(file.dtype.as_deref())
            .unwrap_or("f32"),
    )?;
    super::warn_retired_low_memory(args.low_memory);
    // Flags and environment win over the file; a switch set in either is on.
    let load_options = LoadOptions {
        without_t5: args.without_t5 || file.without_t5.unwrap_or(false),
        transformer_file: None,
        t5_file: None,
        text_encoders_on_cpu: args.text_encoders_on_cpu
            || file.text_encoders_on_cpu.unwrap_or(false),
        transformer_format: super::weight_format(
            args.quantize.as_deref().or(file.quantize.as_deref()),
        )?,
        t5_format: super::t5_format(args.quantize_t5.as_deref().or(file.quantize_t5.as_deref()))?,
        vae_tiling: args.vae_tiling || file.vae_tiling.unwrap_or(false),
    };
    let named = |sources: &[String]| {
        sources
            .iter()
            .map(|s| {
                Ok(ModelSpec {
                    source: ModelSource::parse(s)?,
                    options: load_options.clone(),
                    name: None,
                    transformer: None,
                    t5: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let models = match (&file.models, &file.model) {
        _ if !args.models.is_empty() => named(&args.models)?,
        (Some(_), Some(_)) => anyhow::bail!(
            "the config file lists models twice: use either `models = [...]` or `[[model]]` tables"
        ),
        (Some(sources), None) => named(sources)?,
        (None, Some(tables)) => (tables.iter())
            .map(|t| t.spec(&load_options))
            .collect::<anyhow::Result<_>>()?,
        (None, None) => Vec::new(),
    };
    let models = if models.is_empty() {
        vec![ModelSpec {
            source: ModelSource::Local(demo::install(&common.data_dir.join("models"))?),
            options: load_options.clone(),
            name: None,
            transformer: None,
            t5: None,
        }]
    } else {
        models
    };
    let auth = AuthSettings {
        secret_file: args.jwt_secret_file.or(file.jwt_secret_file),
        public_key: args.jwt_public_key.or(file.jwt_public_key),
        algorithm: args.jwt_algorithm.or(file.jwt_algorithm),
        issuer: args.jwt_issuer.or(file.jwt_issuer),
        audience: args.jwt_audience.or(file.jwt_audience),
    };
    let defaults = Limits::default();
    let limits = Limits {
        max_body_bytes: args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(defaults.max_body_bytes),
        max_side: args.max_side.or(file.max_side).unwrap_or(defaults.max_side),
        url_ttl_secs: args
            .url_ttl_secs
            .or(file.url_ttl_secs)
            .unwrap_or(defaults.url_ttl_secs),
        ..defaults
    };
    let config = ServerConfig {
        host: args
            .host
            .or(file.host)
            .unwrap_or_else(|| "127.0.0.1".into()),
        port: args.port.or(file.port).unwrap_or(8080),
        data_dir: common.data_dir.clone(),
        models,
        device,
        dtype,
        hub: common.hub_options(),
        auth: auth.clone(),
        public_url: args.public_url.or(file.public_url),
        limits,
        queue_capacity: args.queue_capacity.or(file.queue_capacity).unwrap_or(64),
        workers: args.http_workers.or(file.http_workers).unwrap_or(2),
        max_batch_jobs: args.max_batch.or(file.max_batch).unwrap_or(4).max(1),
        max_batch_rows: args
            .max_batch_rows
            .or(file.max_batch_rows)
            .unwrap_or(8)
            .max(1),
        memory_budget: args
            .memory_budget
            .or(file.memory_budget)
            .map(|b| b.parse::<MemoryBudget>())
            .transpose()
            .map_err(anyhow::Error::msg)?
            .unwrap_or(crate::jobs::DEFAULT_MEMORY_BUDGET),
        job_timeout: args
            .job_timeout_secs
            .or(file.job_timeout_secs)
            .map(std::time::Duration::from_secs),
        on_restart: args
            .on_restart
            .or(file.on_restart)
            .unwrap_or(server::RestartPolicy::Fail),
        shutdown_grace: std::time::Duration::from_secs(
            args.shutdown_grace_secs
                .or(file.shutdown_grace_secs)
                .unwrap_or(30),
        ),
    };
    let data_dir = config.data_dir.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let running = server::start(config).await?;
        // These lines are the server's contract with people and tests: keep their shape.
        println!("candela listening on {}", running.url);
        println!("Swagger UI: {}/docs/", running.url);
        println!("Dashboard: {}/", running.url);
        if let Some(token) = server::startup_token(&data_dir, &auth) {
            println!("token (user `local`, 30 days): {token}");
            println!("dashboard with this token: {}/#token={token}", running.url);
            println!("try: curl -s {}/v1/images/generations -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"prompt\":\"a lighthouse\"}}'", running.url);
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        running.serve().await
    })
}
