//! `candela serve`: wire the engine, database, store and auth into the actix app.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use actix_web::{dev::Service, web, App, HttpMessage, HttpServer};
use anyhow::Context;
use candle_core::{DType, Device};

use crate::api::{self, AppState, Limits, RequestId};
use crate::auth::{self, AuthSettings, Verifier};
use crate::db::Db;
use crate::engine::loader::HubOptions;
use crate::jobs::{EngineHandle, ModelSpec};
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
}

pub struct Running {
    pub server: actix_web::dev::Server,
    pub url: String,
}

/// Build everything and bind; returns the server future and the URL it answers on.
pub async fn start(config: ServerConfig) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let db = Db::open(&config.data_dir.join("candela.db"))
        .await
        .context("opening the job database")?;
    let interrupted = db.fail_interrupted().await?;
    if interrupted > 0 {
        tracing::warn!(
            jobs = interrupted,
            "marked jobs left unfinished by the previous run as failed (interrupted)"
        );
    }
    let verifier = Verifier::new(&config.auth, &config.data_dir)?;
    let links = LinkSigner::new(storage::load_or_create_link_secret(&config.data_dir)?);
    let store = Arc::new(FsStore::new(config.data_dir.join("images")));
    let engine = EngineHandle::start(
        config.models,
        config.device,
        config.dtype,
        config.hub,
        config.queue_capacity,
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
        engine,
        db,
        store,
        links,
        verifier,
        public_url,
        limits: config.limits,
    });

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
    .listen(listener)?
    .run();
    Ok(Running { server, url })
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
