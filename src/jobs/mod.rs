//! The bridge between the HTTP layer and the engine. Pipelines live on one worker thread that
//! owns the device; the HTTP layer holds a clonable [`EngineHandle`] and sends it commands.
//! (Queueing policy, batching and VRAM budgets grow here; see the scheduler issue.)

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use utoipa::ToSchema;

use crate::engine::{
    loader::{self, HubOptions, ModelSource},
    pipelines::sd::{GenerateParams, StableDiffusion},
    schedulers::{PredictionType, SamplerKind, SigmaSchedule},
    EngineError, GeneratedImage,
};

/// What the API can know about a model without touching candle.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    pub id: String,
    /// `sd1` / `sd2` (epsilon vs v-prediction SD 1.x/2.x-shaped).
    pub family: String,
    pub default_width: usize,
    pub default_height: usize,
    /// Width and height must be multiples of this.
    pub size_multiple: usize,
    pub samplers: Vec<String>,
    /// Every accepted sampler spelling, A1111/ComfyUI names included ("DPM++ 2M Karras").
    pub sampler_aliases: Vec<String>,
    pub schedules: Vec<String>,
    pub prediction_type: String,
}

pub struct GenerateJob {
    pub model: String,
    pub params: GenerateParams,
}

pub struct GenerateOutput {
    pub images: Vec<GeneratedImage>,
    pub seed: u64,
    pub seconds: f64,
}

enum Command {
    Generate {
        job: GenerateJob,
        reply: oneshot::Sender<Result<GenerateOutput, EngineError>>,
    },
}

/// Clonable handle to the engine worker.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    models: Arc<Vec<ModelInfo>>,
}

pub struct ModelSpec {
    pub source: ModelSource,
}

impl EngineHandle {
    /// Resolve (download if needed) and load every model on a dedicated thread; returns once all
    /// are loaded, so the server only starts listening when it can serve.
    pub async fn start(
        specs: Vec<ModelSpec>,
        device: Device,
        dtype: DType,
        hub: HubOptions,
        queue_capacity: usize,
    ) -> Result<Self, EngineError> {
        let (tx, mut rx) = mpsc::channel::<Command>(queue_capacity.max(1));
        let (ready_tx, ready_rx) = oneshot::channel::<Result<Vec<ModelInfo>, EngineError>>();
        std::thread::Builder::new()
            .name("candela-engine".into())
            .spawn(move || {
                let mut pipelines: HashMap<String, StableDiffusion> = HashMap::new();
                let mut infos = Vec::new();
                for spec in specs {
                    let name = loader::display_name(&spec.source);
                    let loaded = loader::resolve(&spec.source, dtype, &hub)
                        .and_then(|dir| StableDiffusion::load(&dir, &device, dtype));
                    match loaded {
                        Ok(p) => {
                            tracing::info!(model = %name, "model loaded");
                            infos.push(model_info(&name, &p));
                            pipelines.insert(name, p);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                if ready_tx.send(Ok(infos)).is_err() {
                    return;
                }
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Generate { job, reply } => {
                            // A panic inside candle must fail this job, not kill the worker for all.
                            let result =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    run_job(&pipelines, job)
                                }))
                                .unwrap_or_else(|panic| {
                                    let what = panic
                                        .downcast_ref::<String>()
                                        .map(String::as_str)
                                        .or_else(|| panic.downcast_ref::<&str>().copied())
                                        .unwrap_or("unknown panic");
                                    tracing::error!(
                                        panic = what,
                                        "generation panicked; the engine keeps running"
                                    );
                                    Err(EngineError::Unsupported(format!(
                                        "internal error during generation: {what}"
                                    )))
                                });
                            let _ = reply.send(result);
                        }
                    }
                }
            })
            .map_err(|e| {
                EngineError::Unsupported(format!("cannot start the engine thread: {e}"))
            })?;
        let models = ready_rx.await.map_err(|_| {
            EngineError::Unsupported("the engine thread stopped while loading".into())
        })??;
        Ok(Self {
            tx,
            models: Arc::new(models),
        })
    }

    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    pub fn model(&self, id: &str) -> Option<&ModelInfo> {
        self.models.iter().find(|m| m.id == id)
    }

    pub fn default_model(&self) -> Option<&ModelInfo> {
        self.models.first()
    }

    /// Run one generation; errors if the engine is gone or the queue is full.
    pub async fn generate(&self, job: GenerateJob) -> Result<GenerateOutput, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Command::Generate { job, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SubmitError::EngineGone,
            })?;
        rx.await
            .map_err(|_| SubmitError::EngineGone)?
            .map_err(SubmitError::Engine)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the generation queue is full")]
    QueueFull,
    #[error("the engine is not running")]
    EngineGone,
    #[error(transparent)]
    Engine(EngineError),
}

fn model_info(name: &str, p: &StableDiffusion) -> ModelInfo {
    let prediction = p.prediction_type();
    ModelInfo {
        id: name.to_string(),
        family: match prediction {
            PredictionType::VPrediction => "sd2".into(),
            _ => "sd1".into(),
        },
        default_width: p.default_size(),
        default_height: p.default_size(),
        size_multiple: p.vae_scale(),
        samplers: SamplerKind::ALL
            .iter()
            .map(|k| k.name().to_string())
            .collect(),
        sampler_aliases: SamplerKind::accepted_names(),
        schedules: SigmaSchedule::ALL
            .iter()
            .map(|s| s.name().to_string())
            .collect(),
        prediction_type: serde_json::to_value(prediction)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    }
}

fn run_job(
    pipelines: &HashMap<String, StableDiffusion>,
    job: GenerateJob,
) -> Result<GenerateOutput, EngineError> {
    let pipeline = pipelines
        .get(&job.model)
        .ok_or_else(|| EngineError::ModelNotFound(job.model.clone()))?;
    let started = std::time::Instant::now();
    let mut last_log = std::time::Instant::now();
    let out = pipeline.generate(&job.params, &mut |p| {
        if p.step == p.total || last_log.elapsed().as_secs_f64() >= 2.0 {
            tracing::info!(model = %job.model, step = p.step, total = p.total, steps_per_s = format!("{:.2}", p.steps_per_second()), "denoising");
            last_log = std::time::Instant::now();
        }
        true
    })?;
    Ok(GenerateOutput {
        images: out.images,
        seed: job.params.seed,
        seconds: started.elapsed().as_secs_f64(),
    })
}
