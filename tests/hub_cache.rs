//! Hub repo ids resolve through hf-hub's cache layout (`models--owner--name/refs/<rev>` →
//! `snapshots/<commit>/...`), which is what offline mode and every later run use.

mod common;

use candela::engine::{
    loader::{self, HubOptions, ModelSource},
    pipelines::sd::StableDiffusion,
    EngineError,
};
use candle_core::{DType, Device};

fn fake_cache(commit: &str) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-sd");
    common::copy_dir(
        &common::fixtures().join("models/sd1-tiny"),
        &repo.join("snapshots").join(commit),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    cache
}

#[test]
fn offline_repo_id_resolves_to_the_cached_snapshot_and_loads() {
    let cache = fake_cache("0123456789abcdef");
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        token: None,
        progress: false,
    };
    let source = ModelSource::parse("acme/tiny-sd").unwrap();
    let dir = loader::resolve(&source, DType::F32, &opts).unwrap();
    assert!(
        dir.root
            .ends_with("models--acme--tiny-sd/snapshots/0123456789abcdef"),
        "{}",
        dir.root.display()
    );
    StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loader::display_name(&source), "acme/tiny-sd");
}

#[test]
fn offline_missing_file_names_repo_and_file() {
    let cache = fake_cache("feedface");
    std::fs::remove_file(
        cache
            .path()
            .join("models--acme--tiny-sd/snapshots/feedface/vae/config.json"),
    )
    .unwrap();
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        token: None,
        progress: false,
    };
    let err = loader::resolve(
        &ModelSource::parse("acme/tiny-sd").unwrap(),
        DType::F32,
        &opts,
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Download { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("acme/tiny-sd") && msg.contains("vae/config.json") && msg.contains("offline"),
        "{msg}"
    );
}

#[test]
fn offline_unknown_repo_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        token: None,
        progress: false,
    };
    let err = loader::resolve(
        &ModelSource::parse("nobody/nothing").unwrap(),
        DType::F32,
        &opts,
    )
    .unwrap_err();
    assert!(err.to_string().contains("nobody/nothing"), "{err}");
}

/// A fake hub cache holding one of the fixture models under `models--acme--<name>`.
fn fake_cache_of(model: &str, name: &str) -> (tempfile::TempDir, HubOptions) {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join(format!("models--acme--{name}"));
    common::copy_dir(
        &common::fixtures().join("models").join(model),
        &repo.join("snapshots/c0ffee"),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        token: None,
        progress: false,
    };
    (cache, opts)
}

#[test]
fn offline_resolution_follows_model_index_components_and_shards() {
    use candela::engine::pipelines::{LoadOptions, Pipeline};
    // SD3: three text encoders and tokenizers, a transformer; FLUX: sharded transformer and T5.
    for (model, name) in [("sd3-tiny", "tiny-sd3"), ("flux-dev-tiny", "tiny-flux")] {
        let (_cache, opts) = fake_cache_of(model, name);
        let source = ModelSource::parse(&format!("acme/{name}")).unwrap();
        let dir = loader::resolve(&source, DType::F32, &opts).unwrap();
        Pipeline::load(&dir, &Device::Cpu, DType::F32, &LoadOptions::default()).unwrap();
    }
    // A missing shard is named.
    let (cache, opts) = fake_cache_of("flux-dev-tiny", "tiny-flux");
    let shard = cache.path().join(
        "models--acme--tiny-flux/snapshots/c0ffee/text_encoder_2/model-00003-of-00006.safetensors",
    );
    std::fs::remove_file(shard).unwrap();
    let err = loader::resolve(
        &ModelSource::parse("acme/tiny-flux").unwrap(),
        DType::F32,
        &opts,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("text_encoder_2/model-00003-of-00006.safetensors"),
        "{msg}"
    );
    // A missing component config is named too (T5 of SD3).
    let (cache, opts) = fake_cache_of("sd3-tiny", "tiny-sd3");
    std::fs::remove_file(
        cache
            .path()
            .join("models--acme--tiny-sd3/snapshots/c0ffee/text_encoder_3/config.json"),
    )
    .unwrap();
    let msg = loader::resolve(
        &ModelSource::parse("acme/tiny-sd3").unwrap(),
        DType::F32,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("text_encoder_3/config.json"), "{msg}");
}
