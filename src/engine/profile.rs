//! Where a forward pass spends its time, module by module (`candela bench --profile`).
//!
//! A profiled scope waits for the device before and after its work, so each figure is the
//! inclusive wall time of that module's kernels, launch overhead included; nested scopes overlap
//! (an `Attention` contains its `sdpa`). diffusers' side of the benchmark hooks the modules of
//! the same names the same way, so the two tables compare row by row. Recording is per thread
//! (the model code of one forward runs on its caller's thread) and off unless a benchmark turns it
//! on: then a scope costs one thread-local read.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;

thread_local! {
    /// The scopes recorded so far on this thread; None when not recording.
    static TIMES: RefCell<Option<BTreeMap<&'static str, Entry>>> = const { RefCell::new(None) };
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    calls: usize,
    seconds: f64,
}

/// One module kind's share of the profiled passes.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub label: &'static str,
    pub calls: usize,
    pub total_ms: f64,
}

/// Run `f` as one `label` scope; `on` gives the device to wait for.
pub fn scope<T>(
    label: &'static str,
    on: &Tensor,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if TIMES.with(|t| t.borrow().is_none()) {
        return f();
    }
    let device = on.device();
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    TIMES.with(|t| {
        if let Some(times) = t.borrow_mut().as_mut() {
            let entry = times.entry(label).or_default();
            entry.calls += 1;
            entry.seconds += seconds;
        }
    });
    Ok(out)
}

/// Profile what `f` runs (scopes inside it record), returning its result and the rows, heaviest
/// first. A `record` inside another one starts its own count and ends the outer one's.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<ProfileRow>) {
    TIMES.with(|t| *t.borrow_mut() = Some(BTreeMap::new()));
    let out = f();
    let times = TIMES.with(|t| t.borrow_mut().take()).unwrap_or_default();
    let mut rows: Vec<ProfileRow> = times
        .into_iter()
        .map(|(label, e)| ProfileRow {
            label,
            calls: e.calls,
            total_ms: e.seconds * 1000.0,
        })
        .collect();
    rows.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
    (out, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nested_scopes_are_counted_once_each_and_only_while_recording() -> candle_core::Result<()> {
        let x = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?;
        scope("outside", &x, || Ok(()))?;
        let (sum, rows) = record(|| -> candle_core::Result<f32> {
            let mut total = 0.0;
            for _ in 0..3 {
                total += scope("outer", &x, || {
                    scope("inner", &x, || x.sum_all()?.to_scalar::<f32>())
                })?;
            }
            Ok(total)
        });
        assert_eq!(sum?, 12.0);
        let calls: BTreeMap<_, _> = rows.iter().map(|r| (r.label, r.calls)).collect();
        assert_eq!(calls, BTreeMap::from([("inner", 3), ("outer", 3)]));
        let ms = |label| rows.iter().find(|r| r.label == label).map(|r| r.total_ms);
        assert!(ms("outer") >= ms("inner"), "{rows:?}");
        // Recording stopped with `record`.
        scope("after", &x, || Ok(()))?;
        assert!(record(|| ()).1.is_empty());
        Ok(())
    }
}
