//! The in-process scheduler between the HTTP layer and the pipelines. The HTTP layer holds a
//! clonable [`EngineHandle`]; pipelines live on a worker thread that owns the device. Jobs wait
//! in a bounded, per-user fair queue ([`queue`]); the worker takes the next job plus compatible
//! ones as one batch, loads its model within the device's memory budget ([`budget`]), reports
//! progress per step and honours cancellation and deadlines between steps.

pub mod budget;
pub mod metrics;
pub mod queue;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use utoipa::ToSchema;

use crate::engine::{
    loader::{self, HubOptions, ModelDir, ModelSource},
    memory::Footprint,
    pipelines::{
        params::{BatchKey, GenerateParams},
        read_card, LoadOptions,
    },
    schedulers::{SamplerKind, SchedulerConfig, SigmaSchedule},
    EngineError, GeneratedImage,
};
use budget::{human_bytes, Residency};
use metrics::Metrics;
use queue::FairQueue;

/// What the API can know about a model without touching candle.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    pub id: String,
    /// `sd1` / `sd2` (epsilon vs v-prediction SD 1.x/2.x-shaped) / `sdxl` / `sdxl_refiner`
    /// (refines pictures only) / `sd3` (SD3 and SD3.5) / `flux` (FLUX.1).
    pub family: String,
    /// A finer name where the family has several: `sd3-medium`, `sd3.5-medium`, `sd3.5-large`,
    /// `sd3.5-large-turbo` (told from Large by "turbo" in the model's name), `flux-dev`,
    /// `flux-schnell`.
    pub variant: String,
    /// What a request that names none gets.
    pub default_sampler: String,
    pub default_steps: usize,
    pub default_guidance_scale: f64,
    pub default_width: usize,
    pub default_height: usize,
    /// Width and height must be multiples of this.
    pub size_multiple: usize,
    pub samplers: Vec<String>,
    /// Every accepted sampler spelling, A1111/ComfyUI names included ("DPM++ 2M Karras").
    pub sampler_aliases: Vec<String>,
    pub schedules: Vec<String>,
    pub prediction_type: String,
    /// Resident weights at the serving dtype (bytes), from the safetensors headers.
    pub weights_bytes: u64,
    /// Estimated working memory of one default-size image with guidance (bytes); see
    /// `engine::memory` for the model behind the estimate.
    pub default_working_bytes: u64,
    /// How the transformer blocks' Linear layers are held (SD3's and FLUX's blocks, a UNet's
    /// attention and feed-forward layers): `dense`, `fp8`, or a GGML block format (`q8_0`,
    /// `q4k`, …; `-compact` where the CPU holds them once to fit), as `--quantize` or the
    /// model's `[[model]]` table asked; `gguf` (`gguf-compact`) for a GGUF transformer file,
    /// whose layers keep the formats it stores.
    #[schema(example = "q8_0")]
    pub transformer_format: String,
    /// T5-XXL's Linear layers likewise (`--quantize-t5`; `dense` for models without T5).
    #[schema(example = "dense")]
    pub t5_format: String,
}

pub struct ModelSpec {
    pub source: ModelSource,
    pub options: LoadOptions,
    /// The id clients name it by; the source's name when `None` (a repo's last part, a
    /// folder's name).
    pub name: Option<String>,
    /// SD3 / FLUX: the transformer from this single file (resolved, downloaded if need be, with
    /// the model; then `options.transformer_file`).
    pub transformer: Option<loader::FileSource>,
    /// SD3 / FLUX: T5 from this single file (resolved with the model; then `options.t5_file`).
    pub t5: Option<loader::FileSource>,
}

/// How the engine runs: device, memory budget, queue and batching limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub device: Device,
    pub dtype: DType,
    pub hub: HubOptions,
    pub queue_capacity: usize,
    /// Most jobs / image rows denoised together in one batch (1 disables batching).
    pub max_batch_jobs: usize,
    pub max_batch_rows: usize,
    pub memory_budget: MemoryBudget,
    /// A job still queued or running after this long fails with `timeout`.
    pub job_timeout: Option<Duration>,
}

/// `serve`'s budget unless told otherwise, and `generate`'s: 90 % of the device's memory.
pub const DEFAULT_MEMORY_BUDGET: MemoryBudget = MemoryBudget::Fraction(0.9);

/// A device memory budget: bytes, or a fraction of the device's total memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MemoryBudget {
    Bytes(u64),
    Fraction(f64),
}

impl std::str::FromStr for MemoryBudget {
    type Err = String;
    /// `0.8` (fraction of total), `12GiB`, `800MB`, `123456` (bytes).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || format!("memory budget `{s}`: use a fraction like 0.8 or a size like 12GiB");
        if let Ok(v) = t.parse::<f64>() {
            if t.contains('.') {
                return if v > 0.0 && v <= 1.0 {
                    Ok(Self::Fraction(v))
                } else {
                    Err(bad())
                };
            }
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(Self::Bytes).ok_or_else(bad)
    }
}

impl MemoryBudget {
    /// Bytes on `device`: a fraction is of the device's total memory (CUDA: the card's; CPU: the
    /// machine's RAM).
    pub fn resolve(self, device: &Device) -> Result<u64, EngineError> {
        match self {
            Self::Bytes(b) => Ok(b),
            Self::Fraction(f) => Ok((device_total_memory(device)? as f64 * f) as u64),
        }
    }
}

/// Total memory of the device the budget is a fraction of.
pub fn device_total_memory(device: &Device) -> Result<u64, EngineError> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        let (_free, total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .map_err(|e| EngineError::Internal(format!("reading CUDA memory: {e:?}")))?;
        return Ok(total as u64);
    }
    let _ = device;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| EngineError::Io {
        path: "/proc/meminfo".into(),
        source: e,
    })?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| EngineError::Internal("cannot read MemTotal from /proc/meminfo".into()))
}

/// One request for the engine.
pub struct JobRequest {
    pub id: String,
    pub user: String,
    /// Admin jobs run before everyone else's.
    pub priority: bool,
    pub model: String,
    pub params: GenerateParams,
}

pub struct GenerateOutput {
    pub images: Vec<GeneratedImage>,
    pub seed: u64,
    pub seconds: f64,
    /// How many jobs shared the denoising run.
    pub batch_size: usize,
}

pub type Outcome = Result<GenerateOutput, EngineError>;

/// A submitted job: its progress events and, at the end, its outcome.
pub struct Ticket {
    pub id: String,
    pub events: broadcast::Receiver<JobEvent>,
    pub outcome: oneshot::Receiver<Outcome>,
}

/// Progress of a job, as streamed on `GET /v1/jobs/{id}/events`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// Waiting; `position` 0 runs next.
    Queued { position: usize },
    /// Its denoising run began, shared with `batch_size - 1` other jobs.
    Started { batch_size: usize },
    Step {
        step: usize,
        total: usize,
        step_seconds: f64,
        eta_seconds: f64,
    },
    /// Terminal: `succeeded`, `failed` or `cancelled`.
    Finished {
        status: String,
        error_code: Option<String>,
        error: Option<String>,
    },
}

/// A live job's state (queued or running).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobProgress {
    /// `queued` or `running`.
    pub state: String,
    pub queue_position: Option<usize>,
    pub step: usize,
    pub total: usize,
    pub step_seconds: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub batch_size: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the generation queue is full")]
    QueueFull,
    #[error("the engine is not running")]
    EngineGone,
    #[error("{message}")]
    TooLarge {
        param: &'static str,
        message: String,
    },
    #[error(transparent)]
    Engine(EngineError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was waiting and will not run.
    Dequeued,
    /// It is running and stops at the next step.
    Stopping,
    /// The engine does not hold it (finished, or never submitted).
    NotLive,
}

/// What queued jobs are grouped by: same model and the same batch key.
#[derive(Debug, Clone, PartialEq)]
struct QueueKey {
    model: String,
    batch: BatchKey,
}

struct Pending {
    params: GenerateParams,
    reply: oneshot::Sender<Outcome>,
}

struct Live {
    progress: JobProgress,
    events: broadcast::Sender<JobEvent>,
    cancel: bool,
    /// Stopped because the server is shutting down (reported as such, not as cancelled).
    shutdown: bool,
    deadline: Option<Instant>,
}

struct State {
    queue: FairQueue<Pending, QueueKey>,
    live: HashMap<String, Live>,
    residency: Residency,
    paused: bool,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    metrics: Metrics,
    config: EngineConfig,
    device_label: String,
}

impl Shared {
    /// The state lock; a worker panic while holding it leaves data that is still consistent
    /// (every update is a single assignment), so a poisoned lock is taken over.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registered model: where it lives and what it needs.
#[derive(Clone)]
struct Catalogued {
    info: ModelInfo,
    dir: ModelDir,
    footprint: Footprint,
    options: LoadOptions,
}

/// Clonable handle to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    models: Arc<Vec<Catalogued>>,
}

impl EngineHandle {
    /// Resolve (download if needed) every model, read what each needs, and preload those that
    /// fit the budget (in order) on the worker thread; returns once that is done, so the server
    /// only listens when it can serve. Models that do not fit together load on demand.
    pub async fn start(specs: Vec<ModelSpec>, config: EngineConfig) -> Result<Self, EngineError> {
        let budget = config.memory_budget.resolve(&config.device)?;
        let device_label = device_label(&config.device);
        let mut catalog = Vec::new();
        for spec in specs {
            let name = (spec.name.clone()).unwrap_or_else(|| loader::display_name(&spec.source));
            if catalog.iter().any(|c: &Catalogued| c.info.id == name) {
                return Err(EngineError::Unsupported(format!(
                    "two models are named `{name}`: give one of them a `name` of its own in the config file"
                )));
            }
            let (dir, transformer_file, t5_file) = {
                let (source, dtype, hub) = (spec.source.clone(), config.dtype, config.hub.clone());
                let (transformer, t5) = (spec.transformer.clone(), spec.t5.clone());
                tokio::task::spawn_blocking(move || {
                    let file = |f: Option<loader::FileSource>| {
                        f.map(|f| loader::resolve_file(&f, &hub)).transpose()
                    };
                    let (transformer, t5) = (file(transformer)?, file(t5)?);
                    Ok::<_, EngineError>((loader::resolve(&source, dtype, &hub)?, transformer, t5))
                })
                .await
                .map_err(|e| EngineError::Internal(format!("model resolution: {e}")))??
            };
            let spec_options = LoadOptions {
                transformer_file: transformer_file.or(spec.options.transformer_file.clone()),
                t5_file: t5_file.or(spec.options.t5_file.clone()),
                ..spec.options.clone()
            };
            let (options, footprint) =
                Footprint::read_fitted(&dir, &config.device, config.dtype, &spec_options, budget)?;
            let info = describe(&name, &dir, &footprint, &options)?;
            let need = footprint.default_need(info.default_width);
            if need > budget {
                warn_does_not_fit(&name, &dir, &config, &spec_options, [need, budget])?;
            }
            catalog.push(Catalogued {
                info,
                dir,
                footprint,
                options,
            });
        }
        let metrics = Metrics::default();
        metrics
            .memory_budget_bytes
            .get_or_create(&metrics::labels(&[("device", &device_label)]))
            .set(budget);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: FairQueue::new(config.queue_capacity),
                live: HashMap::new(),
                residency: Residency::new(budget),
                paused: false,
                stopping: false,
            }),
            wake: Condvar::new(),
            metrics,
            config,
            device_label,
        });
        let models = Arc::new(catalog);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), EngineError>>();
        worker::spawn(shared.clone(), models.clone(), ready_tx)?;
        ready_rx.await.map_err(|_| {
            EngineError::Internal("the engine thread stopped while loading".into())
        })??;
        Ok(Self { shared, models })
    }

    pub fn models(&self) -> Vec<&ModelInfo> {
        self.models.iter().map(|m| &m.info).collect()
    }

    pub fn model(&self, id: &str) -> Option<&ModelInfo> {
        self.models
            .iter()
            .find(|m| m.info.id == id)
            .map(|m| &m.info)
    }

    pub fn default_model(&self) -> Option<&ModelInfo> {
        self.models.first().map(|m| &m.info)
    }

    /// Models resident on the device now, least recently used first.
    pub fn loaded_models(&self) -> Vec<String> {
        self.shared.lock().residency.models()
    }

    /// Queue a job. Refused at once when it can never fit the device, when the queue is full
    /// (retry later) or when the engine is shutting down.
    pub fn submit(&self, req: JobRequest) -> Result<Ticket, SubmitError> {
        let model = self
            .models
            .iter()
            .find(|m| m.info.id == req.model)
            .ok_or_else(|| SubmitError::Engine(EngineError::ModelNotFound(req.model.clone())))?;
        let p = &req.params;
        let activation = model
            .footprint
            .activation_bytes(p.n, p.width, p.height, p.guidance());
        // A two-stage job keeps its refiner resident next to the base.
        let refiner_bytes = match &p.refiner {
            Some(r) => self
                .models
                .iter()
                .find(|m| m.info.id == r.model)
                .map(|m| m.footprint.weights_bytes())
                .ok_or_else(|| SubmitError::Engine(EngineError::ModelNotFound(r.model.clone())))?,
            None => 0,
        };
        let mut state = self.shared.lock();
        if state.stopping {
            return Err(SubmitError::Engine(EngineError::ShuttingDown));
        }
        let weights = model.footprint.weights_bytes() + refiner_bytes;
        if let Err(e) = state.residency.admit(weights, activation) {
            let budget = state.residency.budget();
            // No size helps a model whose weights alone exceed the budget.
            return Err(if weights > budget {
                SubmitError::TooLarge {
                    param: "model",
                    message: format!(
                        "model `{}` does not fit this server's memory budget at any size: its weights need {} of {}; it would have to be served quantized",
                        req.model,
                        human_bytes(weights),
                        human_bytes(budget)
                    ),
                }
            } else {
                SubmitError::TooLarge {
                    param: if p.n > 1 { "n" } else { "size" },
                    message: format!(
                        "a {}x{} image{} with model `{}` {e}; ask for a smaller size or fewer images",
                        p.width,
                        p.height,
                        if p.n > 1 { "s" } else { "" },
                        req.model
                    ),
                }
            });
        }
        let (events, events_rx) = broadcast::channel(256);
        let (reply, outcome) = oneshot::channel();
        let entry = queue::Entry {
            id: req.id.clone(),
            user: req.user,
            priority: req.priority,
            batch_key: QueueKey {
                model: req.model,
                batch: p.batch_key(),
            },
            rows: p.n,
            item: Pending {
                params: req.params,
                reply,
            },
        };
        if state.queue.push(entry).is_err() {
            return Err(SubmitError::QueueFull);
        }
        let deadline = self.shared.config.job_timeout.map(|t| Instant::now() + t);
        state.live.insert(
            req.id.clone(),
            Live {
                progress: JobProgress {
                    state: "queued".into(),
                    queue_position: None,
                    step: 0,
                    total: 0,
                    step_seconds: None,
                    eta_seconds: None,
                    batch_size: None,
                },
                events,
                cancel: false,
                shutdown: false,
                deadline,
            },
        );
        announce_positions(&mut state);
        self.shared
            .metrics
            .queue_depth
            .set(state.queue.len() as i64);
        drop(state);
        self.shared.wake.notify_all();
        Ok(Ticket {
            id: req.id,
            events: events_rx,
            outcome,
        })
    }

    /// Cancel a queued job (it never runs) or stop a running one at its next step.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let mut state = self.shared.lock();
        if let Some(entry) = state.queue.remove(id) {
            let _ = entry.item.reply.send(Err(EngineError::Cancelled));
            announce_positions(&mut state);
            self.shared
                .metrics
                .queue_depth
                .set(state.queue.len() as i64);
            return CancelOutcome::Dequeued;
        }
        match state.live.get_mut(id) {
            Some(live) => {
                live.cancel = true;
                CancelOutcome::Stopping
            }
            None => CancelOutcome::NotLive,
        }
    }

    /// The live state and event stream of a queued or running job.
    pub fn watch(&self, id: &str) -> Option<(JobProgress, broadcast::Receiver<JobEvent>)> {
        let state = self.shared.lock();
        state
            .live
            .get(id)
            .map(|l| (l.progress.clone(), l.events.subscribe()))
    }

    pub fn progress(&self, id: &str) -> Option<JobProgress> {
        self.shared.lock().live.get(id).map(|l| l.progress.clone())
    }

    /// The job's outcome has been recorded: tell its watchers and forget it.
    pub fn finish(&self, id: &str, status: &str, error_code: Option<&str>, error: Option<&str>) {
        let mut state = self.shared.lock();
        if let Some(live) = state.live.remove(id) {
            let _ = live.events.send(JobEvent::Finished {
                status: status.to_string(),
                error_code: error_code.map(str::to_string),
                error: error.map(str::to_string),
            });
        }
        self.shared
            .metrics
            .jobs_finished
            .get_or_create(&metrics::labels(&[("status", status)]))
            .inc();
    }

    /// Hold queued jobs (running ones finish); for maintenance and for tests that need a
    /// deterministic queue.
    pub fn pause(&self) {
        self.shared.lock().paused = true;
    }

    pub fn resume(&self) {
        self.shared.lock().paused = false;
        self.shared.wake.notify_all();
    }

    pub fn queue_ids(&self) -> Vec<String> {
        self.shared.lock().queue.ids()
    }

    /// Stop taking jobs: queued ones fail with `shutting_down`; running ones get `grace` to
    /// finish, then are stopped at their next step.
    pub async fn shutdown(&self, grace: Duration) {
        {
            let mut state = self.shared.lock();
            state.stopping = true;
            let queued = state.queue.drain_where(|_| true);
            for entry in queued {
                let _ = entry.item.reply.send(Err(EngineError::ShuttingDown));
            }
            self.shared.metrics.queue_depth.set(0);
        }
        self.shared.wake.notify_all();
        let deadline = Instant::now() + grace;
        loop {
            // Live entries leave once their outcome is recorded.
            if self.shared.lock().live.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let mut state = self.shared.lock();
                for live in state.live.values_mut() {
                    live.cancel = true;
                    live.shutdown = true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if Instant::now() >= deadline + Duration::from_secs(30) {
                tracing::error!("running jobs did not stop after shutdown; giving up waiting");
                return;
            }
        }
    }

    pub fn metrics_text(&self) -> String {
        {
            let state = self.shared.lock();
            self.shared
                .metrics
                .memory_used_bytes
                .get_or_create(&metrics::labels(&[("device", &self.shared.device_label)]))
                .set(state.residency.used());
        }
        self.shared.metrics.render()
    }
}

/// Tell every queued job its place after the queue changed.
fn announce_positions(state: &mut State) {
    let ids = state.queue.ids();
    for (position, id) in ids.iter().enumerate() {
        if let Some(live) = state.live.get_mut(id) {
            if live.progress.queue_position != Some(position) {
                live.progress.queue_position = Some(position);
                let _ = live.events.send(JobEvent::Queued { position });
            }
        }
    }
}

fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => format!("cuda:{:?}", device.location()),
        Device::Metal(_) => "metal".into(),
    }
}

/// The operator's warning that a model as asked does not fit the memory budget with a
/// default-size image (its jobs will be refused), with [`fit_advice`].
fn warn_does_not_fit(
    name: &str,
    dir: &ModelDir,
    config: &EngineConfig,
    options: &crate::engine::pipelines::LoadOptions,
    [need, budget]: [u64; 2],
) -> Result<(), EngineError> {
    let advice = fit_advice(dir, &config.device, config.dtype, options, budget)?;
    tracing::warn!(
        model = %name,
        need = %human_bytes(need),
        budget = %human_bytes(budget),
        "model does not fit the memory budget with a default-size image, so its jobs at that size will be refused; {advice}"
    );
    Ok(())
}

/// For a model that does not fit `budget` with a default-size image as `options` load it: the
/// fewest load flags (`serve`'s and `generate`'s), least costly first, that make it fit, and
/// what it would then need ([`Footprint::shrink_to_fit`]).
pub fn fit_advice(
    dir: &ModelDir,
    device: &Device,
    dtype: DType,
    options: &crate::engine::pipelines::LoadOptions,
    budget: u64,
) -> Result<String, EngineError> {
    Ok(
        match Footprint::shrink_to_fit(dir, device, dtype, options, budget)? {
            Some((steps, fits)) => format!(
                "load it with {} to need {}",
                steps
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                human_bytes(fits)
            ),
            None => "no quantization or half-precision weights make it fit: raise the memory budget or use a larger device"
                .into(),
        },
    )
}

/// A model's capabilities from its configs (no weights loaded).
fn describe(
    name: &str,
    dir: &ModelDir,
    footprint: &Footprint,
    options: &LoadOptions,
) -> Result<ModelInfo, EngineError> {
    let scheduler: SchedulerConfig = dir.read_json("scheduler/scheduler_config.json")?;
    scheduler.check()?;
    let card = read_card(dir, name)?;
    let default_size = card.default_size;
    let flow = card.family.is_flow();
    Ok(ModelInfo {
        id: name.to_string(),
        family: card.family.name().into(),
        variant: card.variant.clone(),
        default_sampler: card.default_sampler.name().into(),
        default_steps: card.default_steps,
        default_guidance_scale: card.default_guidance,
        default_width: default_size,
        default_height: default_size,
        size_multiple: card.size_multiple,
        samplers: SamplerKind::ALL
            .iter()
            .filter(|k| k.is_flow() == flow)
            .map(|k| k.name().to_string())
            .collect(),
        sampler_aliases: SamplerKind::accepted_names(),
        schedules: SigmaSchedule::ALL
            .iter()
            .map(|s| s.name().to_string())
            .collect(),
        prediction_type: if flow {
            "flow".into()
        } else {
            serde_json::to_value(scheduler.prediction_type())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        },
        weights_bytes: footprint.weights_bytes(),
        default_working_bytes: footprint.activation_bytes(
            1,
            default_size,
            default_size,
            crate::engine::pipelines::params::Guidance::DEFAULT,
        ),
        transformer_format: options.transformer_blocks_format()?.to_string(),
        t5_format: options.t5_blocks_format()?.to_string(),
    })
}
