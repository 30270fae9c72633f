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

use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::DType;

use super::cudnn_graph::{
    self, Attr, Bindings, Descriptor, DescriptorType, Graph, Kind, Plan, Storage,
};

/// Which cuDNN API the half-precision convolutions go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConvEngine {
    /// The legacy API with an algorithm found by `cudnnFindConvolutionForwardAlgorithm`.
    Legacy = 0,
    /// The graph API with the fastest of the heuristics' engine configurations: the default on
    /// Hopper since session 25 (SD 1.5's UNet step 0.70× the legacy API's on an H200, the other
    /// models' equal; the legacy plan for a shape the graph API cannot run).
    Graph = 1,
    /// Per shape, whichever API's plan ran it faster when first met (both timed on that call's
    /// own tensors): the default on the cards where neither has been measured, so that the
    /// choice is made on the card itself.
    Fastest = 2,
}

impl ConvEngine {
    pub const ALL: [ConvEngine; 3] = [ConvEngine::Legacy, ConvEngine::Graph, ConvEngine::Fastest];

    pub fn name(self) -> &'static str {
        match self {
            ConvEngine::Legacy => "legacy",
            ConvEngine::Graph => "graph",
            ConvEngine::Fastest => "fastest",
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
/// the graph API on the cards it was measured on (compute capability 9.x) and the faster of the
/// two per shape elsewhere.
pub fn engine_for(device: &candle_core::Device) -> ConvEngine {
    match ENGINE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ConvEngine::Legacy,
        1 => ConvEngine::Graph,
        2 => ConvEngine::Fastest,
        _ if super::compute_capability(device).is_some_and(|(major, _)| major == 9) => {
            ConvEngine::Graph
        }
        _ => ConvEngine::Fastest,
    }
}

/// Unique ids of the graph's tensors (their slots in the variant pack).
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;
const B: i64 = 4;
/// The convolution's f32 result before its bias, never written (the fused graph's).
const PRODUCT: i64 = 10;

fn tensor(
    uid: i64,
    data_type: sys::cudnnDataType_t,
    dims: [usize; 4],
    storage: Storage,
) -> candle_core::Result<Descriptor> {
    let dims = dims.map(|d| d as i64);
    cudnn_graph::tensor(
        uid,
        data_type,
        &dims,
        &cudnn_graph::packed_strides(dims),
        storage,
    )
}

/// A finalised execution plan for one convolution shape.
pub type GraphPlan = Plan;

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

/// Device pointers of one call: input, weight, output, and the bias where the graph adds it
/// (16-byte aligned).
#[derive(Clone, Copy)]
pub struct Pointers {
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub b: Option<u64>,
}

impl Pointers {
    pub fn aligned(&self) -> bool {
        [Some(self.x), Some(self.w), Some(self.y), self.b]
            .iter()
            .flatten()
            .all(|p| p % 16 == 0)
    }

    /// These pointers without the bias (a graph that leaves it out).
    pub fn without_bias(self) -> Self {
        Self { b: None, ..self }
    }

    /// Calls `f` with these pointers bound to the graph's tensors.
    pub fn with_bindings<R>(&self, f: impl FnOnce(Bindings) -> R) -> R {
        match self.b {
            Some(b) => {
                let pointers = [self.x, self.w, self.y, b].map(|p| p as *mut c_void);
                f(Bindings {
                    uids: &[X, W, Y, B],
                    pointers: &pointers,
                })
            }
            None => {
                let pointers = [self.x, self.w, self.y].map(|p| p as *mut c_void);
                f(Bindings {
                    uids: &[X, W, Y],
                    pointers: &pointers,
                })
            }
        }
    }
}

/// The graph of `shape`: y = conv(x, w), and with `with_bias` y = conv(x, w) + b in one kernel
/// (the product an f32 intermediate never written, the bias added by the convolution's
/// epilogue: cuDNN's conv-bias fusion), where a separate pass over y added it.
fn operation_graph(
    handle: sys::cudnnHandle_t,
    shape: &ConvShape,
    with_bias: bool,
) -> candle_core::Result<Graph> {
    let data_type = cudnn_graph::half_type(shape.dtype, "convolution")?;
    let x = tensor(X, data_type, shape.input, Storage::Device)?;
    let w = tensor(W, data_type, shape.weight, Storage::Device)?;
    let y = tensor(Y, data_type, shape.output, Storage::Device)?;
    // The convolution's own output: y itself, or the f32 product the bias is added to.
    let (product, y) = match with_bias {
        true => {
            let f32 = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
            let product = tensor(PRODUCT, f32, shape.output, Storage::Virtual)?;
            (product, Some(y))
        }
        false => (y, None),
    };
    let (p, s) = (shape.padding as i64, shape.stride as i64);
    let conv = Descriptor::new(DescriptorType::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    conv.set_data_type(
        Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
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
        .set_descriptor(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, &product)?
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
    let mut operations = vec![op.finalize()?];
    let mut parts = vec![x, w, conv];
    if let Some(y) = y {
        let bias = tensor(B, data_type, [1, shape.output[1], 1, 1], Storage::Device)?;
        operations.push(cudnn_graph::pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_ADD,
            &product,
            Some(&bias),
            &y,
            &mut parts,
        )?);
        parts.extend([bias, y]);
    }
    parts.push(product);
    Graph::new(handle, operations, parts)
}

/// Engine configurations finalised and timed per convolution shape (cudnn.benchmark's choice
/// among the heuristics' first ones), and per conv-bias fusion (a second plan per shape on its
/// first call, and its engines may be compiled at run time: the heuristics' first few).
const MAX_TIMED: usize = 8;
const MAX_TIMED_FUSED: usize = 3;

/// Builds the graph for `shape` — with the bias where `pointers` has one — and keeps the fastest
/// of the heuristics' plans on the call's own tensors (the output is overwritten).
pub fn build(
    handle: sys::cudnnHandle_t,
    stream: &std::sync::Arc<CudaStream>,
    shape: &ConvShape,
    pointers: Pointers,
) -> candle_core::Result<GraphPlan> {
    let graph = operation_graph(handle, shape, pointers.b.is_some())?;
    let timed = match pointers.b {
        Some(_) => MAX_TIMED_FUSED,
        None => MAX_TIMED,
    };
    pointers.with_bindings(|bindings| {
        cudnn_graph::fastest_plan(handle, stream, graph, bindings, timed, "convolution")
    })
}
