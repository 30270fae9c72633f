//! The device worker: one thread that owns the loaded pipelines, takes batches from the queue,
//! keeps resident models within the memory budget and runs the denoising.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{
    announce_positions, metrics, Catalogued, GenerateOutput, JobEvent, Outcome, Pending, QueueKey,
    Shared,
};
use crate::engine::pipelines::{params::GenerateParams, Pipeline};
use crate::engine::{EngineError, Progress};

type Batch = Vec<super::queue::Entry<Pending, QueueKey>>;

struct Worker {
    shared: Arc<Shared>,
    catalog: Arc<Vec<Catalogued>>,
    loaded: HashMap<String, Pipeline>,
}

pub(super) fn spawn(
    shared: Arc<Shared>,
    catalog: Arc<Vec<Catalogued>>,
    ready: oneshot::Sender<Result<(), EngineError>>,
) -> Result<(), EngineError> {
    std::thread::Builder::new()
        .name("candela-engine".into())
        .spawn(move || {
            let mut worker = Worker {
                shared,
                catalog,
                loaded: HashMap::new(),
            };
            match worker.preload() {
                Ok(()) => {
                    if ready.send(Ok(())).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
            worker.run();
        })
        .map(|_| ())
        .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))
}

impl Worker {
    /// Load models in order while they fit next to each other (each keeping room for a
    /// default-size image); a broken model fails start-up here rather than on first use.
    fn preload(&mut self) -> Result<(), EngineError> {
        let catalog = self.catalog.clone();
        for model in catalog.iter() {
            let info = &model.info;
            let activation = model.footprint.activation_bytes(
                1,
                info.default_width,
                info.default_height,
                crate::engine::pipelines::params::Guidance::DEFAULT,
            );
            let fits = {
                let state = self.shared.lock();
                state
                    .residency
                    .plan(&info.id, model.footprint.weights_bytes(), activation)
                    .is_ok_and(|evict| evict.is_empty())
            };
            if fits {
                self.load(model)?;
            } else {
                tracing::info!(model = %info.id, "not preloaded (memory budget); loads on first use");
            }
        }
        Ok(())
    }

    fn load(&mut self, model: &Catalogued) -> Result<(), EngineError> {
        let started = Instant::now();
        let config = &self.shared.config;
        let pipeline = Pipeline::load(&model.dir, &config.device, config.dtype, &model.options)?;
        self.loaded.insert(model.info.id.clone(), pipeline);
        self.shared
            .lock()
            .residency
            .loaded(&model.info.id, model.footprint.weights_bytes());
        self.shared
            .metrics
            .model_loads
            .get_or_create(&metrics::labels(&[("model", &model.info.id)]))
            .inc();
        tracing::info!(model = %model.info.id, seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "model loaded");
        Ok(())
    }

    fn evict(&mut self, model: &str) {
        self.loaded.remove(model);
        self.shared.lock().residency.evicted(model);
        self.shared
            .metrics
            .model_evictions
            .get_or_create(&metrics::labels(&[("model", model)]))
            .inc();
        tracing::info!(model, "model evicted to make room");
    }

    fn run(&mut self) {
        while let Some(batch) = self.next_batch() {
            self.serve(batch);
        }
        tracing::info!("engine worker stopped");
    }

    /// Wait for work; `None` once the engine is stopping and nothing is left.
    fn next_batch(&self) -> Option<Batch> {
        let shared = &self.shared;
        let mut state = shared.lock();
        loop {
            // Queued jobs past their deadline fail without running.
            let now = Instant::now();
            let live = &state.live;
            let expired_ids: Vec<String> = state
                .queue
                .ids()
                .into_iter()
                .filter(|id| {
                    live.get(id)
                        .and_then(|l| l.deadline)
                        .is_some_and(|d| d <= now)
                })
                .collect();
            if !expired_ids.is_empty() {
                for id in expired_ids {
                    if let Some(entry) = state.queue.remove(&id) {
                        let _ = entry.item.reply.send(Err(self.timeout_error()));
                    }
                }
                announce_positions(&mut state);
            }
            if state.stopping && state.queue.is_empty() {
                return None;
            }
            if !state.paused && !state.queue.is_empty() {
                let config = &shared.config;
                let catalog = &self.catalog;
                let residency_budget = state.residency.budget();
                // Rows of a batch are bounded by the config and by what fits next to the model.
                let max_rows = |key: &QueueKey| -> usize {
                    let Some(model) = catalog.iter().find(|m| m.info.id == key.model) else {
                        return 1;
                    };
                    let (w, h, guidance) = key.batch.geometry();
                    let weights = model.footprint.weights_bytes();
                    (1..=config.max_batch_rows.max(1))
                        .take_while(|&rows| {
                            weights + model.footprint.activation_bytes(rows, w, h, guidance)
                                <= residency_budget
                        })
                        .last()
                        .unwrap_or(1)
                };
                let batch = state
                    .queue
                    .pop_batch(config.max_batch_jobs.max(1), max_rows);
                announce_positions(&mut state);
                shared.metrics.queue_depth.set(state.queue.len() as i64);
                if !batch.is_empty() {
                    for entry in &batch {
                        if let Some(live) = state.live.get_mut(&entry.id) {
                            live.progress.state = "running".into();
                            live.progress.queue_position = None;
                            live.progress.batch_size = Some(batch.len());
                            live.progress.total = entry.item.params.steps;
                            let _ = live.events.send(JobEvent::Started {
                                batch_size: batch.len(),
                            });
                        }
                    }
                    shared.metrics.running_jobs.set(batch.len() as i64);
                    return Some(batch);
                }
            }
            // Wake up for new work, resume, shutdown, or to expire deadlines.
            state = shared
                .wake
                .wait_timeout(state, Duration::from_millis(500))
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn timeout_error(&self) -> EngineError {
        EngineError::Timeout {
            seconds: self.shared.config.job_timeout.map_or(0, |t| t.as_secs()),
        }
    }

    /// Run a batch and reply to each job. Out of memory: unload every other model and retry
    /// once with each job on its own, then fail.
    fn serve(&mut self, batch: Batch) {
        let model_id = batch[0].batch_key.model.clone();
        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
        let params: Vec<GenerateParams> = batch.iter().map(|e| e.item.params.clone()).collect();
        let replies: Vec<oneshot::Sender<Outcome>> =
            batch.into_iter().map(|e| e.item.reply).collect();
        self.shared.metrics.batches.inc();
        self.shared.metrics.batched_jobs.inc_by(ids.len() as u64);

        let mut results = self.run_guarded(&model_id, &ids, &params);
        if let Err(e) = &results {
            if e.is_out_of_memory() {
                tracing::warn!(model = %model_id, error = %e, jobs = ids.len(), "out of memory; unloading other models and retrying one job at a time");
                let others: Vec<String> = self
                    .loaded
                    .keys()
                    .filter(|m| **m != model_id)
                    .cloned()
                    .collect();
                for m in others {
                    self.evict(&m);
                }
                results = ids
                    .iter()
                    .zip(&params)
                    .map(|(id, p)| {
                        self.run_guarded(
                            &model_id,
                            std::slice::from_ref(id),
                            std::slice::from_ref(p),
                        )
                        .and_then(|mut v| {
                            v.pop()
                                .ok_or_else(|| EngineError::Internal("empty result".into()))
                        })
                    })
                    .map(|r| {
                        r.map_err(|e| {
                            if e.is_out_of_memory() {
                                EngineError::OutOfMemory(format!(
                                    "{e} (after unloading other models and running alone)"
                                ))
                            } else {
                                e
                            }
                        })
                    })
                    // Run every job before reporting, as the batch would have.
                    .collect::<Vec<_>>()
                    .into_iter()
                    .collect();
            }
        }

        let mut state = self.shared.lock();
        let batch_size = ids.len();
        for (i, (id, reply)) in ids.iter().zip(replies).enumerate() {
            let live = state.live.get(id);
            let cancelled = live.is_some_and(|l| l.cancel);
            let shutdown = live.is_some_and(|l| l.shutdown);
            let expired = live
                .and_then(|l| l.deadline)
                .is_some_and(|d| d <= Instant::now());
            let outcome = if shutdown {
                Err(EngineError::ShuttingDown)
            } else if cancelled {
                Err(EngineError::Cancelled)
            } else if expired {
                Err(self.timeout_error())
            } else {
                match &mut results {
                    Ok(outputs) => outputs
                        .get_mut(i)
                        .map(|o| {
                            Ok(GenerateOutput {
                                images: std::mem::take(&mut o.images),
                                seed: o.seed,
                                seconds: o.seconds,
                                batch_size,
                            })
                        })
                        .unwrap_or_else(|| Err(EngineError::Internal("missing result".into()))),
                    Err(e) => Err(clone_error(e)),
                }
            };
            if let Some(l) = state.live.get_mut(id) {
                l.progress.state = "finishing".into();
            }
            if reply.send(outcome).is_err() {
                // Nobody waits for it any more (the runner is gone): forget it here.
                state.live.remove(id);
            }
        }
        self.shared.metrics.running_jobs.set(0);
    }

    /// Load the model if needed (evicting least-recently-used idle ones), then denoise; a
    /// panic inside candle fails these jobs, not the worker.
    fn run_guarded(
        &mut self,
        model_id: &str,
        ids: &[String],
        params: &[GenerateParams],
    ) -> Result<Vec<Finished>, EngineError> {
        self.make_resident(model_id, params)?;
        self.shared.lock().residency.set_busy(model_id, true);
        // A two-stage job needs its refiner resident too (the busy base is never evicted for it).
        let refiner = params.first().and_then(|p| p.refiner.clone());
        if let Some(r) = &refiner {
            if let Err(e) = self.make_resident(&r.model, params) {
                self.shared.lock().residency.set_busy(model_id, false);
                return Err(e);
            }
            self.shared.lock().residency.set_busy(&r.model, true);
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.denoise(model_id, ids, params)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            tracing::error!(
                panic = what,
                "generation panicked; the engine keeps running"
            );
            Err(EngineError::Internal(format!(
                "internal error during generation: {what}"
            )))
        });
        let mut state = self.shared.lock();
        state.residency.set_busy(model_id, false);
        state.residency.touch(model_id);
        if let Some(r) = &refiner {
            state.residency.set_busy(&r.model, false);
            state.residency.touch(&r.model);
        }
        result
    }

    fn make_resident(
        &mut self,
        model_id: &str,
        params: &[GenerateParams],
    ) -> Result<(), EngineError> {
        let model = self
            .catalog
            .iter()
            .find(|m| m.info.id == model_id)
            .cloned()
            .ok_or_else(|| EngineError::ModelNotFound(model_id.to_string()))?;
        let rows: usize = params.iter().map(|p| p.n).sum();
        let (w, h, guidance) = params
            .first()
            .map(|p| (p.width, p.height, p.guidance()))
            .unwrap_or((0, 0, crate::engine::pipelines::params::Guidance::DEFAULT));
        let activation = model.footprint.activation_bytes(rows, w, h, guidance);
        let plan = self.shared.lock().residency.plan(
            model_id,
            model.footprint.weights_bytes(),
            activation,
        );
        let evict =
            plan.map_err(|e| EngineError::OutOfMemory(format!("model `{model_id}` {e}")))?;
        for m in evict {
            self.evict(&m);
        }
        if !self.loaded.contains_key(model_id) {
            self.load(&model)?;
        }
        Ok(())
    }

    fn denoise(
        &self,
        model_id: &str,
        ids: &[String],
        params: &[GenerateParams],
    ) -> Result<Vec<Finished>, EngineError> {
        let pipeline = self
            .loaded
            .get(model_id)
            .ok_or_else(|| EngineError::ModelNotFound(model_id.to_string()))?;
        let started = Instant::now();
        let mut last_step = Instant::now();
        let mut last_log = Instant::now();
        let shared = &self.shared;
        let mut on_step = |p: Progress| {
            let step_seconds = last_step.elapsed().as_secs_f64();
            last_step = Instant::now();
            shared.metrics.step_seconds.observe(step_seconds);
            let eta = if p.step > 0 {
                p.elapsed_s / p.step as f64 * (p.total - p.step) as f64
            } else {
                0.0
            };
            if p.step == p.total || last_log.elapsed().as_secs_f64() >= 2.0 {
                tracing::info!(
                    model = model_id,
                    jobs = ids.len(),
                    step = p.step,
                    total = p.total,
                    steps_per_s = format!("{:.2}", p.steps_per_second()),
                    "denoising"
                );
                last_log = Instant::now();
            }
            let mut state = shared.lock();
            let now = Instant::now();
            let mut any_wanted = false;
            for id in ids {
                if let Some(live) = state.live.get_mut(id) {
                    live.progress.step = p.step;
                    live.progress.total = p.total;
                    live.progress.step_seconds = Some(step_seconds);
                    live.progress.eta_seconds = Some(eta);
                    let _ = live.events.send(JobEvent::Step {
                        step: p.step,
                        total: p.total,
                        step_seconds,
                        eta_seconds: eta,
                    });
                    let expired = live.deadline.is_some_and(|d| d <= now);
                    any_wanted |= !live.cancel && !expired;
                }
            }
            // Stop only when no job in the batch still wants its images.
            any_wanted
        };
        let outputs = match params.first().and_then(|p| p.refiner.as_ref()) {
            // Two-stage jobs run one by one (base, then refiner), batches of one by their key.
            Some(r) => {
                let refiner = self
                    .loaded
                    .get(&r.model)
                    .ok_or_else(|| EngineError::ModelNotFound(r.model.clone()))?;
                params
                    .iter()
                    .map(|p| pipeline.generate_with_refiner(refiner, p, r.switch, &mut on_step))
                    .collect::<Result<Vec<_>, _>>()
            }
            None => pipeline.generate_batch(params, &mut on_step),
        };
        let seconds = started.elapsed().as_secs_f64();
        let outputs = match outputs {
            Err(EngineError::Cancelled) => {
                // Every job was cancelled or timed out; their replies say which.
                return Ok(params
                    .iter()
                    .map(|p| Finished {
                        images: Vec::new(),
                        seed: p.seed,
                        seconds,
                    })
                    .collect());
            }
            other => other?,
        };
        Ok(outputs
            .into_iter()
            .zip(params)
            .map(|(o, p)| Finished {
                images: o.images,
                seed: p.seed,
                seconds,
            })
            .collect())
    }
}

struct Finished {
    images: Vec<crate::engine::GeneratedImage>,
    seed: u64,
    seconds: f64,
}

/// Engine errors are not `Clone` (they wrap candle and I/O errors); a batch's one error is
/// reported to each of its jobs by message, keeping the variants the API maps to statuses.
fn clone_error(e: &EngineError) -> EngineError {
    match e {
        EngineError::InvalidParameter { param, message } => EngineError::InvalidParameter {
            param,
            message: message.clone(),
        },
        EngineError::Incompatible { param, message } => EngineError::Incompatible {
            param,
            message: message.clone(),
        },
        EngineError::ModelNotFound(m) => EngineError::ModelNotFound(m.clone()),
        EngineError::Unsupported(m) => EngineError::Unsupported(m.clone()),
        EngineError::Cancelled => EngineError::Cancelled,
        EngineError::Timeout { seconds } => EngineError::Timeout { seconds: *seconds },
        EngineError::OutOfMemory(m) => EngineError::OutOfMemory(m.clone()),
        EngineError::ShuttingDown => EngineError::ShuttingDown,
        other => EngineError::Internal(other.to_string()),
    }
}
