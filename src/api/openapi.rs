use actix_web::web;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(title = "candela", description = "OpenAI-compatible image generation. Authenticate with `Authorization: Bearer <JWT>` (the OpenAI SDK's api_key)."),
    paths(
        super::images::generate,
        super::models::list,
        super::models::get,
        super::jobs::list,
        super::jobs::get,
        super::jobs::image,
        super::files::image,
        super::health::health,
    ),
    modifiers(&BearerAuth),
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
