//! The job-history dashboard: one static page from `web/`, compiled in.

use actix_web::{web, HttpResponse};

const INDEX: &str = include_str!("../../web/index.html");

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/",
        web::get().to(|| async {
            HttpResponse::Ok()
                .content_type("text/html; charset=utf-8")
                .body(INDEX)
        }),
    );
}
