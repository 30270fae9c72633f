//! FLUX.1 dev / schnell against diffusers: prompt encoding, packing, one transformer forward, the
//! VAE, then whole runs (latents ≤ 1e-3, PNGs within 2/255), all from sharded weights.

mod common;

use candela::engine::{
    loader::ModelDir,
    pipelines::{
        flux::Flux,
        params::{GenerateParams, TransformerOptions},
        LoadOptions,
    },
    schedulers::SamplerKind,
};
use candle_core::{DType, Device};
use common::*;
use serde::Deserialize;

/// A short FLUX-dev generation with the tiny model: 3 steps, 16 text tokens.
fn short_dev_run(width: usize, height: usize, seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: "a lighthouse".into(),
        negative_prompt: None,
        width,
        height,
        steps: 3,
        guidance_scale: 3.5,
        seed,
        n: 1,
        transformer: TransformerOptions {
            max_sequence_length: Some(16),
            ..Default::default()
        },
        ..base_params(SamplerKind::FlowEuler)
    }
}

fn tiny_dir(model: &str) -> ModelDir {
    ModelDir {
        root: fixtures().join("models").join(format!("{model}-tiny")),
        prefer_fp16_variant: false,
    }
}

fn load(model: &str) -> Flux {
    Flux::load(
        &tiny_dir(model),
        &Device::Cpu,
        DType::F32,
        &LoadOptions::default(),
    )
    .unwrap()
}

/// The tiny FLUX.1-dev with its transformer from `file`, its blocks held in `format`.
fn load_dev_with(file: &std::path::Path, format: &str) -> Flux {
    let options = LoadOptions {
        transformer_file: Some(file.to_path_buf()),
        transformer_format: format.parse().unwrap(),
        ..Default::default()
    };
    Flux::load(&tiny_dir("flux-dev"), &Device::Cpu, DType::F32, &options).unwrap()
}

#[test]
fn flux_components_match_diffusers() {
    for model in ["flux-dev", "flux-schnell"] {
        // The fixtures ship the transformer and T5 in shards, as the hub repos do.
        let transformer = fixtures()
            .join("models")
            .join(format!("{model}-tiny/transformer"));
        assert!(transformer
            .join("diffusion_pytorch_model.safetensors.index.json")
            .is_file());
        let p = load(model);
        let t = load_tensors(&format!("stages/{model}.safetensors"));
        let check = |what: &str, ours: &candle_core::Tensor, key: &str, limit: f32| {
            let d = max_abs_diff(ours, &t[key]);
            eprintln!(
                "{model} {what}: max diff {d} (max abs {})",
                max_abs(&t[key])
            );
            assert!(d <= limit, "{model} {what}: differs from diffusers by {d}");
        };
        let e = p.embed("a red fox in the snow", 24).unwrap();
        check("T5 prompt embeds", &e.context, "prompt_embeds", 1e-5);
        check("CLIP pooled", &e.pooled, "pooled", 1e-5);
        let packed = Flux::pack(&t["latents"]).unwrap();
        check("packing", &packed, "packed", 0.0);
        let unpacked = Flux::unpack(&packed, 6, 4).unwrap();
        assert_eq!(max_abs_diff(&unpacked, &t["latents"]), 0.0);
        let guidance = p.has_guidance_embeds().then_some(3.5);
        let context = t["prompt_embeds"].repeat((2, 1, 1)).unwrap();
        let rope = p.rope_for(context.dim(1).unwrap(), (6, 4)).unwrap();
        let out = p
            .transformer_forward(
                &packed,
                750.0,
                guidance,
                &context,
                &t["pooled"].repeat((2, 1)).unwrap(),
                &rope,
            )
            .unwrap();
        check("transformer", &out, "out", 1e-4);
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
    #[serde(default)]
    max_sequence_length: Option<usize>,
    #[serde(default)]
    true_cfg_scale: Option<f64>,
    /// Image-to-image runs: the starting picture (a PNG next to the run) and the strength.
    #[serde(default)]
    init_image: Option<String>,
    #[serde(default)]
    strength: Option<f64>,
}

/// A recorded diffusers run's request.
/// The fixture `runs/NAME.json`: diffusers' run parameters (one run, or a list).
fn read_run<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = fixtures().join(format!("runs/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn params_of(run: &Run) -> GenerateParams {
    GenerateParams {
        prompt: run.prompt.clone(),
        negative_prompt: run.negative_prompt.clone(),
        width: run.width,
        height: run.height,
        steps: run.steps,
        guidance_scale: run.guidance,
        seed: run.seed,
        n: run.n,
        transformer: TransformerOptions {
            max_sequence_length: run.max_sequence_length,
            skip_layer_guidance: None,
            true_cfg_scale: run.true_cfg_scale,
        },
        init: run.init_image.as_ref().map(|file| {
            let img = image::open(fixtures().join("runs").join(file))
                .unwrap()
                .to_rgb8();
            candela::engine::pipelines::params::InitImage {
                rgb: std::sync::Arc::new(img.into_raw()),
                strength: run.strength.unwrap(),
                mask: None,
            }
        }),
        ..base_params(SamplerKind::FlowEuler)
    }
}

#[test]
fn flux_runs_match_diffusers() {
    let runs: Vec<Run> = read_run("flux_runs");
    assert!(runs.len() >= 8);
    let mut pipelines = std::collections::HashMap::new();
    for run in runs {
        let p = pipelines
            .entry(run.model.clone())
            .or_insert_with(|| load(&run.model));
        // diffusers' default T5 length is 512 for both; ours is 256 for schnell, so runs that
        // rely on the default are dev runs.
        assert!(run.max_sequence_length.is_some() || p.has_guidance_embeds());
        let params = params_of(&run);
        let mut reports = 0;
        let out = p
            .generate(&params, &mut |_| {
                reports += 1;
                true
            })
            .unwrap();
        // Image-to-image skips int(steps − steps × strength) steps, as diffusers.
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
fn flux_from_black_forest_labs_single_file_equals_diffusers_layout() {
    // The tiny dev transformer written in BFL's naming (fused qkv, fused linear1, swapped final
    // modulation), verified by diffusers' own single-file converter when it was written.
    let bfl = fixtures().join("models/flux1-dev-tiny-bfl.safetensors");
    let dir = tiny_dir("flux-dev");
    let options = LoadOptions {
        transformer_file: Some(bfl),
        ..Default::default()
    };
    let from_file = Flux::load(&dir, &Device::Cpu, DType::F32, &options).unwrap();
    let from_folder = load("flux-dev");
    let params = short_dev_run(48, 64, 9);
    let a = from_file.generate(&params, &mut |_| true).unwrap();
    let b = from_folder.generate(&params, &mut |_| true).unwrap();
    assert_eq!(max_abs_diff(&a.latents, &b.latents), 0.0);
    assert_eq!(a.images, b.images);
}

/// A GGUF transformer as city96's FLUX conversions ship it (BFL naming, GGML blocks of several
/// formats, some layers f16 / bf16 / f32), held once on the CPU (`gguf-compact`: each layer's
/// blocks dequantized into its product), against diffusers with the file's tensors dequantized
/// as GGML defines them (f32) — and against diffusers' own GGUF loader, whose CPU dequantization
/// rounds every weight to f16 (its `dequantize_blocks_*` multiply in half precision): ours may
/// differ from that run by no more than that rounding moves it. The fixture's fused q/k/v,
/// `linear1` and `linear2` are stored in block formats, so each cut of the blocks (rows apart,
/// columns apart, halves swapped) is on the path.
#[test]
fn flux_from_a_gguf_file_matches_diffusers_gguf_loader() {
    let gguf = fixtures().join("models/flux1-dev-tiny-mixed.gguf");
    let params = params_of(&read_run("flux_dev_gguf"));
    let runs = load_tensors("runs/flux_dev_gguf.safetensors");
    let (expected, diffusers_gguf) = (&runs["latents_exact"], &runs["latents"]);
    let compact = load_dev_with(&gguf, "gguf-compact")
        .generate(&params, &mut |_| true)
        .unwrap();
    let d = max_abs_diff(&compact.latents, expected);
    eprintln!("gguf-compact: latents max diff {d} vs diffusers with GGML's dequantization");
    assert!(
        d <= 1e-4,
        "gguf-compact: latents differ from diffusers by {d}"
    );
    let rounding = max_abs_diff(expected, diffusers_gguf);
    let d = max_abs_diff(&compact.latents, diffusers_gguf);
    eprintln!(
        "gguf-compact: {d} vs diffusers' GGUF loader, whose f16 rounding moves it {rounding}"
    );
    assert!(
        d <= rounding + 1e-5,
        "gguf-compact: {d} from diffusers' GGUF run"
    );
    // The file's formats moved the run: the f32 weights' run is elsewhere.
    let bfl = fixtures().join("models/flux1-dev-tiny-bfl.safetensors");
    let original = load_dev_with(&bfl, "dense")
        .generate(&params, &mut |_| true)
        .unwrap();
    assert!(max_abs_diff(&original.latents, expected) > 1e-3);
    // The default (no --quantize) holds the file's blocks too, in the fastest product this CPU
    // has for each format (q8_0 on int8 tiles where it has VNNI: activations rounded as well).
    let fastest = load_dev_with(&gguf, "dense")
        .generate(&params, &mut |_| true)
        .unwrap();
    let p = fastest.images[0].psnr(&compact.images[0]);
    eprintln!("gguf (fastest): image PSNR {p:.1} dB against gguf-compact");
    assert!(p >= 40.0, "gguf: PSNR {p:.1} dB");
    // A format to quantize to does not apply to a GGUF file's blocks, and `gguf` needs one.
    let options = |file: &std::path::Path, format: &str| LoadOptions {
        transformer_file: Some(file.to_path_buf()),
        transformer_format: format.parse().unwrap(),
        ..Default::default()
    };
    for (file, format, says) in [(&gguf, "q8_0", "GGUF"), (&bfl, "gguf", "GGUF")] {
        let refused = Flux::load(
            &tiny_dir("flux-dev"),
            &Device::Cpu,
            DType::F32,
            &options(file, format),
        );
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains(says) && message.contains(format),
            "{format}: {message}"
        );
    }
}

/// FLUX-dev with T5 from a GGUF file in llama.cpp's naming (`enc.blk.N.attn_q`, …; its layers
/// in q8_0 / q4_1, its embedding in f16), held once (`--quantize-t5 gguf-compact`), against
/// diffusers with that T5's tensors dequantized as GGML defines them; loaded as by default (the
/// fastest products: the same here, the tiny T5's q8_0 layers have 48 outputs, which our int8
/// tiles do not take) within 40 dB of it.
#[test]
fn flux_with_a_gguf_t5_matches_diffusers() {
    let gguf = fixtures().join("models/t5-flux-tiny-encoder-mixed.gguf");
    let params = params_of(&read_run("flux_dev_gguf_t5"));
    let expected = &load_tensors("runs/flux_dev_gguf_t5.safetensors")["latents"];
    let with_t5 = |format: &str| {
        let options = LoadOptions {
            t5_file: Some(gguf.clone()),
            t5_format: format.parse().unwrap(),
            ..Default::default()
        };
        Flux::load(&tiny_dir("flux-dev"), &Device::Cpu, DType::F32, &options)
            .unwrap()
            .generate(&params, &mut |_| true)
            .unwrap()
    };
    let compact = with_t5("gguf-compact");
    let d = max_abs_diff(&compact.latents, expected);
    eprintln!("gguf T5, held once: latents max diff {d} vs diffusers");
    assert!(
        d <= 1e-4,
        "gguf-compact T5: latents differ from diffusers by {d}"
    );
    // The file's formats moved the run: the original T5's is elsewhere.
    let original = load("flux-dev").generate(&params, &mut |_| true).unwrap();
    assert!(max_abs_diff(&original.latents, expected) > 1e-3);
    let fastest = with_t5("dense");
    let p = fastest.images[0].psnr(&compact.images[0]);
    eprintln!("gguf T5 (fastest): image PSNR {p:.1} dB against held once");
    assert!(p >= 40.0, "gguf T5: PSNR {p:.1} dB");
}

#[test]
fn quantized_flux_runs_and_its_distance_from_full_precision_is_bounded() {
    use candela::engine::models::quantized::WeightFormat;
    let dir = tiny_dir("flux-dev");
    let params = GenerateParams {
        prompt: "a lighthouse on a cliff at dusk, oil painting".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 6,
        guidance_scale: 3.5,
        seed: 41,
        n: 1,
        transformer: TransformerOptions {
            max_sequence_length: Some(32),
            ..Default::default()
        },
        ..base_params(SamplerKind::FlowEuler)
    };
    let full = load("flux-dev").generate(&params, &mut |_| true).unwrap();
    // fp8 (e4m3: every weight within 2⁻⁴ of itself) sits between q8_0 (8 bits of a block's
    // maximum) and q4_0 (4 bits of it).
    for (format, min_psnr) in [
        ("q8_0", 40.0),
        ("q8_0-compact", 40.0),
        ("fp8", 40.0),
        ("q4_0", 25.0),
    ] {
        let options = LoadOptions {
            transformer_format: format.parse::<WeightFormat>().unwrap(),
            ..Default::default()
        };
        let q = Flux::load(&dir, &Device::Cpu, DType::F32, &options).unwrap();
        let out = q.generate(&params, &mut |_| true).unwrap();
        let d = max_abs_diff(&out.latents, &full.latents);
        let p = out.images[0].psnr(&full.images[0]);
        eprintln!("{format}: latents max diff {d} vs f32, image PSNR {p:.1} dB");
        // Quantization changed something (the blocks really are quantized) ...
        assert!(d > 0.0, "{format}: identical to f32");
        // ... and stays close to the full-precision picture.
        assert!(p >= min_psnr, "{format}: PSNR {p:.1} dB below {min_psnr}");
    }
}

/// A community "fp8_e4m3fn" checkpoint (block weights cast to e4m3, no scales) loads into the
/// FP8 format without a second rounding: per-row power-of-two scales re-express e4m3 values
/// exactly, and a power of two commutes with every product and sum — so the FP8 model of that
/// file generates bit for bit what its dense (widened) model does.
#[test]
fn fp8_checkpoint_loads_exactly_into_the_fp8_format() {
    use candle_core::Tensor;
    let bfl = fixtures().join("models/flux1-dev-tiny-bfl.safetensors");
    let tensors = candle_core::safetensors::load(&bfl, &Device::Cpu).unwrap();
    let mut cast = 0;
    let fp8: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let block = name.starts_with("double_blocks.") || name.starts_with("single_blocks.");
            if block && t.rank() == 2 && name.ends_with(".weight") {
                cast += 1;
                (name, t.to_dtype(DType::F8E4M3).unwrap())
            } else {
                (name, t)
            }
        })
        .collect();
    assert!(cast > 0, "no block weights in the fixture");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("flux1-dev-tiny-fp8.safetensors");
    candle_core::safetensors::save(&fp8, &file).unwrap();
    let params = short_dev_run(48, 32, 5);
    let dense = load_dev_with(&file, "dense")
        .generate(&params, &mut |_| true)
        .unwrap();
    let fp8 = load_dev_with(&file, "fp8")
        .generate(&params, &mut |_| true)
        .unwrap();
    assert_eq!(max_abs_diff(&dense.latents, &fp8.latents), 0.0);
    // The file really holds other values than the f32 original.
    let original = load_dev_with(&bfl, "dense")
        .generate(&params, &mut |_| true)
        .unwrap();
    assert!(max_abs_diff(&original.latents, &dense.latents) > 0.0);
}

/// The blocks held once on the CPU (`-compact`) multiply the dequantized weights in f32, as
/// diffusers' GGUF layers do: a q8_0 / q4_0 FLUX so held generates what the dense model of the
/// same weights, quantized and dequantized into a file, generates — up to the order of f32 sums
/// (the tiny model is 32 wide: k-quants' 256-value blocks would fall back to these).
#[test]
fn compact_quantized_flux_generates_what_its_dequantized_weights_generate() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Tensor;
    let bfl = fixtures().join("models/flux1-dev-tiny-bfl.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let params = short_dev_run(48, 32, 7);
    for (format, blocks) in [("q8_0", GgmlDType::Q8_0), ("q4_0", GgmlDType::Q4_0)] {
        // Every block weight the format quantizes (rank 2, whole blocks of inputs), as its
        // blocks' values.
        let mut quantized = 0;
        let tensors = candle_core::safetensors::load(&bfl, &Device::Cpu).unwrap();
        let dequantized: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| {
                let block =
                    name.starts_with("double_blocks.") || name.starts_with("single_blocks.");
                if block
                    && t.rank() == 2
                    && name.ends_with(".weight")
                    && t.dim(1).unwrap() % blocks.block_size() == 0
                {
                    quantized += 1;
                    let q = QTensor::quantize(&t.to_dtype(DType::F32).unwrap(), blocks).unwrap();
                    (
                        name,
                        q.dequantize(&Device::Cpu)
                            .unwrap()
                            .to_dtype(t.dtype())
                            .unwrap(),
                    )
                } else {
                    (name, t)
                }
            })
            .collect();
        assert!(
            quantized > 0,
            "{format}: no block weights of whole blocks in the fixture"
        );
        let file = tmp
            .path()
            .join(format!("flux1-dev-tiny-{format}.safetensors"));
        candle_core::safetensors::save(&dequantized, &file).unwrap();
        let dense = load_dev_with(&file, "dense")
            .generate(&params, &mut |_| true)
            .unwrap();
        let compact = load_dev_with(&bfl, &format!("{format}-compact"))
            .generate(&params, &mut |_| true)
            .unwrap();
        let d = max_abs_diff(&dense.latents, &compact.latents);
        eprintln!("{format}-compact: latents max diff {d} vs the dense dequantized model");
        assert!(d < 1e-4, "{format}-compact: {d}");
        // The dequantized file really differs from the original.
        let original = load_dev_with(&bfl, "dense")
            .generate(&params, &mut |_| true)
            .unwrap();
        assert!(max_abs_diff(&original.latents, &dense.latents) > 1e-3);
    }
}

#[test]
fn batched_requests_equal_their_single_runs_for_sd3_and_flux() {
    use candela::engine::pipelines::Pipeline;
    for model in ["sd35m-tiny", "flux-dev-tiny"] {
        let dir = ModelDir {
            root: fixtures().join("models").join(model),
            prefer_fp16_variant: false,
        };
        let p = Pipeline::load(&dir, &Device::Cpu, DType::F32, &LoadOptions::default()).unwrap();
        let request = |prompt: &str, negative: Option<&str>, seed: u64, n: usize| GenerateParams {
            prompt: prompt.into(),
            negative_prompt: negative.map(str::to_string),
            width: 64,
            height: 48,
            steps: 3,
            guidance_scale: 4.0,
            seed,
            n,
            transformer: TransformerOptions {
                max_sequence_length: Some(24),
                ..Default::default()
            },
            ..base_params(SamplerKind::FlowEuler)
        };
        let requests = [
            request("a red fox", Some("blurry"), 1, 2),
            request("a lighthouse at dusk", None, 2, 1),
        ];
        let batched = p.generate_batch(&requests, &mut |_| true).unwrap();
        for (r, b) in requests.iter().zip(&batched) {
            let single = p.generate(r, &mut |_| true).unwrap();
            let d = max_abs_diff(&single.latents, &b.latents);
            eprintln!("{model}: batched vs single {d}");
            assert!(d <= 1e-4, "{model}: batched run differs from single by {d}");
        }
    }
}

/// FLUX served in f16 (`--dtype f16` on a GPU; here on the CPU in f16 arithmetic) against diffusers in f16: the
/// whole half-precision path (embeddings, T5, transformer, sampler) agrees with diffusers' as
/// closely as diffusers' agrees with itself in f32. The tiny model overflows nowhere, so T5's
/// f32 `wo` and the clips are tested on their own (parity_components, flux.rs). Limit: three
/// times how far diffusers' own f16 run lands from its f32 one — two f16 computations each that
/// far from the exact result are at most twice it apart (measured: ours 0.0039 from diffusers'
/// f16 run and 0.0032 from its f32 one, diffusers' f16 0.0040 from its f32).
#[test]
fn flux_in_f16_matches_diffusers_in_f16() {
    let dir = ModelDir {
        root: fixtures().join("models").join("flux-dev-tiny"),
        prefer_fp16_variant: false,
    };
    let runs: Vec<Run> = read_run("flux_runs");
    let run = runs.iter().find(|r| r.name == "flux_dev_guidance").unwrap();
    // In f16 arithmetic as on a GPU (the CPU's own f16 holds the weights and computes in f32).
    let out = candela::engine::models::blocks::with_half_arithmetic_on_the_cpu(|| {
        let p = Flux::load(&dir, &Device::Cpu, DType::F16, &LoadOptions::default()).unwrap();
        p.generate(&params_of(run), &mut |_| true).unwrap()
    });
    assert_eq!(out.latents.dtype(), DType::F16);
    let theirs_f16 = &load_tensors("runs/flux_dev_guidance_f16.safetensors")["latents"];
    let theirs_f32 = &load_tensors("runs/flux_dev_guidance.safetensors")["latents"];
    let limit = 3.0 * max_abs_diff(theirs_f16, theirs_f32);
    let d = max_abs_diff(&out.latents, theirs_f16);
    eprintln!("flux f16: latents {d} from diffusers' f16 run (limit {limit})");
    assert!(
        d <= limit,
        "FLUX f16 latents differ from diffusers' f16 run by {d}"
    );
}
