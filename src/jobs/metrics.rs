//! Prometheus metrics of the scheduler (`GET /metrics`, text exposition format).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub queue_depth: Gauge,
    pub running_jobs: Gauge,
    /// Jobs that left the engine, by final status.
    pub jobs_finished: Family<Labels, Counter>,
    pub step_seconds: Histogram,
    /// Denoising runs and the jobs they served (jobs / batches = mean batch size).
    pub batches: Counter,
    pub batched_jobs: Counter,
    pub model_loads: Family<Labels, Counter>,
    pub model_evictions: Family<Labels, Counter>,
    pub memory_used_bytes: Family<Labels, Gauge<u64, AtomicU64>>,
    pub memory_budget_bytes: Family<Labels, Gauge<u64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("candela");
        let queue_depth = Gauge::default();
        let running_jobs = Gauge::default();
        let jobs_finished = Family::<Labels, Counter>::default();
        let step_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let batches = Counter::default();
        let batched_jobs = Counter::default();
        let model_loads = Family::<Labels, Counter>::default();
        let model_evictions = Family::<Labels, Counter>::default();
        let memory_used_bytes = Family::<Labels, Gauge<u64, AtomicU64>>::default();
        let memory_budget_bytes = Family::<Labels, Gauge<u64, AtomicU64>>::default();
        registry.register("queue_depth", "Jobs waiting to run", queue_depth.clone());
        registry.register(
            "running_jobs",
            "Jobs in the current denoising run",
            running_jobs.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that left the engine, by status",
            jobs_finished.clone(),
        );
        registry.register(
            "step_seconds",
            "Time of one denoising step (whole batch)",
            step_seconds.clone(),
        );
        registry.register("batches", "Denoising runs", batches.clone());
        registry.register(
            "batched_jobs",
            "Jobs served by denoising runs",
            batched_jobs.clone(),
        );
        registry.register(
            "model_loads",
            "Models loaded onto a device",
            model_loads.clone(),
        );
        registry.register(
            "model_evictions",
            "Models evicted to make room",
            model_evictions.clone(),
        );
        registry.register(
            "memory_used_bytes",
            "Estimated resident model weights per device",
            memory_used_bytes.clone(),
        );
        registry.register(
            "memory_budget_bytes",
            "Memory budget per device",
            memory_budget_bytes.clone(),
        );
        Self {
            registry,
            queue_depth,
            running_jobs,
            jobs_finished,
            step_seconds,
            batches,
            batched_jobs,
            model_loads,
            model_evictions,
            memory_used_bytes,
            memory_budget_bytes,
        }
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
