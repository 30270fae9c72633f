//! Broken model folders give errors that name the file (and tensor), never a panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candela::engine::{
    loader::ModelDir,
    pipelines::sd::{GenerateParams, StableDiffusion},
    EngineError,
};
use candle_core::{DType, Device};

fn broken_copy(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("model");
    common::copy_dir(&common::fixtures().join("models/sd1-tiny"), &root);
    edit(&root);
    (tmp, root)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn load_error(root: &Path) -> (EngineError, String) {
    let dir = ModelDir {
        root: root.to_path_buf(),
        prefer_fp16_variant: false,
    };
    match StableDiffusion::load(&dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} should fail", root.display()),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

#[test]
fn missing_weight_file_is_named() {
    let (_t, root) = broken_copy(|r| {
        std::fs::remove_file(r.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
    });
    let (e, msg) = load_error(&root);
    assert!(matches!(e, EngineError::MissingFile { .. }), "{msg}");
    assert!(
        msg.contains("unet/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn missing_tokenizer_file_is_named() {
    let (_t, root) = broken_copy(|r| std::fs::remove_file(r.join("tokenizer/merges.txt")).unwrap());
    let (_, msg) = load_error(&root);
    assert!(msg.contains("tokenizer/merges.txt"), "{msg}");
}

#[test]
fn malformed_config_is_named() {
    let (_t, root) =
        broken_copy(|r| std::fs::write(r.join("unet/config.json"), "{ not json").unwrap());
    let (e, msg) = load_error(&root);
    assert!(matches!(e, EngineError::BadConfig { .. }), "{msg}");
    assert!(msg.contains("unet/config.json"), "{msg}");
}

#[test]
fn inconsistent_config_is_rejected_with_reason() {
    let (_t, root) = broken_copy(|r| {
        edit_json(&r.join("unet/config.json"), |v| {
            v["block_out_channels"] = serde_json::json!([16, 32])
        });
    });
    let (_, msg) = load_error(&root);
    assert!(
        msg.contains("unet/config.json") && msg.contains("block_out_channels"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let (_t, root) = broken_copy(|r| {
        edit_json(&r.join("unet/config.json"), |v| {
            v["block_out_channels"] = serde_json::json!([16, 32, 40])
        });
    });
    let (e, msg) = load_error(&root);
    assert!(
        matches!(e, EngineError::Compute(_)) || matches!(e, EngineError::Weights { .. }),
        "{msg}"
    );
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(
        msg.contains("shape mismatch") && msg.contains("down_blocks.2"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let (_t, root) = broken_copy(|r| {
        let path = r.join("vae/diffusion_pytorch_model.safetensors");
        let mut tensors: HashMap<String, candle_core::Tensor> =
            candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        tensors.remove("decoder.conv_out.weight").unwrap();
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    let (_, msg) = load_error(&root);
    assert!(
        msg.contains("vae/diffusion_pytorch_model.safetensors")
            && msg.contains("decoder.conv_out.weight"),
        "{msg}"
    );
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn truncated_weight_file_is_named() {
    let (_t, root) = broken_copy(|r| {
        let path = r.join("text_encoder/model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    });
    let (_, msg) = load_error(&root);
    assert!(msg.contains("text_encoder/model.safetensors"), "{msg}");
}

#[test]
fn other_pipeline_families_are_refused_clearly() {
    let (_t, root) = broken_copy(|r| {
        std::fs::write(
            r.join("model_index.json"),
            r#"{"_class_name": "FluxPipeline"}"#,
        )
        .unwrap()
    });
    let (e, msg) = load_error(&root);
    assert!(matches!(e, EngineError::Unsupported(_)), "{msg}");
    assert!(msg.contains("FluxPipeline"), "{msg}");
    // An SD 1.x folder labelled SDXL names the first SDXL file it lacks.
    let (_t, root) = broken_copy(|r| {
        std::fs::write(
            r.join("model_index.json"),
            r#"{"_class_name": "StableDiffusionXLPipeline"}"#,
        )
        .unwrap()
    });
    let (e, msg) = load_error(&root);
    assert!(matches!(e, EngineError::MissingFile { .. }), "{msg}");
    assert!(msg.contains("tokenizer_2"), "{msg}");
}

#[test]
fn unsupported_scheduler_settings_are_refused() {
    let (_t, root) = broken_copy(|r| {
        edit_json(&r.join("scheduler/scheduler_config.json"), |v| {
            v["use_lu_lambdas"] = serde_json::json!(true)
        });
    });
    let (_, msg) = load_error(&root);
    assert!(msg.contains("use_lu_lambdas"), "{msg}");
}

/// A config feature only some samplers implement (diffusers' other classes silently drop the
/// key) loads, works with those samplers, and is a clear 422-class error with the others.
#[test]
fn thresholding_config_works_with_samplers_that_implement_it_only() {
    let (_t, root) = broken_copy(|r| {
        edit_json(&r.join("scheduler/scheduler_config.json"), |v| {
            v["thresholding"] = serde_json::json!(true);
            v["sample_max_value"] = serde_json::json!(1.5);
        });
    });
    let dir = ModelDir {
        root,
        prefer_fp16_variant: false,
    };
    let pipeline = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let params = |sampler: &str| GenerateParams {
        transformer: Default::default(),
        prompt: "a cat".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 1.0,
        seed: 1,
        sampler: sampler.parse().unwrap(),
        schedule: Default::default(),
        solver_order: None,
        n: 1,
        clip_skip: 0,
        refiner: None,
        stage: None,
        init: None,
    };
    pipeline.generate(&params("ddim"), &mut |_| true).unwrap();
    let err = pipeline
        .generate(&params("euler"), &mut |_| true)
        .err()
        .expect("euler ignores thresholding and must be refused");
    assert!(
        matches!(
            err,
            EngineError::Incompatible {
                param: "sampler",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("thresholding"), "{err}");
}

#[test]
fn fp16_variant_is_preferred_for_half_precision() {
    let (_t, root) = broken_copy(|r| {
        let plain = r.join("unet/diffusion_pytorch_model.safetensors");
        std::fs::rename(
            &plain,
            r.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        )
        .unwrap();
    });
    let dir = ModelDir {
        root: root.clone(),
        prefer_fp16_variant: true,
    };
    assert!(dir
        .weights("unet/diffusion_pytorch_model")
        .unwrap()
        .ends_with("diffusion_pytorch_model.fp16.safetensors"));
    // f32 still loads when only the fp16 variant exists.
    let dir = ModelDir {
        root,
        prefer_fp16_variant: false,
    };
    StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
}

/// A broken GGUF transformer file (a download cut short in its header or in its data, a tensor
/// of another shape than the config's, a FLUX file given to SD3.5) is an error naming the file,
/// never a panic.
#[test]
fn broken_gguf_transformer_files_are_named() {
    use candela::engine::pipelines::{flux::Flux, sd3::StableDiffusion3, LoadOptions};
    let models = common::fixtures().join("models");
    let gguf = std::fs::read(models.join("flux1-dev-tiny-mixed.gguf")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| ModelDir {
        root: models.join(name),
        prefer_fp16_variant: false,
    };
    let options = |file: &Path| LoadOptions {
        transformer_file: Some(file.to_path_buf()),
        ..Default::default()
    };
    let flux_error = |file: &Path| match Flux::load(
        &dir("flux-dev-tiny"),
        &Device::Cpu,
        DType::F32,
        &options(file),
    ) {
        Ok(_) => panic!("{} should not load", file.display()),
        Err(e) => e.to_string(),
    };
    for (what, bytes) in [
        ("header", &gguf[..200]),
        ("data", &gguf[..gguf.len() - 1000]),
    ] {
        let file = tmp.path().join(format!("cut-in-its-{what}.gguf"));
        std::fs::write(&file, bytes).unwrap();
        let message = flux_error(&file);
        assert!(
            message.contains(&*file.to_string_lossy()),
            "{what}: {message}"
        );
    }
    // The tiny FLUX as a wider config reads its tensors: the mismatch names file and tensor.
    let wide = tmp.path().join("flux-wide");
    common::copy_dir(&models.join("flux-dev-tiny"), &wide);
    let config = wide.join("transformer/config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["num_attention_heads"] = serde_json::json!(4);
    std::fs::write(&config, c.to_string()).unwrap();
    let file = models.join("flux1-dev-tiny-mixed.gguf");
    let wide_dir = ModelDir {
        root: wide.clone(),
        prefer_fp16_variant: false,
    };
    let message = match Flux::load(&wide_dir, &Device::Cpu, DType::F32, &options(&file)) {
        Ok(_) => panic!("a 64-wide FLUX should not load a 32-wide file"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains("flux1-dev-tiny-mixed.gguf") && message.contains("config implies"),
        "{message}"
    );
    // A FLUX file for SD3.5: the file is named, and so is the naming it lacks.
    let message = match StableDiffusion3::load(
        &dir("sd35m-tiny"),
        &Device::Cpu,
        DType::F32,
        &options(&file),
    ) {
        Ok(_) => panic!("SD3.5 should not load a FLUX file"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains("flux1-dev-tiny-mixed.gguf")
            && message.contains("not a file of this model"),
        "{message}"
    );
}
