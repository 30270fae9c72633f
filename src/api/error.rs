//! The one place where errors become HTTP responses, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`. Codes are stable strings clients can match.

use actix_web::{http::StatusCode, HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::engine::EngineError;
use crate::jobs::SubmitError;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                message: message.into(),
                kind,
                param: None,
                code: Some(code.to_string()),
            },
            retry_after: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.body.param = Some(param.into());
        self
    }

    /// 400 for a request field that is wrong.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            message,
        )
        .with_param(param)
    }

    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    /// The stable code, for the job record.
    pub fn code(&self) -> &str {
        self.body.code.as_deref().unwrap_or("error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.body.message, self.status)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut builder = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            builder.insert_header(("Retry-After", secs.to_string()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            builder.insert_header(("WWW-Authenticate", "Bearer"));
        }
        builder.json(ErrorResponse {
            error: ErrorBody {
                message: self.body.message.clone(),
                kind: self.body.kind,
                param: self.body.param.clone(),
                code: self.body.code.clone(),
            },
        })
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e {
            AuthError::Missing => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing_api_key",
                msg,
            ),
            AuthError::Expired => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "token_expired",
                msg,
            ),
            AuthError::Invalid(_) => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                msg,
            ),
            AuthError::MissingScope(_) => Self::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "insufficient_scope",
                msg,
            ),
            AuthError::Setup(_) => Self::internal(msg),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::InvalidParameter { param, message } => Self::invalid(param, message),
            EngineError::Incompatible { param, message } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "unsupported_combination",
                message,
            )
            .with_param(param),
            EngineError::ModelNotFound(_) => {
                Self::not_found("model_not_found", msg).with_param("model")
            }
            EngineError::Cancelled => Self::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "cancelled",
                msg,
            ),
            EngineError::Unsupported(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "unsupported",
                msg,
            ),
            EngineError::Timeout { .. } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "server_error", "timeout", msg)
            }
            EngineError::OutOfMemory(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "out_of_memory",
                msg,
            ),
            EngineError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                msg,
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "generation_failed",
                msg,
            ),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull => {
                let mut err = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "queue_full",
                    e.to_string(),
                );
                err.retry_after = Some(5);
                err
            }
            SubmitError::EngineGone => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "engine_unavailable",
                e.to_string(),
            ),
            SubmitError::TooLarge { param, message } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "exceeds_memory_budget",
                message,
            )
            .with_param(param),
            SubmitError::Engine(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "database_error",
            "database error",
        )
    }
}

impl From<crate::storage::StoreError> for ApiError {
    fn from(e: crate::storage::StoreError) -> Self {
        tracing::error!(error = %e, "image store error");
        Self::internal("image store error")
    }
}
