//! The committed OpenAPI document must match what the code generates.

#[test]
fn committed_openapi_json_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let committed = std::fs::read_to_string(&path).expect("openapi/openapi.json");
    let generated = candela::api::openapi_json();
    assert!(
        committed == generated,
        "openapi/openapi.json is out of date; regenerate with `cargo run -- openapi > openapi/openapi.json`"
    );
    let spec: serde_json::Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/v1/images/generations",
        "/v1/models",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/health",
    ] {
        assert!(
            spec["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
    assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
}
