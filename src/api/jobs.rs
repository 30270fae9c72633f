use actix_web::{delete, get, post, web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, Caller};
use crate::auth::{SCOPE_ADMIN, SCOPE_GENERATE, SCOPE_JOBS_READ};
use crate::db::{Job, JobStatus};
use crate::jobs::{CancelOutcome, JobEvent, JobProgress};

/// A job row plus, while it is queued or running, its live progress.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// Queue position, step i of N, step time and ETA (absent once finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
}

impl JobView {
    pub fn new(job: Job, progress: Option<JobProgress>) -> Self {
        Self { job, progress }
    }
}

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
    pub data: Vec<JobView>,
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
    let data = data
        .into_iter()
        .map(|job| {
            let progress = state.engine.progress(&job.id);
            JobView::new(job, progress)
        })
        .collect();
    Ok(HttpResponse::Ok().json(JobList {
        object: "list",
        data,
        has_more,
    }))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("job_not_found", format!("no job `{id}`")).with_param("job_id")
}

/// The job if the caller may see it (its owner, or an admin); anyone else gets a 404.
async fn visible_job(state: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    state
        .db
        .get_job(id, caller.0.visible_user())
        .await?
        .ok_or_else(|| not_found(id))
}

fn view(state: &AppState, job: Job) -> HttpResponse {
    let progress = state.engine.progress(&job.id);
    HttpResponse::Ok().json(JobView::new(job, progress))
}

/// One job. Another user's job is reported as not found.
#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = super::error::ErrorResponse)))]
#[get("/v1/jobs/{job_id}")]
pub async fn get(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_JOBS_READ)?;
    let id = path.into_inner();
    let job = visible_job(&state, &caller, &id).await?;
    Ok(view(&state, job))
}

/// Cancel a job: a queued one never runs; a running one stops at its next step. Owner or admin.
#[utoipa::path(delete, path = "/v1/jobs/{job_id}", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path)),
    responses((status = 200, body = JobView, description = "cancelled, or stopping at the next step (`progress` present)"),
        (status = 404, body = super::error::ErrorResponse),
        (status = 409, body = super::error::ErrorResponse, description = "already finished")))]
#[delete("/v1/jobs/{job_id}")]
pub async fn cancel(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_GENERATE)?;
    let id = path.into_inner();
    let job = visible_job(&state, &caller, &id).await?;
    if matches!(
        job.status,
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
    ) {
        return Err(ApiError::new(
            actix_web::http::StatusCode::CONFLICT,
            "invalid_request_error",
            "job_finished",
            format!("job `{id}` already finished ({})", job.status.as_str()),
        )
        .with_param("job_id"));
    }
    let outcome = state.engine.cancel(&id);
    tracing::info!(job = %id, ?outcome, "cancel requested");
    if outcome == CancelOutcome::Dequeued {
        // The runner records it; wait briefly so the answer shows the final row.
        for _ in 0..50 {
            if state.engine.progress(&id).is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let job = visible_job(&state, &caller, &id).await?;
    Ok(view(&state, job))
}

/// Server-sent events of one job: `queued` (position), `started`, `step` (i of N, step time,
/// ETA), then one terminal `finished` event. A finished job sends only `finished`.
#[utoipa::path(get, path = "/v1/jobs/{job_id}/events", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path)),
    responses((status = 200, description = "text/event-stream of JobEvent", content_type = "text/event-stream", body = JobEvent),
        (status = 404, body = super::error::ErrorResponse)))]
#[get("/v1/jobs/{job_id}/events")]
pub async fn events(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_JOBS_READ)?;
    let id = path.into_inner();
    let job = visible_job(&state, &caller, &id).await?;
    let sse = |e: &JobEvent| -> web::Bytes {
        let (name, data) = match serde_json::to_value(e) {
            Ok(v) => (
                v.get("event")
                    .and_then(|n| n.as_str())
                    .unwrap_or("message")
                    .to_string(),
                v.to_string(),
            ),
            Err(_) => ("message".into(), "{}".into()),
        };
        web::Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
    };
    let response = |body| {
        HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(body)
    };
    let Some((progress, rx)) = state.engine.watch(&id) else {
        let once = futures_util::stream::once(async move {
            Ok::<_, actix_web::Error>(sse(&finished_event(&job)))
        });
        return Ok(response(Box::pin(once) as EventStream));
    };
    // First what the job is doing now, then each change until it finishes.
    let current = if progress.state == "queued" {
        JobEvent::Queued {
            position: progress.queue_position.unwrap_or(0),
        }
    } else {
        JobEvent::Started {
            batch_size: progress.batch_size.unwrap_or(1),
        }
    };
    let first = futures_util::stream::once({
        let bytes = sse(&current);
        async move { Ok::<_, actix_web::Error>(bytes) }
    });
    let db = state.db.clone();
    let rest = futures_util::stream::unfold(Some((rx, db, id)), move |st| async move {
        let (mut rx, db, id) = st?;
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let done = matches!(e, JobEvent::Finished { .. });
                    let bytes = sse(&e);
                    return Some((Ok(bytes), if done { None } else { Some((rx, db, id)) }));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    // The job left the engine between our look and our subscription.
                    let job = db.get_job(&id, None).await.ok().flatten()?;
                    return Some((Ok(sse(&finished_event(&job))), None));
                }
            }
        }
    });
    use futures_util::StreamExt;
    Ok(response(Box::pin(first.chain(rest)) as EventStream))
}

/// The terminal event of a job already recorded as finished.
fn finished_event(job: &Job) -> JobEvent {
    JobEvent::Finished {
        status: job.status.as_str().to_string(),
        error_code: job.error_code.clone(),
        error: job.error.clone(),
    }
}

type EventStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<web::Bytes, actix_web::Error>>>>;

/// Admin: hold the queue (running jobs finish; queued ones wait) — for maintenance.
#[utoipa::path(post, path = "/v1/admin/queue/pause", tag = "service", security(("bearer" = [])),
    responses((status = 200, description = "paused"), (status = 403, body = super::error::ErrorResponse)))]
#[post("/v1/admin/queue/pause")]
pub async fn pause(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_ADMIN)?;
    state.engine.pause();
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({"paused": true, "queue": state.engine.queue_ids()})))
}

/// Admin: resume a paused queue.
#[utoipa::path(post, path = "/v1/admin/queue/resume", tag = "service", security(("bearer" = [])),
    responses((status = 200, description = "resumed"), (status = 403, body = super::error::ErrorResponse)))]
#[post("/v1/admin/queue/resume")]
pub async fn resume(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_ADMIN)?;
    state.engine.resume();
    Ok(HttpResponse::Ok().json(serde_json::json!({"paused": false})))
}

/// Prometheus metrics: queue depth, running jobs, jobs by status, step time, model loads and
/// evictions, memory used and budget per device.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.engine.metrics_text())
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
    let job = visible_job(&state, &caller, &id).await?;
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
