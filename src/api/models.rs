use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState, Caller};
use crate::jobs::ModelInfo;

#[derive(Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
    /// candela's extension: what the model can do.
    pub capabilities: ModelInfo,
    /// candela's extension: whether its weights are resident on the device now (models that do
    /// not fit the memory budget together load on demand, evicting the least recently used).
    pub loaded: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

fn to_model(info: &ModelInfo, loaded: &[String]) -> Model {
    Model {
        id: info.id.clone(),
        object: "model",
        created: 0,
        owned_by: "candela",
        capabilities: info.clone(),
        loaded: loaded.contains(&info.id),
    }
}

/// The loaded models (OpenAI's list shape, with capabilities).
#[utoipa::path(get, path = "/v1/models", tag = "models", security(("bearer" = [])),
    responses((status = 200, body = ModelList), (status = 401, body = super::error::ErrorResponse)))]
#[get("/v1/models")]
pub async fn list(state: web::Data<AppState>, _caller: Caller) -> HttpResponse {
    HttpResponse::Ok().json(ModelList {
        object: "list",
        data: {
            let loaded = state.engine.loaded_models();
            state
                .engine
                .models()
                .into_iter()
                .map(|m| to_model(m, &loaded))
                .collect()
        },
    })
}

#[utoipa::path(get, path = "/v1/models/{model}", tag = "models", security(("bearer" = [])),
    params(("model" = String, Path, description = "model id")),
    responses((status = 200, body = Model), (status = 404, body = super::error::ErrorResponse)))]
#[get("/v1/models/{model}")]
pub async fn get(
    state: web::Data<AppState>,
    _caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let info = state.engine.model(&id).ok_or_else(|| {
        ApiError::not_found("model_not_found", format!("model `{id}` does not exist"))
            .with_param("model")
    })?;
    Ok(HttpResponse::Ok().json(to_model(info, &state.engine.loaded_models())))
}
