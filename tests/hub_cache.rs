//! Hub repo ids resolve through hf-hub's cache layout (`models--owner--name/refs/<rev>` →
//! `snapshots/<commit>/...`), which is what offline mode and every later run use.

mod common;

use std::path::Path;

use candela::engine::{
    loader::{self, HubOptions, ModelSource},
    pipelines::sd::StableDiffusion,
    EngineError,
};
use candle_core::{DType, Device};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn fake_cache(commit: &str) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-sd");
    copy_dir(
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
