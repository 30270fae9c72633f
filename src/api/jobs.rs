use actix_web::{get, web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, Caller};
use crate::auth::SCOPE_JOBS_READ;
use crate::db::Job;

#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// Only jobs created before this unix-millisecond time (for paging).
    pub before: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub object: &'static str,
    pub data: Vec<Job>,
    pub has_more: bool,
}

/// The caller's jobs, newest first (admins see everyone's).
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = JobList), (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse)))]
#[get("/v1/jobs")]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_JOBS_READ)?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "`limit` must be between 1 and 100",
        ));
    }
    let mut data = state
        .db
        .list_jobs(caller.0.visible_user(), limit + 1, q.before)
        .await?;
    let has_more = data.len() as i64 > limit;
    data.truncate(limit as usize);
    Ok(HttpResponse::Ok().json(JobList {
        object: "list",
        data,
        has_more,
    }))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("job_not_found", format!("no job `{id}`")).with_param("job_id")
}

/// One job. Another user's job is reported as not found.
#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = super::error::ErrorResponse)))]
#[get("/v1/jobs/{job_id}")]
pub async fn get(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_JOBS_READ)?;
    let id = path.into_inner();
    let job = state
        .db
        .get_job(&id, caller.0.visible_user())
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(HttpResponse::Ok().json(job))
}

/// The encoded bytes of one image of a job (owner or admin only).
#[utoipa::path(get, path = "/v1/jobs/{job_id}/images/{index}", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path), ("index" = i64, Path)),
    responses((status = 200, description = "image bytes", content_type = "image/png"), (status = 404, body = super::error::ErrorResponse)))]
#[get("/v1/jobs/{job_id}/images/{index}")]
pub async fn image(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, i64)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_JOBS_READ)?;
    let (id, index) = path.into_inner();
    let job = state
        .db
        .get_job(&id, caller.0.visible_user())
        .await?
        .ok_or_else(|| not_found(&id))?;
    let img = job
        .images
        .iter()
        .find(|i| i.index == index)
        .ok_or_else(|| {
            ApiError::not_found(
                "image_not_found",
                format!("job `{id}` has no image {index}"),
            )
        })?;
    let bytes = state
        .store
        .get(&img.image_key)?
        .ok_or_else(|| ApiError::not_found("image_not_found", "the image is no longer stored"))?;
    Ok(HttpResponse::Ok()
        .content_type(format!("image/{}", img.format))
        .insert_header(("Cache-Control", "private, max-age=3600"))
        .body(bytes))
}
