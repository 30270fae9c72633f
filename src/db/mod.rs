//! The job table in SQLite (sqlx). Schema lives in `migrations/`, applied at start-up. Every
//! state change is one statement, so a crash leaves each row in a consistent state.

use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use utoipa::ToSchema;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct Db {
    pool: SqlitePool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "cancelled" => Self::Cancelled,
            _ => Self::Failed,
        }
    }
}

/// One stored image of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobImage {
    pub index: i64,
    pub image_key: String,
    pub format: String,
    pub width: i64,
    pub height: i64,
    pub bytes: i64,
}

/// A job row as the API returns it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub object: &'static str,
    pub user: String,
    pub model: String,
    pub prompt: String,
    /// The request parameters as received.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub seed: Option<i64>,
    pub status: JobStatus,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub request_id: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
    /// How many jobs shared its denoising run (1 = ran alone).
    pub batch_size: Option<i64>,
    pub images: Vec<JobImage>,
}

pub struct NewJob<'a> {
    pub id: &'a str,
    pub user: &'a str,
    pub model: &'a str,
    pub prompt: &'a str,
    pub params: &'a serde_json::Value,
    pub request_id: Option<&'a str>,
    pub priority: bool,
}

/// A job left unfinished by a previous run, to re-queue.
pub struct Unfinished {
    pub id: String,
    pub user: String,
    pub model: String,
    pub params: serde_json::Value,
    pub priority: bool,
}

impl Db {
    pub async fn open(path: &Path) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Jobs left queued/running by a crash or kill: mark them failed, nothing else changes.
    pub async fn fail_interrupted(&self) -> Result<u64, sqlx::Error> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE jobs SET status = 'failed', error_code = 'interrupted', \
             error = 'the server stopped before this job finished', finished_at = ? \
             WHERE status IN ('queued', 'running')",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub async fn insert_job(&self, job: NewJob<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO jobs (id, user_id, model, prompt, params, status, request_id, created_at, priority) \
             VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
        )
        .bind(job.id)
        .bind(job.user)
        .bind(job.model)
        .bind(job.prompt)
        .bind(job.params.to_string())
        .bind(job.request_id)
        .bind(now_ms())
        .bind(job.priority as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_running(
        &self,
        id: &str,
        seed: u64,
        batch_size: usize,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE jobs SET status = 'running', seed = ?, started_at = ?, batch_size = ? WHERE id = ? AND status = 'queued'")
            .bind(seed as i64)
            .bind(now_ms())
            .bind(batch_size as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_failed(
        &self,
        id: &str,
        code: &str,
        message: &str,
    ) -> Result<(), sqlx::Error> {
        self.finish(id, "failed", code, message).await
    }

    /// Only a job that has not finished can become cancelled.
    pub async fn mark_cancelled(&self, id: &str) -> Result<(), sqlx::Error> {
        self.finish(id, "cancelled", "cancelled", "cancelled by request")
            .await
    }

    async fn finish(
        &self,
        id: &str,
        status: &str,
        code: &str,
        message: &str,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let unfinished_only = if status == "cancelled" {
            " AND status IN ('queued', 'running')"
        } else {
            ""
        };
        sqlx::query(&format!(
            "UPDATE jobs SET status = ?, error_code = ?, error = ?, finished_at = ?, \
             duration_ms = ? - COALESCE(started_at, created_at) WHERE id = ?{unfinished_only}"
        ))
        .bind(status)
        .bind(code)
        .bind(message)
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Jobs left queued/running by a crash or kill, oldest first, set back to `queued` so the
    /// scheduler can run them again (the `requeue` restart policy).
    pub async fn requeue_interrupted(&self) -> Result<Vec<Unfinished>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, user_id, model, params, priority FROM jobs \
             WHERE status IN ('queued', 'running') ORDER BY created_at, id",
        )
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET status = 'queued', started_at = NULL, batch_size = NULL \
             WHERE status = 'running'",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| {
                let params: String = r.get("params");
                let priority: i64 = r.get("priority");
                Unfinished {
                    id: r.get("id"),
                    user: r.get("user_id"),
                    model: r.get("model"),
                    params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
                    priority: priority != 0,
                }
            })
            .collect())
    }

    /// Record the images and the success in one transaction.
    pub async fn mark_succeeded(&self, id: &str, images: &[JobImage]) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for img in images {
            sqlx::query(
                "INSERT INTO job_images (job_id, idx, image_key, format, width, height, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(img.index)
            .bind(&img.image_key)
            .bind(&img.format)
            .bind(img.width)
            .bind(img.height)
            .bind(img.bytes)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE jobs SET status = 'succeeded', finished_at = ?, duration_ms = ? - COALESCE(started_at, created_at) WHERE id = ?",
        )
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// A job visible to `user` (`None` = admin, sees all).
    pub async fn get_job(&self, id: &str, user: Option<&str>) -> Result<Option<Job>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ? AND (? IS NULL OR user_id = ?)")
            .bind(id)
            .bind(user)
            .bind(user)
            .fetch_optional(&self.pool)
            .await?;
        let mut jobs: Vec<Job> = row.iter().map(job_from_row).collect();
        self.attach_images(&mut jobs).await?;
        Ok(jobs.pop())
    }

    /// Newest first; `before` (unix ms) pages backwards.
    pub async fn list_jobs(
        &self,
        user: Option<&str>,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Job>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE (? IS NULL OR user_id = ?) AND (? IS NULL OR created_at < ?) \
             ORDER BY created_at DESC, id DESC LIMIT ?",
        )
        .bind(user)
        .bind(user)
        .bind(before)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut jobs: Vec<Job> = rows.iter().map(job_from_row).collect();
        self.attach_images(&mut jobs).await?;
        Ok(jobs)
    }

    /// Fill in every job's images with one query (not one per job).
    async fn attach_images(&self, jobs: &mut [Job]) -> Result<(), sqlx::Error> {
        if jobs.is_empty() {
            return Ok(());
        }
        let ids = serde_json::Value::from(jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>())
            .to_string();
        let rows = sqlx::query(
            "SELECT * FROM job_images WHERE job_id IN (SELECT value FROM json_each(?)) ORDER BY job_id, idx",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let mut by_job: std::collections::HashMap<String, Vec<JobImage>> =
            std::collections::HashMap::new();
        for r in &rows {
            by_job.entry(r.get("job_id")).or_default().push(JobImage {
                index: r.get("idx"),
                image_key: r.get("image_key"),
                format: r.get("format"),
                width: r.get("width"),
                height: r.get("height"),
                bytes: r.get("bytes"),
            });
        }
        for job in jobs {
            job.images = by_job.remove(&job.id).unwrap_or_default();
        }
        Ok(())
    }
}

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Job {
    let params: String = row.get("params");
    let status: String = row.get("status");
    Job {
        id: row.get("id"),
        object: "job",
        user: row.get("user_id"),
        model: row.get("model"),
        prompt: row.get("prompt"),
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        seed: row.get("seed"),
        status: JobStatus::parse(&status),
        error_code: row.get("error_code"),
        error: row.get("error"),
        request_id: row.get("request_id"),
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        duration_ms: row.get("duration_ms"),
        batch_size: row.get("batch_size"),
        images: Vec::new(),
    }
}
