use actix_web::web;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(title = "candela", description = "OpenAI-compatible image generation. Authenticate with `Authorization: Bearer <JWT>` (the OpenAI SDK's api_key)."),
    paths(
        super::images::generate,
        super::edits::edits,
        super::edits::variations,
        super::models::list,
        super::models::get,
        super::jobs::list,
        super::jobs::get,
        super::jobs::cancel,
        super::jobs::events,
        super::jobs::pause,
        super::jobs::resume,
        super::jobs::metrics,
        super::jobs::image,
        super::files::image,
        super::health::health,
    ),
    modifiers(&BearerAuth, &SamplerNames),
    tags((name = "images"), (name = "models"), (name = "jobs"), (name = "service"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Lists every accepted sampler spelling and schedule in the request schema, from the same
/// tables the parser uses (so the spec cannot drift from the code).
struct SamplerNames;

impl Modify for SamplerNames {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use crate::engine::schedulers::{SamplerKind, SigmaSchedule};
        use utoipa::openapi::{schema::Schema, RefOr};
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let Some(RefOr::T(Schema::Object(request))) =
            components.schemas.get_mut("ImageGenerationRequest")
        else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(sampler))) = request.properties.get_mut("sampler") {
            let names = SamplerKind::accepted_names();
            sampler.description = Some(format!(
                "{} Accepted (case-insensitive; `+` may be `p`, spaces `_`; a trailing ` Karras`, ` Exponential`, ` Beta` or ` SGM Uniform` also sets `schedule`): {}.",
                sampler.description.clone().unwrap_or_default(),
                names.join(", ")
            ));
            sampler.examples = vec![
                serde_json::json!("dpmpp_2m"),
                serde_json::json!("DPM++ 2M Karras"),
            ];
        }
        if let Some(RefOr::T(Schema::Object(schedule))) = request.properties.get_mut("schedule") {
            schedule.enum_values = Some(
                SigmaSchedule::ALL
                    .iter()
                    .map(|s| serde_json::json!(s.name()))
                    .chain(std::iter::once(serde_json::Value::Null))
                    .collect(),
            );
        }
    }
}

/// The spec as committed in `openapi/openapi.json`.
pub fn spec_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    cfg.service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", doc))
        .route(
            "/docs",
            web::get().to(|| async {
                actix_web::HttpResponse::Found()
                    .insert_header(("Location", "/docs/"))
                    .finish()
            }),
        );
}
