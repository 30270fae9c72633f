//! Half-precision convolution through cuDNN's graph (backend) API — the candidate beside the
//! legacy-API path of `conv.rs`.
//!
//! Why: on the H200 our legacy-API convolutions ran at 1.2–2.2× PyTorch's time per call (SD 1.5's
//! 320-channel 3×3 at 64²: 0.19 ms against 0.085) although cudnnFind timed every legacy algorithm.
//! PyTorch reaches cuDNN through the graph API (cudnn-frontend), whose engines include the
//! Hopper-specific kernels the legacy algorithms do not. Here: one operation graph per shape
//! (X, W → Y, NCHW, f32 accumulation), the engine configurations cuDNN's heuristics propose
//! (mode A, then the fallback list), each finalised into an execution plan and timed on the
//! call's own tensors, the fastest kept — PyTorch's `cudnn.benchmark` over the same candidates.
//!
//! Chosen with [`set_engine`] (`candela bench --conv-engine graph`) until a GPU run has measured
//! it against the legacy path; `candela bench --kernels` times both per shape and checks this
//! one's output against the legacy one's. f32 stays on the legacy path (exact FMA math).

use std::ffi::c_void;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtrMut};
use candle_core::DType;

use sys::cudnnBackendAttributeName_t as Attr;
use sys::cudnnBackendAttributeType_t as Kind;
use sys::cudnnBackendDescriptorType_t as DescriptorType;

/// Which cuDNN API the half-precision convolutions go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConvEngine {
    /// The legacy API with an algorithm found by `cudnnFindConvolutionForwardAlgorithm`.
    Legacy = 0,
    /// The graph API with the fastest of the heuristics' engine configurations: the default on
    /// Hopper since session 25 (SD 1.5's UNet step 0.70× the legacy API's on an H200, the other
    /// models' equal; the legacy plan for a shape the graph API cannot run). Other cards keep
    /// the legacy API until one is measured.
    Graph = 1,
}

impl ConvEngine {
    pub const ALL: [ConvEngine; 2] = [ConvEngine::Legacy, ConvEngine::Graph];

    pub fn name(self) -> &'static str {
        match self {
            ConvEngine::Legacy => "legacy",
            ConvEngine::Graph => "graph",
        }
    }
}

/// The engine chosen for the process ([`set_engine`]), or [`UNCHOSEN`].
static ENGINE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNCHOSEN);
const UNCHOSEN: u8 = u8::MAX;

/// Makes the models' half-precision convolutions use `engine` from now on, in this process.
pub fn set_engine(engine: ConvEngine) {
    ENGINE.store(engine as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The API the models' convolutions on `device` go through: the one chosen for the process, else
/// the graph API on the cards it was measured on (compute capability 9.x) and the legacy one
/// elsewhere.
pub fn engine_for(device: &candle_core::Device) -> ConvEngine {
    match ENGINE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ConvEngine::Legacy,
        1 => ConvEngine::Graph,
        _ if super::compute_capability(device).is_some_and(|(major, _)| major == 9) => {
            ConvEngine::Graph
        }
        _ => ConvEngine::Legacy,
    }
}

fn status(what: &str, s: sys::cudnnStatus_t) -> candle_core::Result<()> {
    if s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "cuDNN graph API, {what}: {s:?}"
        )))
    }
}

/// A backend descriptor, destroyed on drop.
struct Descriptor(sys::cudnnBackendDescriptor_t);

impl Drop for Descriptor {
    fn drop(&mut self) {
        unsafe {
            let _ = sys::cudnnBackendDestroyDescriptor(self.0);
        }
    }
}

impl Descriptor {
    fn new(kind: DescriptorType) -> candle_core::Result<Self> {
        let mut raw: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        status("create descriptor", unsafe {
            sys::cudnnBackendCreateDescriptor(kind, &mut raw)
        })?;
        Ok(Self(raw))
    }

    /// Sets `attr` to `values` (of cuDNN type `kind`; `T` must be that type's C representation).
    fn set<T>(&self, attr: Attr, kind: Kind, values: &[T]) -> candle_core::Result<&Self> {
        status(&format!("set {attr:?}"), unsafe {
            sys::cudnnBackendSetAttribute(
                self.0,
                attr,
                kind,
                values.len() as i64,
                values.as_ptr().cast::<c_void>(),
            )
        })?;
        Ok(self)
    }

    fn set_i64s(&self, attr: Attr, values: &[i64]) -> candle_core::Result<&Self> {
        self.set(attr, Kind::CUDNN_TYPE_INT64, values)
    }

    fn set_descriptor(&self, attr: Attr, other: &Descriptor) -> candle_core::Result<&Self> {
        self.set(attr, Kind::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[other.0])
    }

    fn finalize(self) -> candle_core::Result<Self> {
        status("finalize", unsafe { sys::cudnnBackendFinalize(self.0) })?;
        Ok(self)
    }
}

/// Unique ids of the graph's tensors (their slots in the variant pack).
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;

/// Row-major (NCHW) strides of `dims`.
fn strides(dims: [usize; 4]) -> [i64; 4] {
    [
        (dims[1] * dims[2] * dims[3]) as i64,
        (dims[2] * dims[3]) as i64,
        dims[3] as i64,
        1,
    ]
}

fn tensor(
    uid: i64,
    data_type: sys::cudnnDataType_t,
    dims: [usize; 4],
) -> candle_core::Result<Descriptor> {
    let t = Descriptor::new(DescriptorType::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set(
        Attr::CUDNN_ATTR_TENSOR_DATA_TYPE,
        Kind::CUDNN_TYPE_DATA_TYPE,
        &[data_type],
    )?
    .set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, &dims.map(|d| d as i64))?
    .set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, &strides(dims))?
    .set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[uid])?
    // Every pointer handed to `execute` is checked to be 16-byte aligned.
    .set_i64s(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[16])?;
    t.finalize()
}

/// An operation graph with every descriptor it was made from (kept alive as long as the graph:
/// the API does not say that finalising copies them).
struct Graph {
    graph: Descriptor,
    _parts: Vec<Descriptor>,
}

/// A finalised execution plan for one convolution shape, with what it needs kept alive.
pub struct GraphPlan {
    plan: Descriptor,
    pub workspace: usize,
    /// Which of the heuristics' configurations won, and how many were timed (for the bench).
    pub chosen: String,
    _config: Descriptor,
    _graph: Graph,
}

/// The shape of one convolution: NCHW input, KCRS weight, output, square padding and stride.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub dtype: DType,
    pub input: [usize; 4],
    pub weight: [usize; 4],
    pub output: [usize; 4],
    pub padding: usize,
    pub stride: usize,
}

/// Device pointers of one call: input, weight, output (16-byte aligned).
#[derive(Clone, Copy)]
pub struct Pointers {
    pub x: u64,
    pub w: u64,
    pub y: u64,
}

impl Pointers {
    pub fn aligned(&self) -> bool {
        [self.x, self.w, self.y].iter().all(|p| p % 16 == 0)
    }
}

fn operation_graph(handle: sys::cudnnHandle_t, shape: &ConvShape) -> candle_core::Result<Graph> {
    let data_type = match shape.dtype {
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        other => candle_core::bail!("graph-API convolution of {other:?} (half types only)"),
    };
    let x = tensor(X, data_type, shape.input)?;
    let w = tensor(W, data_type, shape.weight)?;
    let y = tensor(Y, data_type, shape.output)?;
    let (p, s) = (shape.padding as i64, shape.stride as i64);
    let conv = Descriptor::new(DescriptorType::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    conv.set(
        Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
        Kind::CUDNN_TYPE_DATA_TYPE,
        &[sys::cudnnDataType_t::CUDNN_DATA_FLOAT],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
        Kind::CUDNN_TYPE_CONVOLUTION_MODE,
        &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
    )?
    .set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?
    .set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, &[p, p])?
    .set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, &[p, p])?
    .set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, &[s, s])?
    .set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS, &[1, 1])?;
    let conv = conv.finalize()?;
    let op =
        Descriptor::new(DescriptorType::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
    op.set_descriptor(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &x)?
        .set_descriptor(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &w)?
        .set_descriptor(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, &y)?
        .set_descriptor(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
            &conv,
        )?
        .set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
            Kind::CUDNN_TYPE_FLOAT,
            &[1f32],
        )?
        .set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            Kind::CUDNN_TYPE_FLOAT,
            &[0f32],
        )?;
    let op = op.finalize()?;
    let graph = Descriptor::new(DescriptorType::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph
        .set_descriptor(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &op)?
        .set(
            Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            Kind::CUDNN_TYPE_HANDLE,
            &[handle],
        )?;
    Ok(Graph {
        graph: graph.finalize()?,
        _parts: vec![x, w, y, conv, op],
    })
}

/// The engine configurations the heuristics propose in `mode`, best first.
fn engine_configs(
    graph: &Descriptor,
    mode: sys::cudnnBackendHeurMode_t,
) -> candle_core::Result<Vec<Descriptor>> {
    let heuristics = Descriptor::new(DescriptorType::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heuristics
        .set_descriptor(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph)?
        .set(
            Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
            Kind::CUDNN_TYPE_HEUR_MODE,
            &[mode],
        )?;
    let heuristics = heuristics.finalize()?;
    let mut count = 0i64;
    status("count engine configurations", unsafe {
        sys::cudnnBackendGetAttribute(
            heuristics.0,
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            Kind::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            0,
            &mut count,
            std::ptr::null_mut(),
        )
    })?;
    let configs = (0..count.max(0))
        .map(|_| Descriptor::new(DescriptorType::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.0).collect();
    let mut returned = 0i64;
    if !raw.is_empty() {
        status("read engine configurations", unsafe {
            sys::cudnnBackendGetAttribute(
                heuristics.0,
                Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Kind::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                raw.len() as i64,
                &mut returned,
                raw.as_mut_ptr().cast::<c_void>(),
            )
        })?;
    }
    let mut configs = configs;
    configs.truncate(returned.clamp(0, count) as usize);
    Ok(configs)
}

fn execution_plan(
    handle: sys::cudnnHandle_t,
    config: &Descriptor,
) -> candle_core::Result<(Descriptor, usize)> {
    let plan = Descriptor::new(DescriptorType::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
    plan.set(
        Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        Kind::CUDNN_TYPE_HANDLE,
        &[handle],
    )?
    .set_descriptor(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, config)?;
    let plan = plan.finalize()?;
    let mut workspace = 0i64;
    let mut count = 0i64;
    status("workspace size", unsafe {
        sys::cudnnBackendGetAttribute(
            plan.0,
            Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
            Kind::CUDNN_TYPE_INT64,
            1,
            &mut count,
            (&mut workspace as *mut i64).cast::<c_void>(),
        )
    })?;
    Ok((plan, workspace.max(0) as usize))
}

/// Runs `plan` on the call's pointers (the workspace at least `plan`'s size).
fn execute(
    handle: sys::cudnnHandle_t,
    plan: &Descriptor,
    pointers: Pointers,
    workspace: u64,
) -> candle_core::Result<()> {
    let pack = Descriptor::new(DescriptorType::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
    let data: [*mut c_void; 3] = [pointers.x, pointers.w, pointers.y].map(|p| p as *mut c_void);
    pack.set(
        Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
        Kind::CUDNN_TYPE_VOID_PTR,
        &data,
    )?
    .set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &[X, W, Y])?
    .set(
        Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
        Kind::CUDNN_TYPE_VOID_PTR,
        &[workspace as *mut c_void],
    )?;
    let pack = pack.finalize()?;
    status("execute", unsafe {
        sys::cudnnBackendExecute(handle, plan.0, pack.0)
    })
}

/// Candidates timed per shape: the heuristics' first few are the ones worth a try.
const MAX_TIMED: usize = 8;

/// Builds the graph for `shape`, finalises up to [`MAX_TIMED`] of the proposed configurations
/// and keeps the fastest on the call's own tensors (the output is overwritten).
pub fn build(
    handle: sys::cudnnHandle_t,
    stream: &std::sync::Arc<CudaStream>,
    shape: &ConvShape,
    pointers: Pointers,
) -> candle_core::Result<GraphPlan> {
    let graph = operation_graph(handle, shape)?;
    let mut plans = Vec::new();
    let mut rejected = Vec::new();
    for mode in [
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
    ] {
        let configs = match engine_configs(&graph.graph, mode) {
            Ok(c) => c,
            Err(e) => {
                rejected.push(e.to_string());
                continue;
            }
        };
        for config in configs {
            if plans.len() >= MAX_TIMED {
                break;
            }
            match execution_plan(handle, &config) {
                Ok((plan, size)) => plans.push((plan, size, config)),
                Err(e) => rejected.push(e.to_string()),
            }
        }
        if !plans.is_empty() {
            break;
        }
    }
    let sync = |s: &CudaStream| s.synchronize().map_err(super::cuda_error);
    let mut best: Option<(f64, usize)> = None;
    let timed = plans.len();
    for (i, (plan, size, _)) in plans.iter().enumerate() {
        let mut buffer =
            unsafe { stream.alloc::<u8>((*size).max(1)) }.map_err(super::cuda_error)?;
        let (scratch, _guard) = buffer.device_ptr_mut(stream);
        // One untimed run (first-use costs), then three timed.
        if let Err(e) = execute(handle, plan, pointers, scratch) {
            rejected.push(e.to_string());
            continue;
        }
        sync(stream)?;
        let start = Instant::now();
        let mut ok = true;
        for _ in 0..3 {
            if let Err(e) = execute(handle, plan, pointers, scratch) {
                rejected.push(e.to_string());
                ok = false;
                break;
            }
        }
        sync(stream)?;
        let seconds = start.elapsed().as_secs_f64();
        if ok && best.is_none_or(|(t, _)| seconds < t) {
            best = Some((seconds, i));
        }
    }
    let Some((_, index)) = best else {
        candle_core::bail!(
            "cuDNN graph API: no engine ran this convolution ({} rejected: {})",
            rejected.len(),
            rejected
                .first()
                .map(String::as_str)
                .unwrap_or("no configuration proposed")
        );
    };
    let (plan, workspace, config) = plans.swap_remove(index);
    Ok(GraphPlan {
        plan,
        workspace,
        chosen: format!("configuration {} of {timed} timed", index + 1),
        _config: config,
        _graph: graph,
    })
}

impl GraphPlan {
    pub fn execute(
        &self,
        handle: sys::cudnnHandle_t,
        pointers: Pointers,
        workspace: u64,
    ) -> candle_core::Result<()> {
        execute(handle, &self.plan, pointers, workspace)
    }
}
