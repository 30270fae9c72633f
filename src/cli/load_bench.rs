//! `candela bench --server-load`: drive a real `candela serve` (started in-process on a free
//! loopback port, embedded demo model, throw-away data directory) with concurrent HTTP clients,
//! and report the scheduler's overhead per job and the throughput with and without batching.
//!
//! Overhead per job = median latency of one request at a time over HTTP (parse, validate, job
//! row, queue, worker hand-off, PNG encoding, image store, response) minus the median time of
//! the same generation called directly on the pipeline.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::CommonArgs;
use crate::api::Limits;
use crate::auth::AuthSettings;
use crate::engine::{
    demo,
    loader::{ModelDir, ModelSource},
    pipelines::sd::{GenerateParams, StableDiffusion},
    schedulers::{SamplerKind, SigmaSchedule},
};
use crate::jobs::{MemoryBudget, ModelSpec};
use crate::server::{self, RestartPolicy, ServerConfig};

pub struct LoadSettings {
    pub clients: usize,
    pub requests: usize,
    pub size: usize,
    pub steps: usize,
}

struct Pass {
    label: String,
    clients: usize,
    jobs: usize,
    wall_s: f64,
    mean_batch: f64,
    latencies_ms: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn metric(url: &str, name: &str) -> f64 {
    ureq::get(&format!("{url}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn body(settings: &LoadSettings, seed: usize) -> serde_json::Value {
    serde_json::json!({
        "prompt": format!("a lighthouse, variation {seed}"),
        "size": format!("{0}x{0}", settings.size),
        "steps": settings.steps,
        "seed": seed,
        "sampler": "euler_a",
    })
}

/// `clients` threads each send `requests / clients` requests back to back.
fn drive(
    url: &str,
    token: &str,
    settings: &LoadSettings,
    clients: usize,
    label: &str,
) -> anyhow::Result<Pass> {
    let per_client = (settings.requests / clients).max(1);
    let (batches0, jobs0) = (
        metric(url, "candela_batches_total"),
        metric(url, "candela_batched_jobs_total"),
    );
    let started = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(600))
                        .build();
                    let mut out = Vec::new();
                    for r in 0..per_client {
                        let t = Instant::now();
                        agent
                            .post(&format!("{url}/v1/images/generations"))
                            .set("Authorization", &format!("Bearer {token}"))
                            .send_json(body(settings, c * 1000 + r))
                            .context("request failed")?;
                        out.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => all.extend(r?),
                Err(_) => anyhow::bail!("a client thread panicked"),
            }
        }
        Ok(all)
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    let batches = metric(url, "candela_batches_total") - batches0;
    let jobs = metric(url, "candela_batched_jobs_total") - jobs0;
    let mut latencies_ms = latencies;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Pass {
        label: label.to_string(),
        clients,
        jobs: latencies_ms.len(),
        wall_s,
        mean_batch: if batches > 0.0 { jobs / batches } else { 0.0 },
        latencies_ms,
    })
}

pub fn run(common: &CommonArgs, settings: LoadSettings) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("candela-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let model_root = demo::install(&common.data_dir.join("models"))?;

    // The same generation called directly, for the overhead baseline.
    let pipeline = StableDiffusion::load(
        &ModelDir {
            root: model_root.clone(),
            prefer_fp16_variant: false,
        },
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let mut direct = Vec::new();
    for seed in 0..9u64 {
        let p = GenerateParams {
            transformer: Default::default(),
            prompt: format!("a lighthouse, variation {seed}"),
            negative_prompt: None,
            width: settings.size,
            height: settings.size,
            steps: settings.steps,
            guidance_scale: 7.5,
            seed,
            sampler: SamplerKind::EulerA,
            schedule: SigmaSchedule::Default,
            solver_order: None,
            n: 1,
            clip_skip: 0,
            refiner: None,
            stage: None,
            init: None,
        };
        let t = Instant::now();
        pipeline.generate(&p, &mut |_| true)?;
        if seed > 0 {
            direct.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    direct.sort_by(f64::total_cmp);
    let direct_ms = percentile(&direct, 0.5);
    drop(pipeline);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut passes = Vec::new();
    let mut sequential_ms = f64::NAN;
    for (label, max_batch) in [("no batching", 1usize), ("batching (max 8)", 8)] {
        let data_dir = scratch.join(label.split(' ').next().unwrap_or("run"));
        let auth = AuthSettings {
            secret_file: None,
            public_key: None,
            algorithm: None,
            issuer: None,
            audience: None,
        };
        let config = ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            data_dir: data_dir.clone(),
            models: vec![ModelSpec {
                source: ModelSource::Local(model_root.clone()),
                options: Default::default(),
                name: None,
                transformer: None,
                t5: None,
            }],
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::F32,
            hub: common.hub_options(),
            auth: auth.clone(),
            public_url: None,
            limits: Limits::default(),
            queue_capacity: settings.requests.max(64),
            workers: 4,
            max_batch_jobs: max_batch,
            max_batch_rows: 8,
            memory_budget: MemoryBudget::Fraction(0.5),
            job_timeout: None,
            on_restart: RestartPolicy::Fail,
            shutdown_grace: Duration::from_secs(5),
        };
        let running = runtime.block_on(server::start(config))?;
        let url = running.url.clone();
        let handle = running.server.handle();
        runtime.spawn(running.server);
        let token = server::startup_token(&data_dir, &auth)
            .context("could not mint a token for the load test")?;
        // Warm-up, then one request at a time (the overhead), then concurrent clients.
        drive(&url, &token, &settings, 1, "warm-up")?;
        if max_batch == 1 {
            let seq = drive(
                &url,
                &token,
                &LoadSettings {
                    requests: 8,
                    ..settings
                },
                1,
                "one at a time",
            )?;
            sequential_ms = percentile(&seq.latencies_ms, 0.5);
            passes.push(seq);
        }
        passes.push(drive(&url, &token, &settings, settings.clients, label)?);
        runtime.block_on(handle.stop(true));
    }
    let _ = std::fs::remove_dir_all(&scratch);

    println!(
        "Server load on loopback: demo model, {0}x{0}, {1} steps, euler_a, CFG; {2} requests per pass",
        settings.size, settings.steps, settings.requests
    );
    println!();
    println!("| pass | clients | jobs | wall s | jobs/s | mean batch | p50 latency ms | p95 latency ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for p in &passes {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            p.label,
            p.clients,
            p.jobs,
            p.wall_s,
            p.jobs as f64 / p.wall_s,
            p.mean_batch,
            percentile(&p.latencies_ms, 0.5),
            percentile(&p.latencies_ms, 0.95)
        );
    }
    println!();
    println!(
        "direct pipeline call (median of 8): {direct_ms:.1} ms; over HTTP one at a time: {sequential_ms:.1} ms; \
         scheduling + HTTP overhead per job: {:.1} ms",
        sequential_ms - direct_ms
    );
    Ok(())
}
