//! SD3 / SD3.5 against diffusers: each component on its own (prompt assembly from the three
//! encoders, MMDiT / MMDiT-X forwards with and without skipped layers, the 16-channel VAE), then
//! whole runs (latents ≤ 1e-3, PNGs within 2/255).

mod common;

use std::sync::Arc;

use candela::engine::{
    loader::ModelDir,
    pipelines::{
        params::{GenerateParams, InitImage, SkipLayerGuidance, TransformerOptions},
        sd3::StableDiffusion3,
        LoadOptions,
    },
    schedulers::SamplerKind,
};
use candle_core::{DType, Device};
use common::*;
use serde::Deserialize;

fn model_dir(root: std::path::PathBuf) -> ModelDir {
    ModelDir {
        root,
        prefer_fp16_variant: false,
    }
}

fn load(model: &str, without_t5: bool) -> StableDiffusion3 {
    let dir = model_dir(fixtures().join("models").join(format!("{model}-tiny")));
    StableDiffusion3::load(
        &dir,
        &Device::Cpu,
        DType::F32,
        &LoadOptions {
            without_t5,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn sd3_components_match_diffusers() {
    for model in ["sd3", "sd35m"] {
        let p = load(model, false);
        let t = load_tensors(&format!("stages/{model}.safetensors"));
        let check = |what: &str, ours: &candle_core::Tensor, key: &str, limit: f32| {
            let d = max_abs_diff(ours, &t[key]);
            eprintln!(
                "{model} {what}: max diff {d} (max abs {})",
                max_abs(&t[key])
            );
            assert!(d <= limit, "{model} {what}: differs from diffusers by {d}");
        };
        // Prompt assembly: CLIP-L ‖ CLIP-G penultimate states padded to T5's width, then T5.
        let pos = p.embed("a red fox in the snow", 0, 32).unwrap();
        let neg = p.embed("blurry", 0, 32).unwrap();
        check("prompt embeds", &pos.context, "prompt_embeds", 1e-5);
        check("pooled", &pos.pooled, "pooled", 1e-5);
        check(
            "negative embeds",
            &neg.context,
            "negative_prompt_embeds",
            1e-5,
        );
        check("negative pooled", &neg.pooled, "negative_pooled", 1e-5);
        let skip = p.embed("a red fox in the snow", 1, 32).unwrap();
        check(
            "clip_skip 1 embeds",
            &skip.context,
            "prompt_embeds_clip_skip1",
            1e-5,
        );
        check(
            "clip_skip 1 pooled",
            &skip.pooled,
            "pooled_clip_skip1",
            1e-5,
        );

        // The transformer at a non-square size: 6×4 patches cropped from the 24×24 table.
        let context =
            candle_core::Tensor::cat(&[&t["negative_prompt_embeds"], &t["prompt_embeds"]], 0)
                .unwrap();
        let pooled = candle_core::Tensor::cat(&[&t["negative_pooled"], &t["pooled"]], 0).unwrap();
        let timestep = t["timestep"].to_vec1::<f32>().unwrap()[0];
        let out = p
            .transformer_forward(&t["sample"], timestep, &context, &pooled, &[])
            .unwrap();
        check("transformer", &out, "out", 1e-4);
        let out = p
            .transformer_forward(&t["sample"], timestep, &context, &pooled, &[1, 2])
            .unwrap();
        check(
            "transformer skipping layers 1, 2",
            &out,
            "out_skip_1_2",
            1e-4,
        );

        let decoded = p.vae().decode(&t["vae_latents"]).unwrap();
        check("vae decode", &decoded, "vae_decoded", 1e-4);
    }
}

#[derive(Deserialize)]
struct Run {
    name: String,
    model: String,
    seed: u64,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    n: usize,
    prompt: String,
    negative_prompt: Option<String>,
    t5: bool,
    #[serde(default)]
    max_sequence_length: Option<usize>,
    #[serde(default)]
    skip_guidance_layers: Option<Vec<usize>>,
    #[serde(default)]
    skip_layer_guidance_scale: Option<f64>,
    #[serde(default)]
    skip_layer_guidance_start: Option<f64>,
    #[serde(default)]
    skip_layer_guidance_stop: Option<f64>,
    #[serde(default)]
    scheduler_overrides: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    strength: Option<f64>,
    #[serde(default)]
    init_image: Option<String>,
}

#[test]
fn sd3_runs_match_diffusers() {
    let runs: Vec<Run> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("runs/sd3_runs.json")).unwrap(),
    )
    .unwrap();
    assert!(runs.len() >= 10);
    for run in runs {
        // A run with scheduler overrides uses a copy of the model with that scheduler config.
        let copy;
        let pipeline = match &run.scheduler_overrides {
            Some(overrides) => {
                copy = model_copy(&format!("{}-tiny", run.model));
                let path = copy.path().join("scheduler/scheduler_config.json");
                let mut config: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                config.extend(overrides.clone());
                std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
                StableDiffusion3::load(
                    &model_dir(copy.path().to_path_buf()),
                    &Device::Cpu,
                    DType::F32,
                    &LoadOptions::default(),
                )
                .unwrap()
            }
            None => load(&run.model, !run.t5),
        };
        assert_eq!(pipeline.has_t5(), run.t5);
        let params = GenerateParams {
            prompt: run.prompt.clone(),
            negative_prompt: run.negative_prompt.clone(),
            width: run.width,
            height: run.height,
            steps: run.steps,
            guidance_scale: run.guidance,
            seed: run.seed,
            n: run.n,
            init: run.init_image.as_ref().map(|file| {
                let img = image::open(fixtures().join("runs").join(file))
                    .unwrap()
                    .to_rgb8();
                InitImage {
                    rgb: Arc::new(img.into_raw()),
                    strength: run.strength.unwrap(),
                    mask: None,
                }
            }),
            transformer: TransformerOptions {
                true_cfg_scale: None,
                max_sequence_length: run.max_sequence_length,
                skip_layer_guidance: run.skip_guidance_layers.as_ref().map(|layers| {
                    SkipLayerGuidance {
                        layers: layers.clone(),
                        scale: run.skip_layer_guidance_scale.unwrap(),
                        start: run.skip_layer_guidance_start.unwrap(),
                        stop: run.skip_layer_guidance_stop.unwrap(),
                    }
                }),
            },
            ..base_params(SamplerKind::FlowEuler)
        };
        let mut reports = 0;
        let out = pipeline
            .generate(&params, &mut |_| {
                reports += 1;
                true
            })
            .unwrap();
        let expected_steps = match run.strength {
            Some(s) => run.steps - (run.steps as f64 - run.steps as f64 * s) as usize,
            None => run.steps,
        };
        assert_eq!(reports, expected_steps, "{}: progress per step", run.name);
        let expected = &load_tensors(&format!("runs/{}.safetensors", run.name))["latents"];
        let d = max_abs_diff(&out.latents, expected);
        let worst = worst_png_diff(&run.name, &out.images);
        eprintln!(
            "{}: latents max diff {d}, worst pixel {worst}/255",
            run.name
        );
        assert!(
            d <= 1e-3,
            "{}: latents differ from diffusers by {d}",
            run.name
        );
        assert_eq!(out.images.len(), run.n);
        assert!(worst <= 2, "{}: pixels differ by {worst}/255", run.name);
    }
}

#[test]
fn sd35_from_stability_single_file_equals_diffusers_layout() {
    // The tiny SD3.5-medium transformer in Stability's naming (`model.diffusion_model.` prefix,
    // fused qkv, MMDiT-X attn2, swapped final / last-context modulation), verified by diffusers'
    // own single-file converter when it was written.
    let file = fixtures().join("models/sd3.5-medium-tiny-sai.safetensors");
    let dir = model_dir(fixtures().join("models/sd35m-tiny"));
    let options = LoadOptions {
        transformer_file: Some(file),
        ..Default::default()
    };
    let from_file = StableDiffusion3::load(&dir, &Device::Cpu, DType::F32, &options).unwrap();
    let from_folder = load("sd35m", false);
    let params = GenerateParams {
        steps: 3,
        guidance_scale: 4.5,
        seed: 3,
        width: 48,
        height: 64,
        transformer: TransformerOptions {
            max_sequence_length: Some(16),
            ..Default::default()
        },
        ..base_params(SamplerKind::FlowEuler)
    };
    let a = from_file.generate(&params, &mut |_| true).unwrap();
    let b = from_folder.generate(&params, &mut |_| true).unwrap();
    assert_eq!(max_abs_diff(&a.latents, &b.latents), 0.0);
    assert_eq!(a.images, b.images);
}

/// SD3.5 from a GGUF file in Stability's naming (`model.diffusion_model.joint_blocks…`, as the
/// community's SD3.5 conversions): its block layers held as the file's q8_0 / q4_0 blocks and
/// multiplied held once (`gguf-compact`: dequantized into each product) generate what the dense
/// model of the same values does — through the fused q/k/v rows cut apart, MMDiT-X's `attn2`,
/// and the last block's context modulation with its halves swapped, all in block formats.
#[test]
fn sd35_from_a_gguf_file_computes_its_dequantized_weights() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let sai = fixtures().join("models/sd3.5-medium-tiny-sai.safetensors");
    let tensors = candle_core::safetensors::load(&sai, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut blocks = Vec::new();
    let mut dequantized = std::collections::HashMap::new();
    for (i, name) in names.into_iter().enumerate() {
        let t = tensors[name].to_dtype(DType::F32).unwrap();
        let in_blocks = name.contains(".joint_blocks.") && name.ends_with(".weight");
        let format = match t.dims() {
            [_, inputs] if in_blocks && inputs % 32 == 0 => {
                [GgmlDType::Q8_0, GgmlDType::Q4_0][i % 2]
            }
            _ => GgmlDType::F32,
        };
        let q = QTensor::quantize(&t, format).unwrap();
        dequantized.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
        blocks.push((name.clone(), q));
    }
    let swapped = "model.diffusion_model.joint_blocks.3.context_block.adaLN_modulation.1.weight";
    let quantized = |name: &str| {
        blocks
            .iter()
            .any(|(n, q)| n == name && q.dtype() != GgmlDType::F32)
    };
    assert!(
        quantized(swapped),
        "the swapped modulation is not in a block format"
    );
    assert!(quantized(
        "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"
    ));
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("sd3.5-medium-tiny-mixed.gguf");
    write_gguf(&gguf, "sd3", &blocks);
    let dense = tmp.path().join("sd3.5-medium-tiny-dequantized.safetensors");
    candle_core::safetensors::save(&dequantized, &dense).unwrap();
    let dir = model_dir(fixtures().join("models/sd35m-tiny"));
    let run = |file: &std::path::Path, format: &str| {
        let options = LoadOptions {
            transformer_file: Some(file.to_path_buf()),
            transformer_format: format.parse().unwrap(),
            ..Default::default()
        };
        let params = GenerateParams {
            steps: 3,
            guidance_scale: 4.5,
            seed: 5,
            width: 48,
            height: 64,
            transformer: TransformerOptions {
                max_sequence_length: Some(16),
                ..Default::default()
            },
            ..base_params(SamplerKind::FlowEuler)
        };
        StableDiffusion3::load(&dir, &Device::Cpu, DType::F32, &options)
            .unwrap()
            .generate(&params, &mut |_| true)
            .unwrap()
    };
    let from_gguf = run(&gguf, "gguf-compact");
    let from_values = run(&dense, "dense");
    let d = max_abs_diff(&from_gguf.latents, &from_values.latents);
    eprintln!("sd3.5 gguf-compact: latents max diff {d} vs the dense dequantized model");
    assert!(d < 1e-4, "gguf-compact: {d}");
    // The blocks really moved the weights.
    let original = run(&sai, "dense");
    assert!(max_abs_diff(&original.latents, &from_values.latents) > 1e-3);
}
