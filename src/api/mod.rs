//! HTTP layer (actix-web). It never touches candle: it validates requests, records jobs and talks
//! to the engine through the clonable [`EngineHandle`].

pub mod edits;
pub mod error;
mod files;
mod health;
pub mod images;
mod jobs;
mod models;
mod openapi;
mod web_ui;

use std::sync::Arc;

use actix_web::{dev::Payload, web, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::{ready, Ready};
use futures_util::StreamExt;

pub use error::ApiError;
pub use openapi::{spec_json as openapi_json, ApiDoc};

use crate::auth::{AuthError, Principal, Verifier};
use crate::db::Db;
use crate::jobs::EngineHandle;
use crate::storage::{LinkSigner, Store};

/// Request limits enforced at the API boundary.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Multipart uploads (edits, variations).
    pub max_upload_bytes: usize,
    pub max_n: usize,
    pub max_side: usize,
    pub max_steps: usize,
    pub url_ttl_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_upload_bytes: 25 << 20,
            max_n: 10,
            max_side: 2048,
            max_steps: 150,
            url_ttl_secs: 3600,
        }
    }
}

pub struct AppState {
    pub engine: EngineHandle,
    pub db: Db,
    pub store: Arc<dyn Store>,
    pub links: LinkSigner,
    pub verifier: Verifier,
    /// Base for absolute image URLs, e.g. `http://127.0.0.1:8080`.
    pub public_url: String,
    pub limits: Limits,
    /// The server's main runtime. Job runners are spawned here, not on the HTTP worker that
    /// took the request: those stop with the HTTP server, and a job must still be recorded
    /// while a stopping server drains.
    pub runtime: tokio::runtime::Handle,
}

/// The id of the current request (from `X-Request-Id` or generated), set by the middleware.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The verified caller; extracting it fails with 401 when the bearer token is absent or bad.
pub struct Caller(pub Principal);

impl Caller {
    pub fn require(&self, scope: &'static str) -> Result<(), ApiError> {
        if self.0.has(scope) {
            Ok(())
        } else {
            Err(AuthError::MissingScope(scope).into())
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req).map(Caller))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Principal, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("application state missing"))?;
    let header = req
        .headers()
        .get("Authorization")
        .and_then(|h| h.to_str().ok())
        .ok_or(AuthError::Missing)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    Ok(state.verifier.verify(token)?)
}

pub fn request_id(req: &HttpRequest) -> Option<String> {
    req.extensions().get::<RequestId>().map(|r| r.0.clone())
}

/// Read the body up to the configured limit; too large is a 413 in OpenAI's error shape.
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid("body", format!("could not read the request body: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("request body exceeds {limit} bytes"),
            )
            .with_param("body"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parse JSON naming the offending field in `param` (serde_path_to_error gives its path).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let param = if let Some(rest) = message.strip_prefix("unknown field `") {
            rest.split('`').next().unwrap_or("body").to_string()
        } else if let Some(rest) = message.strip_prefix("missing field `") {
            rest.split('`').next().unwrap_or("body").to_string()
        } else if inner.is_syntax() || inner.is_eof() || path == "." {
            "body".to_string()
        } else {
            path
        };
        let code = if inner.is_syntax() || inner.is_eof() {
            "invalid_json"
        } else {
            "invalid_value"
        };
        ApiError::new(
            actix_web::http::StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            format!("invalid request: {message}"),
        )
        .with_param(param)
    })
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(images::generate)
        .service(edits::edits)
        .service(edits::variations)
        .service(models::list)
        .service(models::get)
        .service(jobs::list)
        .service(jobs::get)
        .service(jobs::cancel)
        .service(jobs::events)
        .service(jobs::pause)
        .service(jobs::resume)
        .service(jobs::metrics)
        .service(jobs::image)
        .service(files::image)
        .service(health::health)
        .configure(openapi::configure)
        .configure(web_ui::configure);
}
