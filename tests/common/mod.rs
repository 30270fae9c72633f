//! Helpers shared by the integration tests: fixture paths and tensor comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A safetensors fixture; `*.safetensors.gz` ones are gzipped (the largest, to keep the tree
/// small enough to travel to a GPU machine).
pub fn load_tensors(relative: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(relative);
    let loaded = if relative.ends_with(".gz") {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| flate2::read::GzDecoder::new(f).read_to_end(&mut bytes))
            .unwrap_or_else(|e| panic!("fixture {relative}: {e}"));
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
    } else {
        candle_core::safetensors::load(&path, &Device::Cpu)
    };
    loaded.unwrap_or_else(|e| panic!("fixture {relative}: {e}"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Compare generated images with the PNGs diffusers saved as `runs/<name>-<i>.png`; returns the
/// worst channel difference (0–255).
pub fn worst_png_diff(name: &str, images: &[candela::engine::GeneratedImage]) -> i32 {
    let mut worst = 0;
    for (i, img) in images.iter().enumerate() {
        let png = image::open(fixtures().join(format!("runs/{name}-{i}.png")))
            .unwrap_or_else(|e| panic!("{name}-{i}.png: {e}"))
            .to_rgb8();
        assert_eq!(
            png.dimensions(),
            (img.width, img.height),
            "{name}-{i}: size"
        );
        let diff = png
            .as_raw()
            .iter()
            .zip(&img.rgb)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap_or(0);
        worst = worst.max(diff);
    }
    worst
}

/// A copy of a fixture model in a temporary folder, for tests that change a config.
pub fn model_copy(model: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models").join(model), tmp.path());
    tmp
}

pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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

/// A 64×64, 4-step, guidance 7.5, seed 0, one-image request with `sampler`; tests override what
/// they need with struct update syntax.
pub fn base_params(
    sampler: candela::engine::schedulers::SamplerKind,
) -> candela::engine::pipelines::params::GenerateParams {
    candela::engine::pipelines::params::GenerateParams {
        prompt: "a lighthouse".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 7.5,
        seed: 0,
        sampler,
        schedule: candela::engine::schedulers::SigmaSchedule::Default,
        solver_order: None,
        n: 1,
        clip_skip: 0,
        init: None,
        stage: None,
        refiner: None,
        transformer: Default::default(),
    }
}

/// `tensors` (name, blocks) written to `path` as a GGUF file of `architecture` (the key the
/// community's converters set).
pub fn write_gguf(
    path: &std::path::Path,
    architecture: &str,
    tensors: &[(String, candle_core::quantized::QTensor)],
) {
    use candle_core::quantized::{gguf_file, QTensor};
    let architecture = gguf_file::Value::String(architecture.into());
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut out = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut out, &[("general.architecture", &architecture)], &refs).unwrap();
}
