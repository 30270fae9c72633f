use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
    pub models: Vec<String>,
}

/// Liveness and readiness: answers once every configured model is loaded.
#[utoipa::path(get, path = "/health", tag = "service", responses((status = 200, body = Health)))]
#[get("/health")]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        models: state.engine.models().iter().map(|m| m.id.clone()).collect(),
    })
}
