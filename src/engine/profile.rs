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
use std::ffi::CStr;
use std::sync::OnceLock;
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

/// Run `f` as one window of a kernel tracer preloaded into this process (tools/cuda/kernel_trace.c,
/// which the GPU benchmark script preloads with CUPTI): the tracer records every kernel and marks
/// where each timed part began and ended, so its table holds exactly what one denoiser forward
/// (or decode, or prompt encoding) ran. `f` must leave the device idle when it returns (the timed
/// parts wait for it). Without a tracer this is one symbol lookup per process.
pub fn kernel_trace_window<T>(label: &CStr, f: impl FnOnce() -> T) -> T {
    let Some(mark) = kernel_tracer() else {
        return f();
    };
    // SAFETY: the tracer's `void candela_trace_window(const char *label, int begin)`, called with
    // a NUL-terminated string that outlives the call.
    unsafe { mark(label.as_ptr(), 1) };
    let out = f();
    unsafe { mark(label.as_ptr(), 0) };
    out
}

type TraceWindow = unsafe extern "C" fn(*const std::ffi::c_char, std::ffi::c_int);

fn kernel_tracer() -> Option<TraceWindow> {
    static TRACER: OnceLock<Option<TraceWindow>> = OnceLock::new();
    *TRACER.get_or_init(|| {
        #[cfg(unix)]
        {
            // SAFETY: a lookup by a NUL-terminated name; a symbol of this name is the tracer's
            // function of the signature above.
            let symbol =
                unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"candela_trace_window".as_ptr()) };
            (!symbol.is_null()).then(|| unsafe {
                std::mem::transmute::<*mut std::ffi::c_void, TraceWindow>(symbol)
            })
        }
        #[cfg(not(unix))]
        None
    })
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
