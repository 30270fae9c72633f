//! Samplers step for step against diffusers: timesteps, sigmas and every `step()` output over a
//! whole run fed with the recorded model outputs (tools/reference/make_sampler_traces.py).

mod common;

use candela::engine::{
    rng::BatchNoise,
    schedulers::{self, SamplerKind, SamplerOptions, SchedulerConfig, SigmaSchedule},
};
use candle_core::{IndexOp, Tensor};
use serde::Deserialize;

#[derive(Deserialize)]
struct Traces {
    seed: u64,
    shape: Vec<usize>,
    traces: Vec<Trace>,
}

#[derive(Deserialize)]
struct Trace {
    name: String,
    config: String,
    sampler: String,
    schedule: String,
    timestep_spacing: String,
    steps: usize,
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
    /// Model-config keys set on top of the base config.
    overrides: serde_json::Map<String, serde_json::Value>,
    /// Per-job options, as a request would set them.
    options: TraceOptions,
}

#[derive(Deserialize, Default)]
struct TraceOptions {
    solver_order: Option<usize>,
    image_seq_len: Option<usize>,
    flow_sigmas: Option<Vec<f32>>,
}

#[test]
fn every_sampler_matches_diffusers_step_for_step() {
    let fx = common::fixtures().join("samplers");
    let index: Traces =
        serde_json::from_str(&std::fs::read_to_string(fx.join("traces.json")).unwrap()).unwrap();
    let tensors = common::load_tensors("samplers/traces.safetensors.gz");
    let mut checked = 0;
    let mut worst = 0f32;
    for tr in &index.traces {
        let config_path = match tr.config.as_str() {
            "sd3" => fx.join("sd3_scheduler_config.json"),
            "flux" => fx.join("flux_scheduler_config.json"),
            "sd1" => common::fixtures().join("models/sd1-tiny/scheduler/scheduler_config.json"),
            _ => common::fixtures().join("models/sd2-tiny/scheduler/scheduler_config.json"),
        };
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
        let fields = config.as_object_mut().unwrap();
        fields.insert(
            "timestep_spacing".into(),
            serde_json::Value::String(tr.timestep_spacing.clone()),
        );
        fields.extend(tr.overrides.clone());
        let config: SchedulerConfig = serde_json::from_value(config).unwrap();
        let kind: SamplerKind = tr.sampler.parse().unwrap();
        let schedule: SigmaSchedule = tr.schedule.parse().unwrap();
        let options = SamplerOptions {
            solver_order: tr.options.solver_order,
            image_seq_len: tr.options.image_seq_len,
            flow_sigmas: tr.options.flow_sigmas.clone(),
        };
        let mut sampler = schedulers::build_with(&config, kind, schedule, tr.steps, &options)
            .unwrap_or_else(|e| panic!("{}: {e}", tr.name));

        let ts = sampler.timesteps().to_vec();
        assert_eq!(
            ts.len(),
            tr.timesteps.len(),
            "{}: timesteps {ts:?} vs {:?}",
            tr.name,
            tr.timesteps
        );
        for (a, b) in ts.iter().zip(&tr.timesteps) {
            assert!(
                (*a as f64 - b).abs() <= 1e-3,
                "{}: timesteps {ts:?} vs {:?}",
                tr.name,
                tr.timesteps
            );
        }
        if let (Some(ours), Some(theirs)) = (sampler.sigmas(), &tr.sigmas) {
            assert_eq!(ours.len(), theirs.len(), "{}: sigma count", tr.name);
            for (a, b) in ours.iter().zip(theirs) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * b.max(1.0),
                    "{}: sigmas {ours:?} vs {theirs:?}",
                    tr.name
                );
            }
        }
        assert!(
            (sampler.init_noise_sigma() as f64 - tr.init_noise_sigma).abs()
                <= 1e-5 * tr.init_noise_sigma.max(1.0),
            "{}",
            tr.name
        );

        let inputs = &tensors[&format!("{}/inputs", tr.name)];
        let outputs = &tensors[&format!("{}/model_outputs", tr.name)];
        let samples = &tensors[&format!("{}/samples", tr.name)];
        // The run's noise stream: the initial latents are the first draw, as in the pipeline.
        let mut rng = BatchNoise::single(index.seed, index.shape[0]);
        let numel: usize = index.shape.iter().product();
        let first = Tensor::from_vec(
            rng.randn(numel).unwrap(),
            index.shape.as_slice(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let ours = (first * sampler.init_noise_sigma() as f64).unwrap();
        // torch's vectorised randn differs from ours by ~1 ulp (see the randn test), scaled by init sigma.
        let d = common::max_abs_diff(&ours, &samples.i(0).unwrap());
        assert!(
            d <= 2e-6 * tr.init_noise_sigma.max(1.0) as f32,
            "{}: initial sample differs by {d}",
            tr.name
        );
        // Start from diffusers' own initial sample so each step is checked on identical input.
        let mut x = samples.i(0).unwrap();
        for i in 0..ts.len() {
            let inp = sampler.scale_model_input(&x, i).unwrap();
            let d = common::max_abs_diff(&inp, &inputs.i(i).unwrap());
            assert!(
                d <= 1e-5,
                "{}: scaled input at step {i} differs by {d}",
                tr.name
            );
            // Feed diffusers' recorded model output, and compare against diffusers' next sample.
            x = sampler
                .step(&outputs.i(i).unwrap(), i, &x, &mut rng)
                .unwrap();
            let d = common::max_abs_diff(&x, &samples.i(i + 1).unwrap());
            // Zero-terminal-SNR schedules start at sigma 4096 = sqrt(2^24 - 1), which torch's
            // vectorised sqrt rounds up and a correctly rounded sqrt rounds down (1 ulp). The
            // first step then cancels a sample of ~1e4 down to ~1, so that ulp comes back as
            // about one ulp of the *input*: bound such steps by 2 ulp of |x_i| instead.
            let sigma_i = sampler.sigmas().map_or(0.0, |s| s[i.min(s.len() - 1)]);
            let cancellation_floor = if sigma_i >= 1000.0 {
                2.0 * f32::EPSILON * common::max_abs(&samples.i(i).unwrap())
            } else {
                worst = worst.max(d);
                0.0
            };
            assert!(
                d <= (1e-5 * common::max_abs(&samples.i(i + 1).unwrap()).max(1.0))
                    .max(cancellation_floor),
                "{}: step {i} differs by {d}",
                tr.name
            );
            x = samples.i(i + 1).unwrap(); // keep errors from compounding: each step is checked on its own input
        }
        checked += 1;
    }
    eprintln!("{checked} traces, worst step difference {worst} (steps from sigma < 1000)");
    assert!(checked >= 100, "only {checked} traces");
}

#[test]
fn a1111_names_map_to_samplers_and_schedules() {
    let cases = [
        (
            "DPM++ 2M Karras",
            SamplerKind::DpmPp2m,
            Some(SigmaSchedule::Karras),
        ),
        ("dpmpp_2m_sde_gpu", SamplerKind::DpmPp2mSde, None),
        ("Euler a", SamplerKind::EulerA, None),
        ("euler_a", SamplerKind::EulerA, None),
        ("DDIM", SamplerKind::Ddim, None),
        (
            "DPM++ 2M SDE Karras",
            SamplerKind::DpmPp2mSde,
            Some(SigmaSchedule::Karras),
        ),
    ];
    for (name, kind, schedule) in cases {
        assert_eq!(
            SamplerKind::parse_with_schedule(name).unwrap(),
            (kind, schedule),
            "{name}"
        );
    }
    assert!(SamplerKind::parse_with_schedule("heun9").is_err());
    // Everything advertised in /v1/models and the OpenAPI schema parses.
    for name in SamplerKind::accepted_names() {
        let (kind, schedule) = SamplerKind::parse_with_schedule(&name)
            .unwrap_or_else(|e| panic!("advertised `{name}` does not parse: {e}"));
        if let Some(schedule) = schedule {
            kind.check_schedule(schedule)
                .unwrap_or_else(|e| panic!("advertised `{name}`: {e}"));
        }
    }
    assert_eq!(
        SamplerKind::parse_with_schedule("Euler SGM Uniform").unwrap(),
        (SamplerKind::Euler, Some(SigmaSchedule::SgmUniform))
    );
    assert_eq!(
        SamplerKind::parse_with_schedule("UniPC").unwrap(),
        (SamplerKind::UniPc, None)
    );
    let err = SamplerKind::EulerA
        .check_schedule(SigmaSchedule::Karras)
        .unwrap_err();
    assert!(matches!(
        err,
        candela::engine::EngineError::Incompatible {
            param: "schedule",
            ..
        }
    ));
}

#[derive(Deserialize)]
struct Img2ImgTrace {
    name: String,
    config: String,
    sampler: String,
    timestep_spacing: String,
    steps: usize,
    begin: usize,
    order: usize,
}

#[derive(Deserialize)]
struct Img2ImgTraces {
    seed: u64,
    shape: Vec<usize>,
    traces: Vec<Img2ImgTrace>,
}

/// Image-to-image starts: the first evaluation (`t_start × order`), `add_noise` there, and every
/// step from there, against diffusers (pipelines call `set_begin_index` and slice the timesteps).
#[test]
fn img2img_starts_match_diffusers() {
    let fx = common::fixtures().join("samplers");
    let index: Img2ImgTraces =
        serde_json::from_str(&std::fs::read_to_string(fx.join("img2img.json")).unwrap()).unwrap();
    let tensors = common::load_tensors("samplers/img2img.safetensors");
    let mut checked = 0;
    for tr in &index.traces {
        let folder = if tr.config == "sd1" {
            "sd1-tiny"
        } else {
            "sd2-tiny"
        };
        let path =
            common::fixtures().join(format!("models/{folder}/scheduler/scheduler_config.json"));
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        config["timestep_spacing"] = tr.timestep_spacing.clone().into();
        let config: SchedulerConfig = serde_json::from_value(config).unwrap();
        let kind: SamplerKind = tr.sampler.parse().unwrap();
        let mut sampler =
            schedulers::build(&config, kind, SigmaSchedule::Default, tr.steps).unwrap();
        assert_eq!(sampler.order(), tr.order, "{}: order", tr.name);
        let t = |k: &str| tensors[&format!("{}/{k}", tr.name)].clone();
        let samples = t("samples");
        let noisy = sampler.add_noise(&t("x0"), &t("noise"), tr.begin).unwrap();
        let d = common::max_abs_diff(&noisy, &samples.i(0).unwrap());
        assert!(
            d <= 1e-5 * common::max_abs(&noisy).max(1.0),
            "{}: add_noise differs by {d}",
            tr.name
        );

        // The pipeline's generator drew x0 and the noise before the steps.
        let mut rng = BatchNoise::single(index.seed, index.shape[0]);
        let numel: usize = index.shape.iter().product();
        rng.randn(2 * numel).unwrap();
        let (inputs, outputs) = (t("inputs"), t("model_outputs"));
        let mut x = samples.i(0).unwrap();
        for (k, i) in (tr.begin..sampler.timesteps().len()).enumerate() {
            let inp = sampler.scale_model_input(&x, i).unwrap();
            let d = common::max_abs_diff(&inp, &inputs.i(k).unwrap());
            assert!(
                d <= 1e-5,
                "{}: scaled input at step {i} differs by {d}",
                tr.name
            );
            x = sampler
                .step(&outputs.i(k).unwrap(), i, &x, &mut rng)
                .unwrap();
            let want = samples.i(k + 1).unwrap();
            let d = common::max_abs_diff(&x, &want);
            assert!(
                d <= 1e-5 * common::max_abs(&want).max(1.0),
                "{}: step {i} differs by {d}",
                tr.name
            );
            x = want;
        }
        checked += 1;
    }
    assert!(checked >= 100, "only {checked} traces");
}
