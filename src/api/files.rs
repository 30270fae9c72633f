use actix_web::{get, http::StatusCode, web, HttpResponse};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, AppState};
use crate::db::now_ms;

#[derive(Deserialize, IntoParams)]
pub struct LinkQuery {
    pub expires: u64,
    pub sig: String,
}

/// A signed, expiring image link as returned with `response_format=url` (no bearer token needed).
#[utoipa::path(get, path = "/v1/files/images/{key}", tag = "images",
    params(("key" = String, Path), LinkQuery),
    responses((status = 200, description = "image bytes"), (status = 403, body = super::error::ErrorResponse)))]
#[get("/v1/files/images/{key}")]
pub async fn image(
    state: web::Data<AppState>,
    path: web::Path<String>,
    q: web::Query<LinkQuery>,
) -> Result<HttpResponse, ApiError> {
    let key = path.into_inner();
    let now = (now_ms() / 1000) as u64;
    if !state.links.verify(&key, q.expires, &q.sig, now) {
        let code = if q.expires < now {
            "link_expired"
        } else {
            "invalid_signature"
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            code,
            "this image link is invalid or has expired",
        ));
    }
    let bytes = state
        .store
        .get(&key)?
        .ok_or_else(|| ApiError::not_found("image_not_found", "the image is no longer stored"))?;
    let ext = key.rsplit('.').next().unwrap_or("png");
    Ok(HttpResponse::Ok()
        .content_type(format!("image/{ext}"))
        .insert_header((
            "Cache-Control",
            format!("private, max-age={}", q.expires.saturating_sub(now)),
        ))
        .body(bytes))
}
