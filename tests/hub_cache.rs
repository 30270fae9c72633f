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

/// Hub options reading only `cache`.
fn offline(cache: &tempfile::TempDir) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        token: None,
        progress: false,
    }
}

#[test]
fn offline_repo_id_resolves_to_the_cached_snapshot_and_loads() {
    let cache = fake_cache("0123456789abcdef");
    let opts = offline(&cache);
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
    let opts = offline(&cache);
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
    let opts = offline(&cache);
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
    let opts = offline(&cache);
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

/// `--transformer owner/name/file[@revision]`: one file of a hub repo, taken from the cache's
/// snapshot offline (downloaded into it online); a path stays a path; anything else, or a file
/// the cache lacks offline, is an error naming it.
#[test]
fn a_transformer_file_resolves_from_a_repo_in_the_cache() {
    use loader::FileSource;
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--city96--FLUX.1-dev-gguf");
    let snapshot = repo.join("snapshots/c0ffee");
    std::fs::create_dir_all(&snapshot).unwrap();
    let gguf = common::fixtures().join("models/flux1-dev-tiny-mixed.gguf");
    std::fs::copy(&gguf, snapshot.join("flux1-dev-Q4_K_S.gguf")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
    let opts = offline(&cache);
    let spec = "city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf";
    let source = FileSource::parse(spec).unwrap();
    assert_eq!(
        source,
        FileSource::Hub {
            repo: "city96/FLUX.1-dev-gguf".into(),
            revision: "main".into(),
            file: "flux1-dev-Q4_K_S.gguf".into()
        }
    );
    let path = loader::resolve_file(&source, &opts).unwrap();
    assert_eq!(path, snapshot.join("flux1-dev-Q4_K_S.gguf"));
    assert!(
        matches!(FileSource::parse(&format!("{spec}@c0ffee")).unwrap(),
        FileSource::Hub { ref revision, .. } if revision == "c0ffee")
    );
    assert_eq!(
        FileSource::parse(gguf.to_str().unwrap()).unwrap(),
        FileSource::Local(gguf.clone())
    );
    let missing = FileSource::parse("city96/FLUX.1-dev-gguf/flux1-dev-Q8_0.gguf").unwrap();
    let message = loader::resolve_file(&missing, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("city96/FLUX.1-dev-gguf") && message.contains("flux1-dev-Q8_0.gguf"),
        "{message}"
    );
    for bad in [
        "city96/FLUX.1-dev-gguf",
        "city96/FLUX.1-dev-gguf/../x.gguf",
        "no such file.gguf",
    ] {
        let message = FileSource::parse(bad).unwrap_err().to_string();
        assert!(message.contains(bad), "{bad}: {message}");
    }
}
