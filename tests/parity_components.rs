//! Stage-by-stage parity with diffusers/transformers/torch (fixtures from tools/reference/make_fixtures.py).

mod common;

use candela::engine::models::quantized::WeightFormat;
use candela::engine::{
    loader::{ModelDir, ModelSource},
    pipelines::sd::StableDiffusion,
    rng::TorchGenerator,
    schedulers::{self, SamplerKind, SchedulerConfig, SigmaSchedule},
    tokenizer::ClipTokenizer,
};
use candle_core::{DType, Device, Tensor};
use common::*;
use serde::Deserialize;

fn model_dir(name: &str) -> ModelDir {
    ModelDir {
        root: fixtures().join("models").join(name),
        prefer_fp16_variant: false,
    }
}

#[derive(Deserialize)]
struct RandnCase {
    name: String,
    seed: u64,
    shape: Vec<usize>,
    /// torch's dtype name where it is not float32.
    #[serde(default)]
    dtype: Option<String>,
}

fn randn_cases(file: &str) -> Vec<RandnCase> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(file)).unwrap()).unwrap()
}

#[test]
fn randn_matches_torch_bit_for_bit_on_both_paths() {
    let expected = load_tensors("randn.safetensors");
    for case in randn_cases("randn_cases.json") {
        let mut g = TorchGenerator::new(case.seed);
        let numel: usize = case.shape.iter().product();
        for draw in ["first", "second"] {
            let ours = g.randn(numel);
            let theirs = expected[&format!("{}_{draw}", case.name)]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // The vectorised (AVX2) path of torch may differ from scalar libm in the last bit.
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            eprintln!("randn {} {draw}: max diff {worst}", case.name);
            assert!(
                worst <= 2e-6,
                "{} {draw} draw (seed {}, shape {:?}): max diff {worst}",
                case.name,
                case.seed,
                case.shape
            );
        }
    }
}

/// torch.randn in float16 / bfloat16, as diffusers draws latents and sampler noise when it
/// serves in half precision: the stream leaves the float32 one where the element count is not a
/// multiple of 16 (17, 100, 180 and 468 values here; 768 as a control), two draws per case so the
/// generator's state after the first counts too. Ours are rounded to the dtype and held to one
/// unit in its last place (torch's Box-Muller runs through other libm calls; a wrong tail is off
/// by whole units).
#[test]
fn half_precision_randn_matches_torch() {
    let expected = load_tensors("randn_half.safetensors");
    for case in randn_cases("randn_half_cases.json") {
        let dtype = match case.dtype.as_deref() {
            Some("float16") => DType::F16,
            Some("bfloat16") => DType::BF16,
            other => panic!("dtype {other:?}"),
        };
        let mantissa_bits = if dtype == DType::F16 { 10 } else { 7 };
        let mut g = TorchGenerator::new(case.seed);
        let numel: usize = case.shape.iter().product();
        for draw in ["first", "second"] {
            let ours = Tensor::new(g.randn_in(numel, dtype), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>())
                .unwrap();
            let theirs: Vec<f32> = expected[&format!("{}_{draw}", case.name)]
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .unwrap();
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                let ulp = (b.abs().max(1e-3) * 2f32.powi(-mantissa_bits)).max(f32::EPSILON);
                assert!(
                    (a - b).abs() <= ulp * 1.01,
                    "{} {draw} draw (seed {}, shape {:?}), value {i}: {a} vs torch's {b}",
                    case.name,
                    case.seed,
                    case.shape
                );
            }
        }
    }
}

#[derive(Deserialize)]
struct TokenCase {
    prompt: String,
    ids: Vec<u32>,
}

#[test]
fn tokenizer_ids_identical_to_transformers() {
    let all: std::collections::HashMap<String, Vec<TokenCase>> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    for (model, folder) in [("sd1", "sd1-tiny"), ("sd2", "sd2-tiny")] {
        let tok = ClipTokenizer::load(&model_dir(folder), "tokenizer").unwrap();
        for case in &all[model] {
            let ids = tok.encode_padded(&case.prompt).unwrap();
            assert_eq!(ids, case.ids, "{model} tokenizer, prompt {:?}", case.prompt);
        }
    }
}

#[derive(Deserialize)]
struct SchedulerCase {
    config: String,
    timestep_spacing: String,
    steps: usize,
    sampler: String,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    sigmas: Option<Vec<f64>>,
}

#[test]
fn scheduler_timesteps_and_sigmas_match_diffusers() {
    let cases: Vec<SchedulerCase> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("schedulers.json")).unwrap())
            .unwrap();
    assert!(cases.len() > 100);
    for case in cases {
        let folder = if case.config == "sd1" {
            "sd1-tiny"
        } else {
            "sd2-tiny"
        };
        let mut config: SchedulerConfig = model_dir(folder)
            .read_json("scheduler/scheduler_config.json")
            .unwrap();
        config.timestep_spacing =
            serde_json::from_value(serde_json::Value::String(case.timestep_spacing.clone()))
                .unwrap();
        let (kind, schedule) = match case.sampler.as_str() {
            "euler" => (SamplerKind::Euler, SigmaSchedule::Default),
            "euler_karras" => (SamplerKind::Euler, SigmaSchedule::Karras),
            "euler_exponential" => (SamplerKind::Euler, SigmaSchedule::Exponential),
            "euler_a" => (SamplerKind::EulerA, SigmaSchedule::Default),
            "ddim" => (SamplerKind::Ddim, SigmaSchedule::Default),
            other => panic!("unknown sampler {other}"),
        };
        let label = format!(
            "{} {} {} steps={}",
            case.config, case.sampler, case.timestep_spacing, case.steps
        );
        let sampler = schedulers::build(&config, kind, schedule, case.steps).unwrap();
        let ts = sampler.timesteps();
        assert_eq!(ts.len(), case.timesteps.len(), "{label}: timestep count");
        for (a, b) in ts.iter().zip(&case.timesteps) {
            assert!(
                (*a as f64 - b).abs() <= 1e-3 * b.abs().max(1.0),
                "{label}: timesteps {ts:?} vs {:?}",
                case.timesteps
            );
        }
        let init = sampler.init_noise_sigma() as f64;
        assert!(
            (init - case.init_noise_sigma).abs() <= 1e-5 * case.init_noise_sigma.max(1.0),
            "{label}: init sigma {init} vs {}",
            case.init_noise_sigma
        );
        if let Some(expected) = &case.sigmas {
            let sigmas = sampler.sigmas().expect("sigma sampler");
            assert_eq!(sigmas.len(), expected.len(), "{label}: sigma count");
            for (a, b) in sigmas.iter().zip(expected) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * b.max(1.0),
                    "{label}: sigmas {sigmas:?} vs {expected:?}"
                );
            }
        }
    }
}

fn load_pipeline(folder: &str) -> StableDiffusion {
    StableDiffusion::load(&model_dir(folder), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn text_encoder_unet_and_vae_match_diffusers() {
    for (stage, folder) in [("sd1", "sd1-tiny"), ("sd2", "sd2-tiny")] {
        let p = load_pipeline(folder);
        let t = load_tensors(&format!("stages/{stage}.safetensors"));

        let prompts = ["a red fox in the snow", ""];
        let emb: Vec<Tensor> = prompts
            .iter()
            .map(|pr| p.encode_prompt(pr, 0).unwrap())
            .collect();
        let emb = Tensor::cat(&emb, 0).unwrap();
        let d = max_abs_diff(&emb, &t["text_embeddings"]);
        eprintln!("{stage} text embeddings: max diff {d}");
        assert!(d <= 1e-4, "{stage} text embeddings differ by {d}");
        let skip: Vec<Tensor> = prompts
            .iter()
            .map(|pr| p.encode_prompt(pr, 1).unwrap())
            .collect();
        let d = max_abs_diff(
            &Tensor::cat(&skip, 0).unwrap(),
            &t["text_embeddings_clip_skip1"],
        );
        assert!(d <= 1e-4, "{stage} clip_skip=1 embeddings differ by {d}");
        assert_unet_and_vae_match(stage, &p, &t);
    }
}

/// The stage's UNet forward and VAE decode against diffusers', within 1e-4 of each output's
/// scale.
fn assert_unet_and_vae_match(
    stage: &str,
    p: &StableDiffusion,
    t: &std::collections::HashMap<String, Tensor>,
) {
    let timestep = t["unet_timestep"].to_vec1::<f32>().unwrap()[0];
    let out = p
        .unet_forward(&t["unet_sample"], timestep, &t["text_embeddings"])
        .unwrap();
    let d = max_abs_diff(&out, &t["unet_out"]);
    eprintln!(
        "{stage} unet: max diff {d} (max abs {})",
        max_abs(&t["unet_out"])
    );
    assert!(
        d <= 1e-4 * max_abs(&t["unet_out"]).max(1.0),
        "{stage} UNet output differs by {d}"
    );

    let decoded = p.vae_decode(&t["vae_latents"]).unwrap();
    let d = max_abs_diff(&decoded, &t["vae_decoded"]);
    eprintln!(
        "{stage} vae: max diff {d} (max abs {})",
        max_abs(&t["vae_decoded"])
    );
    assert!(
        d <= 1e-4 * max_abs(&t["vae_decoded"]).max(1.0),
        "{stage} VAE decode differs by {d}"
    );
}

/// SDXL's components: both encoders' penultimate states (and with clip_skip), the pooled
/// projection, and the UNet with text_time added conditioning.
#[test]
fn sdxl_encoders_and_unet_match_diffusers() {
    let p = load_pipeline("sdxl-tiny");
    let t = load_tensors("stages/sdxl.safetensors");
    let prompts = ["a red fox in the snow", ""];
    let embeds: Vec<_> = prompts.iter().map(|pr| p.embed(pr, 0).unwrap()).collect();
    let context = Tensor::cat(&embeds.iter().map(|e| &e.context).collect::<Vec<_>>(), 0).unwrap();
    let d = max_abs_diff(&context, &t["unet_context"]);
    eprintln!("sdxl context (both encoders' penultimate states): max diff {d}");
    assert!(d <= 1e-4, "SDXL context differs by {d}");
    let pooled = Tensor::cat(
        &embeds
            .iter()
            .map(|e| e.pooled.clone().unwrap())
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let d = max_abs_diff(&pooled, &t["pooled_2"]);
    eprintln!("sdxl pooled projection: max diff {d}");
    assert!(d <= 1e-4, "SDXL pooled embedding differs by {d}");
    // clip_skip = 1 reads one layer earlier in both encoders.
    let width_1 = t["hidden_penultimate"].dim(2).unwrap();
    let skip: Vec<Tensor> = prompts
        .iter()
        .map(|pr| {
            let c = p.embed(pr, 1).unwrap().context;
            let n = c.dim(2).unwrap();
            c.narrow(2, width_1, n - width_1).unwrap()
        })
        .collect();
    let d = max_abs_diff(&Tensor::cat(&skip, 0).unwrap(), &t["hidden_skip1_2"]);
    assert!(d <= 1e-4, "SDXL clip_skip=1 states differ by {d}");

    let timestep = t["unet_timestep"].to_vec1::<f32>().unwrap()[0];
    let out = p
        .unet_forward_added(
            &t["unet_sample"],
            timestep,
            &t["unet_context"],
            &t["pooled_2"],
            &t["unet_time_ids"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        )
        .unwrap();
    let d = max_abs_diff(&out, &t["unet_out"]);
    eprintln!(
        "sdxl unet (text_time): max diff {d} (max abs {})",
        max_abs(&t["unet_out"])
    );
    assert!(
        d <= 1e-4 * max_abs(&t["unet_out"]).max(1.0),
        "SDXL UNet output differs by {d}"
    );
}

#[test]
fn model_sources_resolve_local_folders() {
    let path = fixtures().join("models/sd1-tiny");
    assert_eq!(
        ModelSource::parse(path.to_str().unwrap()).unwrap(),
        ModelSource::Local(path)
    );
}

/// A tiny T5 fixture's encoder (`text_encoder/`) in `dtype` on the CPU.
fn load_t5(dir: &ModelDir, dtype: DType) -> candela::engine::models::t5::T5Encoder {
    load_t5_as(dir, dtype, WeightFormat::Dense)
}

/// [`load_t5`] with its blocks' Linear layers in `format` (`--quantize-t5`).
fn load_t5_as(
    dir: &ModelDir,
    dtype: DType,
    format: WeightFormat,
) -> candela::engine::models::t5::T5Encoder {
    let config: serde_json::Value = dir.read_json("text_encoder/config.json").unwrap();
    let file = candela::engine::loader::weights::SafetensorsFile::open(
        &dir.file("text_encoder/model.safetensors"),
    )
    .unwrap();
    let stored = file.stored_dtypes();
    candela::engine::models::t5::T5Encoder::new(
        file.into_var_builder(dtype, &Device::Cpu),
        config,
        &stored,
        format.into(),
    )
    .unwrap()
}

/// T5 quantized on load (`--quantize-t5`), on the CPU in f32: held as the memory planner counts
/// it, in every format, FP8 included (the tiny T5's 32- and 64-wide rows take q8_0 and q5_0 where the
/// k-quants' 256-value blocks do not divide them). Held once and multiplied in f32 (`-compact`)
/// it computes what the dense T5 of the same weights quantized and dequantized computes: the
/// same f32 products, 1e-5 of the states' largest value (the dequantized file differs from the
/// original by more than 1e-3 of it). On the int8 tiles (q8_0 where AVX-512 VNNI runs them) the
/// activations are rounded to 8 bits per 32 values too: within 2⁻⁶ of the largest value of
/// the compact result (each of the 10 products rounds its inputs by up to half a step of 1/127
/// of their block's largest value; measured 0.031 of 2.99, about what the weights' own rounding
/// moved it).
#[test]
fn t5_quantized_on_load_is_held_as_planned_and_computes_its_dequantized_weights() {
    use candela::engine::loader::weights::SafetensorsFile;
    use candela::engine::models::t5::held_bytes;
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = model_dir("t5-tiny");
    let format = |f: &str| f.parse::<WeightFormat>().unwrap();
    let file = SafetensorsFile::open(&dir.file("text_encoder/model.safetensors")).unwrap();
    let dense = load_t5(&dir, DType::F32);
    // fp8: e4m3 codes and a per-row scale in the layer's dtype (counted since session 25).
    for name in ["q8_0", "q8_0-compact", "q6k", "q4k", "q4_0-compact", "fp8"] {
        let encoder = load_t5_as(&dir, DType::F32, format(name));
        let planned = file.loaded_bytes_with(|tensor, stored, shape| {
            held_bytes(tensor, stored, shape, (DType::F32, format(name)), true)
        });
        assert_eq!(
            encoder.weight_bytes() as u64,
            planned,
            "{name}: held vs planned"
        );
        assert!(
            encoder.weight_bytes() < dense.weight_bytes() * 45 / 100,
            "{name}: {} of {}",
            encoder.weight_bytes(),
            dense.weight_bytes()
        );
    }
    // The dense T5 of the q8_0 weights dequantized.
    let mut tensors =
        candle_core::safetensors::load(dir.file("text_encoder/model.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, tensor) in tensors.iter_mut() {
        let layer = name.starts_with("encoder.block.")
            && (name.contains(".SelfAttention.") || name.contains(".DenseReluDense."))
            && !name.contains("relative_attention_bias");
        if layer {
            *tensor = QTensor::quantize(tensor, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
        }
    }
    let config = dir.read_json("text_encoder/config.json").unwrap();
    let dequantized = candela::engine::models::t5::T5Encoder::new(
        candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        config,
        &file.stored_dtypes(),
        WeightFormat::Dense.into(),
    )
    .unwrap();
    let t = load_tensors("stages/t5.safetensors");
    let ids = t["input_ids_77"].to_dtype(DType::U32).unwrap();
    let expected = dequantized.forward(&ids).unwrap();
    let largest = max_abs(&expected);
    let moved = max_abs_diff(&expected, &dense.forward(&ids).unwrap());
    assert!(
        moved > 1e-3 * largest,
        "the dequantized weights moved it by {moved}"
    );
    let compact = load_t5_as(&dir, DType::F32, format("q8_0-compact"))
        .forward(&ids)
        .unwrap();
    let d = max_abs_diff(&compact, &expected);
    eprintln!("t5 q8_0-compact vs its dequantized weights: {d} (largest {largest}, moved {moved})");
    assert!(d <= 1e-5 * largest, "q8_0-compact: {d}");
    let tiles = load_t5_as(&dir, DType::F32, format("q8_0"))
        .forward(&ids)
        .unwrap();
    let d = max_abs_diff(&tiles, &compact);
    eprintln!("t5 q8_0 vs q8_0-compact: {d} (largest {largest})");
    assert!(d <= largest / 64.0, "q8_0: {d}");
}

/// T5 (the SD3/FLUX text encoder): tokenizer ids (with `</s>`, truncation keeping it, padding)
/// and the encoder's last hidden state, against transformers.
#[test]
fn t5_tokenizer_and_encoder_match_transformers() {
    use candela::engine::tokenizer::T5Tokenizer;
    let dir = model_dir("t5-tiny");
    let tokenizer = T5Tokenizer::load(&dir, "tokenizer").unwrap();
    let encoder = load_t5(&dir, DType::F32);
    let prompts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stages/t5_prompts.json")).unwrap(),
    )
    .unwrap();
    let t = load_tensors("stages/t5.safetensors");
    for max_len in [16usize, 77] {
        let expected_ids: Vec<Vec<i64>> = t[&format!("input_ids_{max_len}")].to_vec2().unwrap();
        let mut rows = Vec::new();
        for (prompt, want) in prompts.iter().zip(&expected_ids) {
            let ids = tokenizer.encode_padded(prompt, max_len).unwrap();
            let ids_i64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            assert_eq!(&ids_i64, want, "ids of {prompt:?} at {max_len}");
            rows.push(Tensor::new(ids, &Device::Cpu).unwrap());
        }
        let ids = Tensor::stack(&rows, 0).unwrap();
        let hidden = encoder.forward(&ids).unwrap();
        let d = max_abs_diff(&hidden, &t[&format!("hidden_{max_len}")]);
        eprintln!("t5 hidden ({max_len} tokens): max diff {d}");
        assert!(d <= 1e-4, "T5 hidden states differ by {d}");
    }
}

/// T5 served in f16 (SD3 on a GPU with `--dtype f16`): a checkpoint whose feed-forward output
/// overflows f16, as T5-XXL v1.1's does on real prompts. transformers keeps `wo` in f32 and the
/// residual stream follows it there. With `wo` in f16 the states are 1.2 off here (infinities
/// clamped as transformers clamps them), NaN without the clamp (candle-transformers' T5, used
/// until session 18). Tolerance: 2⁻⁶ of the states' largest value. Each side is ~0.011 from the
/// f32 result (a few f16 roundings, step 2⁻¹¹ of a value, through two layers), 0.021 apart;
/// candle's f16 softmax (summing in f16) put ours 0.06 off.
#[test]
fn t5_in_f16_keeps_its_output_projection_in_f32_as_transformers_does() {
    let dir = model_dir("t5-tiny-f16");
    let encoder = load_t5(&dir, DType::F16);
    // Held as the memory planner counts it: `wo` in f16 here, since the file stores it so.
    let file = candela::engine::loader::weights::SafetensorsFile::open(
        &dir.file("text_encoder/model.safetensors"),
    )
    .unwrap();
    let planned = file.loaded_bytes_by(|tensor, stored| {
        candela::engine::models::t5::weight_dtype(tensor, stored, DType::F16, true)
    });
    assert_eq!(encoder.weight_bytes() as u64, planned);
    let t = load_tensors("stages/t5_f16.safetensors");
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = encoder.forward(&ids).unwrap();
    assert_eq!(hidden.dtype(), DType::F16);
    let expected = &t["hidden"];
    let values = hidden.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let finite = values
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite());
    assert!(finite, "T5 in f16 produced non-finite states");
    let d = max_abs_diff(&hidden, expected);
    let largest = max_abs(expected);
    eprintln!("t5 f16 hidden: max diff {d} (largest value {largest})");
    assert!(d <= largest / 64.0, "T5 f16 hidden states differ by {d}");
    // One prompt alone (the pipelines' batch, which adds the position bias without broadcasting).
    let one = encoder.forward(&ids.narrow(0, 2, 1).unwrap()).unwrap();
    let d = max_abs_diff(&one, &expected.narrow(0, 2, 1).unwrap());
    assert!(d <= largest / 64.0, "T5 f16, one prompt: {d}");
}

/// T5 stored in bf16 or f16 and run on the CPU in f32 (a CPU user's FLUX or SD3 T5) holds its
/// weights as stored, half the f32 model's memory, as the memory planner counts them, and
/// computes what transformers computes from the same file in f32.
#[test]
fn t5_stored_in_half_runs_in_f32_on_the_cpu_from_weights_held_as_stored() {
    use candela::engine::loader::weights::SafetensorsFile;
    use candela::engine::models::t5::weight_dtype;
    let t = load_tensors("stages/t5_stored_half.safetensors");
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let f32_model = load_t5(&model_dir("t5-tiny"), DType::F32).weight_bytes();
    for name in ["bf16", "f16"] {
        let dir = model_dir(&format!("t5-tiny-{name}"));
        let encoder = load_t5(&dir, DType::F32);
        let file = SafetensorsFile::open(&dir.file("text_encoder/model.safetensors")).unwrap();
        let planned =
            file.loaded_bytes_by(|tensor, stored| weight_dtype(tensor, stored, DType::F32, true));
        assert_eq!(
            encoder.weight_bytes() as u64,
            planned,
            "{name}: held vs planned"
        );
        // Everything but the norms' scales and the position-bias table (f32) at 2 bytes.
        assert!(
            encoder.weight_bytes() < f32_model * 52 / 100,
            "{name}: {} bytes held, {f32_model} in f32",
            encoder.weight_bytes()
        );
        let hidden = encoder.forward(&ids).unwrap();
        assert_eq!(hidden.dtype(), DType::F32);
        let expected = &t[&format!("hidden_{name}")];
        let d = max_abs_diff(&hidden, expected);
        eprintln!("t5 stored in {name}, run in f32: max diff {d}");
        assert!(
            d <= 1e-4 * max_abs(expected).max(1.0),
            "{name}: differs by {d}"
        );
        let one = encoder.forward(&ids.narrow(0, 2, 1).unwrap()).unwrap();
        let d = max_abs_diff(&one, &expected.narrow(0, 2, 1).unwrap());
        assert!(
            d <= 1e-4 * max_abs(expected).max(1.0),
            "{name}, one prompt: {d}"
        );
    }
}

/// CLIP stored in f16 and run on the CPU in f32 (SD3's and FLUX's CLIPs on a CPU) holds its
/// Linear weights and embeddings as stored, as the memory planner counts them, and computes
/// what transformers computes from the same file in f32: the penultimate state and the
/// projected pooled output (biases and `text_projection` included).
#[test]
fn clip_stored_in_half_runs_in_f32_on_the_cpu_from_weights_held_as_stored() {
    use candela::engine::loader::weights::SafetensorsFile;
    use candela::engine::models::{clip::ClipTextModel, cpu_half_linear::held_dtype};
    let load = |dir: &ModelDir, folder: &str| {
        let file =
            SafetensorsFile::open(&dir.file(&format!("{folder}/model.safetensors"))).unwrap();
        let stored = file.stored_dtypes();
        let planned =
            file.loaded_bytes_by(|tensor, stored| held_dtype(tensor, stored, DType::F32, true));
        let config = dir.read_json(&format!("{folder}/config.json")).unwrap();
        let model = ClipTextModel::new(
            file.into_var_builder(DType::F32, &Device::Cpu),
            config,
            &stored,
        )
        .unwrap();
        (model, planned)
    };
    let (f32_model, _) = load(&model_dir("sdxl-tiny"), "text_encoder_2");
    let (encoder, planned) = load(&model_dir("clip-tiny-f16"), "text_encoder");
    assert_eq!(encoder.weight_bytes() as u64, planned, "held vs planned");
    assert!(
        encoder.weight_bytes() < f32_model.weight_bytes() * 55 / 100,
        "{} bytes held, {} in f32",
        encoder.weight_bytes(),
        f32_model.weight_bytes()
    );
    let t = load_tensors("stages/clip_stored_half.safetensors");
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let (hidden, pooled) = encoder.forward_penultimate(&ids, 0).unwrap();
    for (name, ours, expected) in [
        ("penultimate", &hidden, &t["penultimate"]),
        ("pooled", &pooled, &t["pooled"]),
    ] {
        assert_eq!(ours.dtype(), DType::F32);
        let d = max_abs_diff(ours, expected);
        eprintln!("CLIP stored in f16, run in f32, {name}: max diff {d}");
        assert!(
            d <= 1e-4 * max_abs(expected).max(1.0),
            "{name}: differs by {d}"
        );
    }
}

/// The SD3/FLUX-style autoencoder (16 latent channels, no quant convs): encoder distribution and
/// decoder against diffusers (SD's 4-channel encoder is covered by the image-to-image runs).
#[test]
fn vae_encoder_and_16_channel_decoder_match_diffusers() {
    use candela::engine::loader::weights::SafetensorsFile;
    use candela::engine::models::vae::{VaeConfig, VaeDecoder, VaeEncoder};
    let dir = model_dir("vae16-tiny");
    let config_path = dir.file("vae/config.json");
    let config: VaeConfig = dir.read_json("vae/config.json").unwrap();
    assert_eq!(config.latent_channels, 16);
    let vb = || {
        SafetensorsFile::open(&dir.file("vae/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu)
    };
    let encoder = VaeEncoder::new(vb(), config.clone(), &config_path).unwrap();
    let decoder = VaeDecoder::new(vb(), config, &config_path).unwrap();
    let t = load_tensors("stages/vae16.safetensors");
    let (mean, std) = encoder.encode(&t["image"]).unwrap();
    let d = max_abs_diff(&mean, &t["mean"]).max(max_abs_diff(&std, &t["std"]));
    eprintln!("16-channel VAE encode: max diff {d}");
    assert!(
        d <= 1e-4 * max_abs(&t["mean"]).max(1.0),
        "encoder differs by {d}"
    );
    let decoded = decoder.decode(&t["latents"]).unwrap();
    let d = max_abs_diff(&decoded, &t["decoded"]);
    eprintln!("16-channel VAE decode: max diff {d}");
    assert!(
        d <= 1e-4 * max_abs(&t["decoded"]).max(1.0),
        "decoder differs by {d}"
    );
}

/// diffusers' tiled VAE decode (`enable_tiling()`): the tiny SD VAE (64-pixel tiles every 48,
/// 16-pixel blends) on 14 × 10 latents — a 3 × 2 grid with short edge tiles.
#[test]
fn tiled_vae_decode_matches_diffusers() {
    use candela::engine::loader::weights::SafetensorsFile;
    use candela::engine::models::vae::{VaeConfig, VaeDecoder};
    let dir = model_dir("sd1-tiny");
    let config_path = dir.file("vae/config.json");
    let config: VaeConfig = dir.read_json("vae/config.json").unwrap();
    assert_eq!(config.tile_pixels(), Some(64));
    let vb = SafetensorsFile::open(&dir.file("vae/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let decoder = VaeDecoder::new(vb, config, &config_path).unwrap();
    let t = load_tensors("stages/vae_tiled.safetensors");
    let tiled = decoder.decode_tiled(&t["latents"]).unwrap();
    assert_eq!(tiled.dims(), t["tiled"].dims());
    let d = max_abs_diff(&tiled, &t["tiled"]);
    eprintln!("tiled VAE decode: max diff {d}");
    assert!(
        d <= 1e-4 * max_abs(&t["tiled"]).max(1.0),
        "tiled decode differs by {d}"
    );
    // The seams are real: a whole decode of the same latents is far from the tiled one.
    let whole = decoder.decode(&t["latents"]).unwrap();
    assert!(max_abs_diff(&whole, &t["tiled"]) > 1e-2);
    // Latents within one tile decode whole.
    let small = t["latents"]
        .narrow(2, 0, 8)
        .unwrap()
        .narrow(3, 0, 8)
        .unwrap();
    assert_eq!(
        max_abs_diff(
            &decoder.decode_tiled(&small).unwrap(),
            &decoder.decode(&small).unwrap()
        ),
        0.0
    );
}

/// diffusers' tiled VAE encode (`enable_tiling()`, `_tiled_encode`): a 112 × 80 image in 64-pixel
/// tiles every 48, moments blended over 2 latents, then the distribution.
#[test]
fn tiled_vae_encode_matches_diffusers() {
    use candela::engine::loader::weights::SafetensorsFile;
    use candela::engine::models::vae::{VaeConfig, VaeEncoder};
    let dir = model_dir("sd1-tiny");
    let config_path = dir.file("vae/config.json");
    let config: VaeConfig = dir.read_json("vae/config.json").unwrap();
    let vb = SafetensorsFile::open(&dir.file("vae/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let encoder = VaeEncoder::new(vb, config, &config_path).unwrap();
    let t = load_tensors("stages/vae_tiled.safetensors");
    let (mean, std) = encoder.encode_tiled(&t["image"]).unwrap();
    assert_eq!(mean.dims(), t["mean"].dims());
    let d = max_abs_diff(&mean, &t["mean"]).max(max_abs_diff(&std, &t["std"]));
    eprintln!("tiled VAE encode: max diff {d}");
    assert!(
        d <= 1e-4 * max_abs(&t["mean"]).max(1.0),
        "tiled encode differs by {d}"
    );
    let (whole, _) = encoder.encode(&t["image"]).unwrap();
    assert!(
        max_abs_diff(&whole, &t["mean"]) > 1e-3,
        "the tiles made no difference"
    );
}

/// The UNet and VAE decoder at sizes where the CPU's 3×3 convolutions run their tile schedule,
/// F(4×4, 3×3) Winograd, whose rounding is larger than F(2×2)'s (the other stages' inputs are
/// too small to reach it): held to the same limits as every stage.
#[test]
fn unet_and_vae_match_diffusers_on_the_winograd_tile_path() {
    let t = load_tensors("stages/sd1_tiles.safetensors");
    assert_unet_and_vae_match("sd1 tiles", &load_pipeline("sd1-tiny"), &t);
}

/// T5 from a GGUF file in llama.cpp's naming (city96's `t5-v1_1-xxl-encoder-Q8_0.gguf` and its
/// kin: `enc.blk.N.attn_q`, `ffn_gate`, …; the naming itself is held to gguf-py's tensor map by
/// `flux_with_a_gguf_t5_matches_diffusers`, whose file gguf-py named),
/// its layers in q8_0 / q4_0 blocks, its embedding in f16: held as stored and multiplied held
/// once (`gguf-compact`) it computes what the dense T5 of the same values computes (the same f32
/// products: 1e-5 of the states' largest value); in the fastest products (q8_0 on int8 tiles
/// where the CPU has VNNI) within 2⁻⁶ of it, as `--quantize-t5`'s tiles are held.
#[test]
fn t5_from_a_gguf_file_computes_its_dequantized_weights() {
    use candela::engine::loader::single_file::{
        t5_source, Naming, SingleFileWeights, TransformerFile,
    };
    use candela::engine::loader::weights::StoredDtypes;
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = model_dir("t5-tiny");
    let tensors =
        candle_core::safetensors::load(dir.file("text_encoder/model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (mut stored, mut dequantized) = (Vec::new(), std::collections::HashMap::new());
    for (i, name) in names.into_iter().enumerate() {
        let t = tensors[name].to_dtype(DType::F32).unwrap();
        let layer = name.starts_with("encoder.block.")
            && (name.contains(".SelfAttention.") || name.contains(".DenseReluDense."))
            && !name.contains("relative_attention_bias");
        let format = match name.as_str() {
            _ if layer => [GgmlDType::Q8_0, GgmlDType::Q4_0][i % 2],
            "shared.weight" => GgmlDType::F16,
            _ => GgmlDType::F32,
        };
        let q = QTensor::quantize(&t, format).unwrap();
        dequantized.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
        stored.push((t5_source(name).unwrap(), q));
    }
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("t5-tiny-encoder-mixed.gguf");
    write_gguf(&gguf, "t5encoder", &stored);
    let config = || {
        dir.read_json::<serde_json::Value>("text_encoder/config.json")
            .unwrap()
    };
    let no_stored = StoredDtypes::ByName(Default::default());
    let dense = candela::engine::models::t5::T5Encoder::new(
        candle_nn::VarBuilder::from_tensors(dequantized, DType::F32, &Device::Cpu),
        config(),
        &no_stored,
        WeightFormat::Dense.into(),
    )
    .unwrap();
    let from_gguf = |format: &str| {
        let file = TransformerFile::open(&gguf).unwrap();
        let weights = std::sync::Arc::new(SingleFileWeights::new(file, Naming::T5).unwrap());
        candela::engine::models::t5::T5Encoder::new(
            weights.var_builder(DType::F32, &Device::Cpu),
            config(),
            &no_stored,
            candela::engine::models::quantized::LayerSource {
                format: format.parse().unwrap(),
                stored: Some(&*weights),
            },
        )
        .unwrap()
    };
    let t = load_tensors("stages/t5.safetensors");
    let ids = t["input_ids_77"].to_dtype(DType::U32).unwrap();
    let expected = dense.forward(&ids).unwrap();
    let largest = max_abs(&expected);
    let original = load_t5(&dir, DType::F32).forward(&ids).unwrap();
    assert!(max_abs_diff(&original, &expected) > 1e-3 * largest);
    let compact = from_gguf("gguf-compact").forward(&ids).unwrap();
    let d = max_abs_diff(&compact, &expected);
    eprintln!("t5 gguf-compact vs its dequantized weights: {d} (largest {largest})");
    assert!(d <= 1e-5 * largest, "gguf-compact: {d}");
    let fastest = from_gguf("gguf").forward(&ids).unwrap();
    let d = max_abs_diff(&fastest, &compact);
    eprintln!("t5 gguf (fastest) vs gguf-compact: {d}");
    assert!(d <= largest / 64.0, "gguf: {d}");
}
