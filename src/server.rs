//! `candela serve`: wire the engine, database, store and auth into the actix app.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{dev::Service, web, App, HttpMessage, HttpServer};
use anyhow::Context;
use candle_core::{DType, Device};

use crate::api::{self, AppState, Limits, RequestId};
use crate::auth::{self, AuthSettings, Verifier};
use crate::db::Db;
use crate::engine::loader::HubOptions;
use crate::jobs::{EngineConfig, EngineHandle, MemoryBudget, ModelSpec};
use crate::storage::{self, FsStore, LinkSigner};

pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub models: Vec<ModelSpec>,
    pub device: Device,
    pub dtype: DType,
    pub hub: HubOptions,
    pub auth: AuthSettings,
    pub public_url: Option<String>,
    pub limits: Limits,
    pub queue_capacity: usize,
    pub workers: usize,
    pub max_batch_jobs: usize,
    pub max_batch_rows: usize,
    pub memory_budget: MemoryBudget,
    pub job_timeout: Option<Duration>,
    pub on_restart: RestartPolicy,
    /// How long a stopping server lets running jobs finish.
    pub shutdown_grace: Duration,
}

/// What to do at start-up with jobs a crash or kill left queued or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Mark them failed with `interrupted`.
    Fail,
    /// Run them again (same request, same seed if one was given).
    Requeue,
}

pub struct Running {
    pub server: actix_web::dev::Server,
    pub url: String,
    pub engine: EngineHandle,
    pub shutdown_grace: Duration,
}

impl Running {
    /// Serve until SIGINT/SIGTERM, then stop gracefully: no new requests, queued jobs fail
    /// with `shutting_down`, running ones get the grace period, and every outcome is recorded.
    pub async fn serve(self) -> anyhow::Result<()> {
        self.server.await?;
        tracing::info!("stopping: failing queued jobs, letting running ones finish");
        self.engine.shutdown(self.shutdown_grace).await;
        Ok(())
    }
}

/// Build everything and bind; returns the server future and the URL it answers on.
pub async fn start(config: ServerConfig) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let db = Db::open(&config.data_dir.join("candela.db"))
        .await
        .context("opening the job database")?;
    let unfinished = match config.on_restart {
        RestartPolicy::Fail => {
            let interrupted = db.fail_interrupted().await?;
            if interrupted > 0 {
                tracing::warn!(
                    jobs = interrupted,
                    "marked jobs left unfinished by the previous run as failed (interrupted)"
                );
            }
            Vec::new()
        }
        RestartPolicy::Requeue => db.requeue_interrupted().await?,
    };
    let verifier = Verifier::new(&config.auth, &config.data_dir)?;
    let links = LinkSigner::new(storage::load_or_create_link_secret(&config.data_dir)?);
    let store = Arc::new(FsStore::new(config.data_dir.join("images")));
    let engine = EngineHandle::start(
        config.models,
        EngineConfig {
            device: config.device,
            dtype: config.dtype,
            hub: config.hub,
            queue_capacity: config.queue_capacity,
            max_batch_jobs: config.max_batch_jobs,
            max_batch_rows: config.max_batch_rows,
            memory_budget: config.memory_budget,
            job_timeout: config.job_timeout,
        },
    )
    .await?;

    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let url = format!(
        "http://{}:{}",
        if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        },
        addr.port()
    );
    let public_url = config
        .public_url
        .unwrap_or_else(|| url.clone())
        .trim_end_matches('/')
        .to_string();
    let state = web::Data::new(AppState {
        engine: engine.clone(),
        db,
        store,
        links,
        verifier,
        public_url,
        limits: config.limits,
        runtime: tokio::runtime::Handle::current(),
    });
    requeue(&state, unfinished).await;

    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap_fn(|req, srv| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
                    .map(str::to_string)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                req.extensions_mut().insert(RequestId(id.clone()));
                let (method, path) = (req.method().to_string(), req.path().to_string());
                let started = std::time::Instant::now();
                let fut = srv.call(req);
                async move {
                    let mut res = fut.await?;
                    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&id) {
                        res.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-request-id"), value);
                    }
                    tracing::info!(request_id = %id, %method, %path, status = res.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
                    Ok(res)
                }
            })
            .configure(api::configure)
    })
    .workers(config.workers.max(1))
    .shutdown_timeout(config.shutdown_grace.as_secs().max(1))
    .listen(listener)?
    .run();
    Ok(Running {
        server,
        url,
        engine,
        shutdown_grace: config.shutdown_grace,
    })
}

/// Put jobs a previous run left unfinished back in the queue, oldest first; one that no longer
/// validates (model gone, limits changed) is failed with the reason.
async fn requeue(state: &web::Data<AppState>, jobs: Vec<crate::db::Unfinished>) {
    for job in jobs {
        let parsed: Result<api::images::ImageGenerationRequest, _> =
            serde_json::from_value(api::edits::request_part(&job.params));
        let submitted = match parsed {
            Ok(req) => match api::edits::stored_picture(state, &job.params) {
                Ok(init) => api::images::submit(
                    state,
                    &req,
                    init.as_ref(),
                    &job.model,
                    &job.id,
                    &job.user,
                    job.priority,
                )
                .map(|_| ()),
                Err(e) => Err(e),
            },
            Err(e) => Err(api::ApiError::invalid(
                "body",
                format!("the stored request no longer parses: {e}"),
            )),
        };
        match submitted {
            Ok(()) => {
                tracing::info!(job = %job.id, "re-queued a job left unfinished by the previous run")
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e.body.message, "could not re-queue");
                if let Err(db) = state.db.mark_failed(&job.id, "interrupted", &format!("the server stopped before this job finished, and re-queueing failed: {}", e.body.message)).await {
                    tracing::error!(job = %job.id, error = %db, "could not record the failure");
                }
            }
        }
    }
}

/// A token for the person who just started the server (printed once at start-up).
pub fn startup_token(data_dir: &std::path::Path, settings: &AuthSettings) -> Option<String> {
    if settings.public_key.is_some() {
        return None;
    }
    let path = settings
        .secret_file
        .clone()
        .unwrap_or_else(|| auth::default_secret_path(data_dir));
    let secret = auth::load_or_create_secret(&path).ok()?;
    auth::create_token(
        &auth::SigningKey::hs256(&secret),
        "local",
        &[
            auth::SCOPE_GENERATE.to_string(),
            auth::SCOPE_JOBS_READ.to_string(),
        ],
        30 * 86400,
        settings.issuer.as_deref(),
        settings.audience.as_deref(),
    )
    .ok()
}
