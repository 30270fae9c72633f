//! Whole text-to-image runs against diffusers: final latents and decoded PNGs.

mod common;

use candela::engine::{
    loader::ModelDir,
    pipelines::sd::{GenerateParams, InitImage, StableDiffusion},
    schedulers::SigmaSchedule,
};
use candle_core::{DType, Device};
use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Run {
    name: String,
    model: String,
    sampler: String,
    schedule: String,
    seed: u64,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    n: usize,
    prompt: String,
    negative_prompt: Option<String>,
    solver_order: Option<usize>,
    #[serde(default)]
    clip_skip: usize,
    /// Image-to-image runs: the starting picture (a PNG next to the run) and the strength.
    #[serde(default)]
    init_image: Option<String>,
    #[serde(default)]
    strength: Option<f64>,
    /// Inpainting runs: the mask (white = repaint).
    #[serde(default)]
    mask_image: Option<String>,
}

#[test]
fn full_runs_match_diffusers_latents_and_pngs() {
    // (file, at least this many runs): each family of runs its generator script wrote.
    let mut runs: Vec<Run> = Vec::new();
    for (file, at_least) in [
        ("runs.json", 16),
        ("sdxl_runs.json", 5),
        ("img2img_runs.json", 6),
        ("inpaint_runs.json", 4),
        ("refiner_runs.json", 2),
    ] {
        let some: Vec<Run> = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("runs").join(file)).unwrap(),
        )
        .unwrap();
        assert!(some.len() >= at_least, "{file}");
        runs.extend(some);
    }
    assert!(runs.len() >= 6);
    let mut pipelines = std::collections::HashMap::new();
    for run in runs {
        let folder = format!("{}-tiny", run.model);
        let p = pipelines.entry(folder.clone()).or_insert_with(|| {
            let dir = ModelDir {
                root: fixtures().join("models").join(&folder),
                prefer_fp16_variant: false,
            };
            StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap()
        });
        let params = GenerateParams {
            transformer: Default::default(),
            prompt: run.prompt.clone(),
            negative_prompt: run.negative_prompt.clone(),
            width: run.width,
            height: run.height,
            steps: run.steps,
            guidance_scale: run.guidance,
            seed: run.seed,
            sampler: run.sampler.parse().unwrap(),
            schedule: run.schedule.parse::<SigmaSchedule>().unwrap(),
            n: run.n,
            solver_order: run.solver_order,
            clip_skip: run.clip_skip,
            refiner: None,
            stage: None,
            init: run.init_image.as_ref().map(|file| {
                let img = image::open(fixtures().join("runs").join(file))
                    .unwrap()
                    .to_rgb8();
                assert_eq!(
                    (img.width() as usize, img.height() as usize),
                    (run.width, run.height)
                );
                InitImage {
                    rgb: std::sync::Arc::new(img.into_raw()),
                    strength: run.strength.unwrap(),
                    mask: run.mask_image.as_ref().map(|m| {
                        let mask = image::open(fixtures().join("runs").join(m))
                            .unwrap()
                            .to_luma8();
                        std::sync::Arc::new(mask.into_raw())
                    }),
                }
            }),
        };
        let (mut steps_seen, mut total) = (0, 0);
        let out = p
            .generate(&params, &mut |pr| {
                steps_seen += 1;
                assert_eq!(pr.step, steps_seen);
                total = pr.total;
                true
            })
            .unwrap();
        // One report per model evaluation (PNDM evaluates steps + 1 times, Heun 2 * steps - 1, as in diffusers).
        assert_eq!(
            steps_seen, total,
            "{}: progress reported every step",
            run.name
        );
        // Image-to-image runs only the last `strength × steps` steps.
        let kept = match run.strength {
            Some(strength) => (run.steps as f64 * strength) as usize,
            None => run.steps,
        };
        assert!(
            total
                == match run.sampler.as_str() {
                    "pndm" => kept + 1,
                    "heun" | "dpm_2" | "dpm_2_a" => 2 * kept - 1,
                    _ => kept,
                },
            "{}: {total} evaluations",
            run.name
        );

        let expected = &load_tensors(&format!("runs/{}.safetensors", run.name))["latents"];
        let d = max_abs_diff(&out.latents, expected);
        eprintln!("{}: latents max diff {d}", run.name);
        assert!(
            d <= 1e-3,
            "{}: final latents differ from diffusers by {d}",
            run.name
        );

        assert_eq!(out.images.len(), run.n);
        for img in &out.images {
            assert_eq!(
                (img.width, img.height),
                (run.width as u32, run.height as u32),
                "{}: size",
                run.name
            );
        }
        let worst = worst_png_diff(&run.name, &out.images);
        eprintln!("{}: worst pixel channel diff {worst}/255", run.name);
        assert!(
            worst <= 2,
            "{}: pixels differ from diffusers by {worst}/255",
            run.name
        );
    }
}

/// A cancelled run stops at once, and gives back the CPU kernels' scratch as a finished one does.
#[test]
fn cancelling_from_progress_stops_the_run() {
    use candela::engine::models::cpu_winograd::{conv3x3, thread_buffer_bytes, WinogradWeight};
    let dir = ModelDir {
        root: fixtures().join("models/sd1-tiny"),
        prefer_fp16_variant: false,
    };
    let p = candela::engine::pipelines::Pipeline::load(
        &dir,
        &Device::Cpu,
        DType::F32,
        &Default::default(),
    )
    .unwrap();
    // A convolution with more tiles than the channel schedule takes leaves this thread a buffer.
    let x = candle_core::Tensor::randn(0f32, 1., (1, 32, 64, 64), &Device::Cpu).unwrap();
    let k = candle_core::Tensor::randn(0f32, 0.1, (32, 32, 3, 3), &Device::Cpu).unwrap();
    conv3x3(&x, &WinogradWeight::from_tensor(&k).unwrap(), None).unwrap();
    assert!(thread_buffer_bytes() > 0);
    let params = GenerateParams {
        transformer: Default::default(),
        prompt: "x".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 5,
        guidance_scale: 7.5,
        seed: 1,
        sampler: "euler".parse().unwrap(),
        schedule: SigmaSchedule::Default,
        n: 1,
        solver_order: None,
        clip_skip: 0,
        refiner: None,
        stage: None,
        init: None,
    };
    let mut calls = 0;
    let err = p
        .generate(&params, &mut |pr| {
            calls += 1;
            pr.step < 2
        })
        .err()
        .expect("cancelled");
    assert!(matches!(err, candela::engine::EngineError::Cancelled));
    assert_eq!(calls, 2);
    assert_eq!(thread_buffer_bytes(), 0);
}

/// Requests denoised together in one batch (one UNet call per step) give the images each would
/// give alone: own prompt, negative prompt, n and seed, noise from its own generator.
#[test]
fn batched_requests_equal_their_single_runs() {
    let dir = ModelDir {
        root: fixtures().join("models/sd1-tiny"),
        prefer_fp16_variant: false,
    };
    let p = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    for sampler in ["euler_a", "dpmpp_2m_sde", "unipc"] {
        let request = |prompt: &str, negative: Option<&str>, seed: u64, n: usize| GenerateParams {
            transformer: Default::default(),
            prompt: prompt.into(),
            negative_prompt: negative.map(str::to_string),
            width: 64,
            height: 48,
            steps: 4,
            guidance_scale: 6.0,
            seed,
            sampler: sampler.parse().unwrap(),
            schedule: SigmaSchedule::Default,
            solver_order: None,
            n,
            clip_skip: 0,
            refiner: None,
            stage: None,
            init: None,
        };
        let requests = [
            request("a red barn", None, 11, 1),
            request("a blue lake at night", Some("fog"), 22, 2),
            request("a red barn", Some("people"), 33, 1),
        ];
        let mut evaluations = 0;
        let batched = p
            .generate_batch(&requests, &mut |_| {
                evaluations += 1;
                true
            })
            .unwrap();
        assert_eq!(
            evaluations, 4,
            "one denoiser call per step for the whole batch"
        );
        assert_eq!(batched.len(), 3);
        for (req, got) in requests.iter().zip(&batched) {
            let alone = p.generate(req, &mut |_| true).unwrap();
            let d = max_abs_diff(&got.latents, &alone.latents);
            eprintln!("{sampler}: batched vs alone {d}");
            // Same arithmetic, except that the GEMMs block a larger batch differently, which
            // changes f32 summation order (~1e-6 per op, compounded over the steps).
            assert!(d <= 1e-4, "{sampler}: batched result differs by {d}");
            assert_eq!(got.images.len(), req.n);
            for (a, b) in got.images.iter().zip(&alone.images) {
                let px = a
                    .rgb
                    .iter()
                    .zip(&b.rgb)
                    .map(|(x, y)| x.abs_diff(*y))
                    .max()
                    .unwrap_or(0);
                assert!(px <= 1, "{sampler}: batched image differs by {px}/255");
            }
        }
    }
}

#[derive(Deserialize)]
struct TwoStageRun {
    name: String,
    sampler: String,
    seed: u64,
    width: usize,
    height: usize,
    steps: usize,
    switch: f64,
    guidance: f64,
    n: usize,
    prompt: String,
}

/// SDXL base + refiner handing over at `switch`, against diffusers' two pipelines.
#[test]
fn sdxl_base_then_refiner_matches_diffusers() {
    let runs: Vec<TwoStageRun> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("runs/two_stage_runs.json")).unwrap(),
    )
    .unwrap();
    assert!(runs.len() >= 2);
    let load = |folder: &str| {
        let dir = ModelDir {
            root: fixtures().join("models").join(folder),
            prefer_fp16_variant: false,
        };
        StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap()
    };
    let (base, refiner) = (load("sdxl-tiny"), load("sdxl-refiner-tiny"));
    for run in runs {
        let params = GenerateParams {
            transformer: Default::default(),
            prompt: run.prompt.clone(),
            negative_prompt: None,
            width: run.width,
            height: run.height,
            steps: run.steps,
            guidance_scale: run.guidance,
            seed: run.seed,
            sampler: run.sampler.parse().unwrap(),
            schedule: SigmaSchedule::Default,
            solver_order: None,
            n: run.n,
            clip_skip: 0,
            refiner: None,
            stage: None,
            init: None,
        };
        let out = base
            .generate_with_refiner(&refiner, &params, run.switch, &mut |_| true)
            .unwrap();
        let expected = load_tensors(&format!("runs/{}.safetensors", run.name));
        let d = max_abs_diff(&out.latents, &expected["latents"]);
        eprintln!("{}: latents max diff {d}", run.name);
        assert!(d <= 1e-3, "{}: final latents differ by {d}", run.name);
        assert_eq!(out.images.len(), run.n);
    }
}

/// On the CPU a model asked for in f16 or bf16 holds its products' weights so and computes in
/// f32: it must compute what the f32 model of those weights, rounded, computes. Each family's tiny
/// model, against a copy whose held weights (the text encoders' too) are rounded to the dtype and
/// stored in f32 (biases and norms stay as stored: the CPU reads those in f32). A layer that
/// computed in half precision, or a weight read in the wrong dtype, moves the latents by far
/// more.
/// A third copy stores those weights in the half dtype itself: asked for in f32, the CPU holds
/// them as stored, computes the same, and the planner counts what the half-precision model holds.
#[test]
fn half_precision_on_the_cpu_computes_the_f32_model_of_its_rounded_weights() {
    use candela::engine::memory::Footprint;
    use candela::engine::pipelines::{params::TransformerOptions, Pipeline};
    for (model, upcast_vae, sampler) in [
        ("sd1-tiny", false, "euler"),
        ("sdxl-tiny", true, "euler"),
        ("sd3-tiny", false, "flow_euler"),
        ("flux-schnell-tiny", false, "flow_euler"),
    ] {
        for dtype in [DType::F16, DType::BF16] {
            let source = fixtures().join("models").join(model);
            let (rounded, stored) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            copy_dir(&source, rounded.path());
            copy_dir(&source, stored.path());
            let folders = ["unet", "transformer", "vae"];
            let text = ["text_encoder", "text_encoder_2", "text_encoder_3"];
            for folder in folders.into_iter().chain(text) {
                // SDXL's pipeline runs its force_upcast VAE in f32 under f16.
                if folder == "vae" && upcast_vae && dtype == DType::F16 {
                    continue;
                }
                let Ok(files) = std::fs::read_dir(rounded.path().join(folder)) else {
                    continue;
                };
                // Single or sharded.
                for file in files {
                    let path = file.unwrap().path();
                    if path.extension().is_some_and(|e| e == "safetensors") {
                        let text = folder.starts_with("text");
                        round_held_weights(&path, dtype, DType::F32, text);
                        let relative = path.strip_prefix(rounded.path()).unwrap();
                        round_held_weights(&stored.path().join(relative), dtype, dtype, text);
                    }
                }
            }
            let dir = |root: &std::path::Path| ModelDir {
                root: root.to_path_buf(),
                prefer_fp16_variant: false,
            };
            let load = |root: &std::path::Path, dtype: DType| {
                Pipeline::load(&dir(root), &Device::Cpu, dtype, &Default::default()).unwrap()
            };
            let planned = |root: &std::path::Path, dtype: DType| {
                let options = Default::default();
                Footprint::read(&dir(root), &Device::Cpu, dtype, &options)
                    .unwrap()
                    .weights_bytes()
            };
            assert_eq!(planned(stored.path(), DType::F32), planned(&source, dtype));
            assert!(planned(stored.path(), DType::F32) < planned(rounded.path(), DType::F32));
            let params = GenerateParams {
                transformer: TransformerOptions {
                    max_sequence_length: Some(16),
                    ..Default::default()
                },
                prompt: "a lighthouse at dusk".into(),
                negative_prompt: None,
                width: 64,
                height: 64,
                steps: 3,
                guidance_scale: 4.0,
                seed: 7,
                sampler: sampler.parse().unwrap(),
                schedule: SigmaSchedule::Default,
                solver_order: None,
                n: 1,
                clip_skip: 0,
                refiner: None,
                stage: None,
                init: None,
            };
            // Image-to-image too: the VAE's encoder.
            let picture = InitImage {
                rgb: std::sync::Arc::new((0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect()),
                strength: 0.7,
                mask: None,
            };
            for init in [None, Some(picture)] {
                let params = GenerateParams {
                    init: init.clone(),
                    ..params.clone()
                };
                let half = load(&source, dtype)
                    .generate(&params, &mut |_| true)
                    .unwrap();
                let f32 = load(rounded.path(), DType::F32)
                    .generate(&params, &mut |_| true)
                    .unwrap();
                let as_stored = load(stored.path(), DType::F32)
                    .generate(&params, &mut |_| true)
                    .unwrap();
                let d_stored = max_abs_diff(&as_stored.latents, &f32.latents);
                let d = max_abs_diff(&half.latents, &f32.latents);
                let scale = max_abs(&f32.latents);
                eprintln!(
                    "{model} {dtype:?} img2img={}: {d} (held as stored: {d_stored}) of {scale}",
                    init.is_some()
                );
                assert!(
                    d_stored <= 1e-4 * scale.max(1.0),
                    "{model} {dtype:?}: stored in half precision and run in f32, {d_stored} from the f32 model of the same values"
                );
                // The same f32 arithmetic but for the products' summation order (the held
                // weights are widened by blocks).
                assert!(
                    d <= 1e-4 * scale.max(1.0),
                    "{model} {dtype:?}: the half-precision CPU model is {d} from the f32 model of its rounded weights"
                );
                assert_eq!(half.latents.dtype(), DType::F32);
            }
        }
    }
}

/// The file's tensors a CPU model in `dtype` holds in it, rounded to it and stored in `stored`:
/// a denoiser's or VAE's, or a `text_encoder`'s (held by T5's and CLIP's rule).
fn round_held_weights(path: &std::path::Path, dtype: DType, stored: DType, text_encoder: bool) {
    use candela::engine::models::{blocks::cpu_holds_in_model_dtype, t5::weight_dtype};
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let tensors: std::collections::HashMap<_, _> = tensors
        .into_iter()
        .map(|(name, t)| {
            let held = if text_encoder {
                weight_dtype(&name, dtype, DType::F32, true) == dtype
            } else {
                cpu_holds_in_model_dtype(&name, t.dims())
            };
            let t = if held {
                t.to_dtype(dtype).unwrap().to_dtype(stored).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// `--quantize` on a UNet (SD 1.5 and SDXL): held once and multiplied in f32 (`-compact`), its
/// transformer blocks compute what the dense model of the same weights quantized and dequantized
/// into a file computes — up to the order of f32 sums (limit 1e-4 of the latents; the
/// dequantized file's own run differs from the original's by more than 1e-3). On the fastest
/// product (q8_0 on our int8 tiles where the CPU has VNNI, the activations rounded to 8 bits
/// too) the picture stays within 40 dB PSNR of full precision's, and differs from it.
#[test]
fn quantized_unet_blocks_compute_their_dequantized_weights() {
    use candela::engine::models::unet::quantizes;
    use candela::engine::pipelines::{LoadOptions, Pipeline};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Tensor;
    let params = GenerateParams {
        steps: 3,
        seed: 11,
        ..base_params("euler".parse().unwrap())
    };
    for model in ["sd1-tiny", "sdxl-tiny"] {
        let load = |root: &std::path::Path, format: &str| {
            let dir = ModelDir {
                root: root.to_path_buf(),
                prefer_fp16_variant: false,
            };
            let options = LoadOptions {
                transformer_format: format.parse().unwrap(),
                ..Default::default()
            };
            let pipeline = Pipeline::load(&dir, &Device::Cpu, DType::F32, &options).unwrap();
            pipeline.generate(&params, &mut |_| true).unwrap()
        };
        let original = fixtures().join("models").join(model);
        let copy = model_copy(model);
        let unet = copy.path().join("unet/diffusion_pytorch_model.safetensors");
        let mut quantized = 0;
        let tensors: std::collections::HashMap<String, Tensor> =
            candle_core::safetensors::load(&unet, &Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(name, t)| {
                    let whole_blocks = t.rank() == 2 && t.dim(1).unwrap() % 32 == 0;
                    if !(quantizes(&name) && whole_blocks) {
                        return (name, t);
                    }
                    quantized += 1;
                    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
                    (name, q.dequantize(&Device::Cpu).unwrap())
                })
                .collect();
        assert!(quantized >= 8, "{model}: {quantized} layers");
        candle_core::safetensors::save(&tensors, &unet).unwrap();
        let full = load(&original, "dense");
        let dequantized = load(copy.path(), "dense");
        let compact = load(&original, "q8_0-compact");
        let d = max_abs_diff(&compact.latents, &dequantized.latents);
        eprintln!("{model} q8_0-compact: latents {d} from the dequantized model");
        assert!(d < 1e-4, "{model} q8_0-compact: {d}");
        assert!(max_abs_diff(&full.latents, &dequantized.latents) > 1e-3);
        let fastest = load(&original, "q8_0");
        let p = fastest.images[0].psnr(&full.images[0]);
        let d = max_abs_diff(&fastest.latents, &full.latents);
        eprintln!("{model} q8_0: latents {d} from full precision, PSNR {p:.1} dB");
        assert!(d > 0.0 && p >= 40.0, "{model} q8_0: {d}, {p:.1} dB");
    }
}
