//! cuDNN's fused flash attention through the graph API: the candidate for the attention gap.
//!
//! Why: session 25's H200 traces put FLUX-dev's remaining gap to diffusers in attention. Its
//! attention ran in cuDNN's Hopper kernel (23.3 ms per step, PyTorch's SDPA reaches it through
//! cudnn-frontend); our Hopper kernel took ~50 ms. cuDNN recognises an operation graph of the
//! attention's parts and runs it as one fused kernel. The graph is the one cudnn-frontend builds
//! for inference without masks (its "composite" SDPA node, cuDNN before 9.21):
//!
//! ```text
//! S = Q·Kᵀ (f32) → S·scale → softmax over keys: max, subtract, exp, sum, divide → P (f16/bf16)
//!   → O = P·V
//! ```
//!
//! every intermediate virtual (never written), the scale passed by value. cuDNN 9.13 and later
//! also take the whole as one operation (the frontend's "unified" node), tried first. One plan
//! per shape and layout, built on first use and timed like the convolutions' (`cudnn_graph.rs`). A shape
//! cuDNN cannot run falls back to our kernels (logged once); chosen with `candela bench
//! --attention-kernel cudnn` and checked at device open against candle's ops.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, CudaStorage, DeviceId};
use candle_core::{CustomOp3, DType, Layout, Shape};

use super::attention::{view_from, FlashAttention, Kernel, Operands};
use super::cuda_error;
use super::cudnn_graph::{
    self, operation, packed_strides, pointwise, Attr, Bindings, Descriptor, DescriptorType, Graph,
    Kind, Plan, Storage,
};
use crate::engine::cuda_geometry::{GraphTensor, GraphTensors, Strides};

/// Unique ids of the graph's tensors: the four in device memory and the by-value scale, then the
/// virtual intermediates.
mod uid {
    pub const Q: i64 = 1;
    pub const K: i64 = 2;
    pub const V: i64 = 3;
    pub const O: i64 = 4;
    pub const SCALE: i64 = 5;
    pub const SCORES: i64 = 10;
    pub const SCALED: i64 = 11;
    pub const MAX: i64 = 12;
    pub const CENTRED: i64 = 13;
    pub const EXP: i64 = 14;
    pub const SUM: i64 = 15;
    pub const PROBS: i64 = 16;
}

/// One attention shape and layout: what a plan is built for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    device: DeviceId,
    dtype: DType,
    /// batch, heads, queries, keys, head size
    dims: [usize; 5],
    q: Strides,
    k: Strides,
    v: Strides,
}

/// The two forms of the graph: cuDNN's attention operation (9.13 and later), and the composite
/// of products, pointwise operations and reductions that older versions fuse.
#[derive(Clone, Copy, Debug)]
enum Form {
    Unified,
    Composite,
}

/// Engine configurations finalised and timed per attention shape: cuDNN proposes one or two for
/// these graphs, and each may be compiled at run time (PyTorch's first cuDNN attention call
/// takes seconds), where SD 1.5 alone has eight shapes.
const MAX_TIMED: usize = 3;

/// The plan for `key`: the unified form where this cuDNN has it, else the composite one, each
/// the fastest of the heuristics' engines on the call's own tensors.
fn build_plan(
    handle: sys::cudnnHandle_t,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    key: &Key,
    bindings: Bindings,
) -> candle_core::Result<(Plan, Form)> {
    let mut failures = Vec::new();
    for form in [Form::Unified, Form::Composite] {
        let plan = operation_graph(handle, key, form).and_then(|graph| {
            cudnn_graph::fastest_plan(handle, stream, graph, bindings, MAX_TIMED, "attention")
        });
        match plan {
            Ok(plan) => return Ok((plan, form)),
            Err(e) => failures.push(format!("{form:?}: {e}")),
        }
    }
    candle_core::bail!("{}", failures.join("; "))
}

/// The graph of [`Key`] in `form`: softmax(q kᵀ · scale) v, the output token-major.
fn operation_graph(
    handle: sys::cudnnHandle_t,
    key: &Key,
    form: Form,
) -> candle_core::Result<Graph> {
    let io = cudnn_graph::half_type(key.dtype, "attention")?;
    let f32 = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let [b, h, n, m, _] = key.dims.map(|x| x as i64);
    let layouts = GraphTensors::new(key.dims, key.q, key.k, key.v);
    let device = |id, (dims, strides): GraphTensor| {
        cudnn_graph::tensor(id, io, &dims, &strides, Storage::Device)
    };
    let q = device(uid::Q, layouts.q)?;
    let v = device(uid::V, layouts.v)?;
    let o = device(uid::O, layouts.o)?;
    let scale = cudnn_graph::tensor(uid::SCALE, f32, &[1; 4], &[1; 4], Storage::ByValue)?;
    if let Form::Unified = form {
        let k = device(uid::K, layouts.k)?;
        let op = operation(
            DescriptorType::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR,
            &[
                (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, &q),
                (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, &k),
                (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, &v),
                (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, &o),
                (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, &scale),
            ],
        )?;
        return Graph::new(handle, vec![op], vec![q, k, v, o, scale]);
    }
    // Kᵀ: the backend's first product takes (d × m) operands; the same memory, strides swapped.
    let k = device(uid::K, layouts.k_transposed)?;
    let virtual_tensor = |id, data_type, dims: [i64; 4]| {
        cudnn_graph::tensor(
            id,
            data_type,
            &dims,
            &packed_strides(dims),
            Storage::Virtual,
        )
    };
    let scores = [b, h, n, m];
    let per_row = [b, h, n, 1];
    let s = virtual_tensor(uid::SCORES, f32, scores)?;
    let scaled = virtual_tensor(uid::SCALED, f32, scores)?;
    let max = virtual_tensor(uid::MAX, f32, per_row)?;
    let centred = virtual_tensor(uid::CENTRED, f32, scores)?;
    let exp = virtual_tensor(uid::EXP, f32, scores)?;
    let sum = virtual_tensor(uid::SUM, f32, per_row)?;
    // The second product's A operand in the I/O type, as the backend requires.
    let p = virtual_tensor(uid::PROBS, io, scores)?;

    let mut parts = Vec::new();
    let operations = vec![
        matmul(&q, &k, &s, &mut parts)?,
        pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_MUL,
            &s,
            Some(&scale),
            &scaled,
            &mut parts,
        )?,
        reduction(
            sys::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_MAX,
            &scaled,
            &max,
            &mut parts,
        )?,
        pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_SUB,
            &scaled,
            Some(&max),
            &centred,
            &mut parts,
        )?,
        pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_EXP,
            &centred,
            None,
            &exp,
            &mut parts,
        )?,
        reduction(
            sys::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD,
            &exp,
            &sum,
            &mut parts,
        )?,
        pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_DIV,
            &exp,
            Some(&sum),
            &p,
            &mut parts,
        )?,
        matmul(&p, &v, &o, &mut parts)?,
    ];
    parts.extend([q, k, v, o, scale, s, scaled, max, centred, exp, sum, p]);
    Graph::new(handle, operations, parts)
}

/// C = A·B accumulated in f32.
fn matmul(
    a: &Descriptor,
    b: &Descriptor,
    c: &Descriptor,
    parts: &mut Vec<Descriptor>,
) -> candle_core::Result<Descriptor> {
    let desc = Descriptor::new(DescriptorType::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
    desc.set_data_type(
        Attr::CUDNN_ATTR_MATMUL_COMP_TYPE,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    )?;
    let desc = desc.finalize()?;
    let op = operation(
        DescriptorType::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR,
        &[
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_ADESC, a),
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_BDESC, b),
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_CDESC, c),
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_DESC, &desc),
        ],
    );
    parts.push(desc);
    op
}

/// y = the reduction of x over the dimensions where y has extent 1, in f32.
fn reduction(
    operator: sys::cudnnReduceTensorOp_t,
    x: &Descriptor,
    y: &Descriptor,
    parts: &mut Vec<Descriptor>,
) -> candle_core::Result<Descriptor> {
    let desc = Descriptor::new(DescriptorType::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
    desc.set(
        Attr::CUDNN_ATTR_REDUCTION_OPERATOR,
        Kind::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
        &[operator],
    )?
    .set_data_type(
        Attr::CUDNN_ATTR_REDUCTION_COMP_TYPE,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    )?;
    let desc = desc.finalize()?;
    let op = operation(
        DescriptorType::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
        &[
            (Attr::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x),
            (Attr::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y),
            (Attr::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &desc),
        ],
    );
    parts.push(desc);
    op
}

thread_local! {
    /// Plans per shape on this thread, or why cuDNN could not run the shape.
    static PLANS: RefCell<HashMap<Key, Result<Plan, String>>> = RefCell::new(HashMap::new());
}

/// softmax(q kᵀ · scale) v by cuDNN, the same inputs and token-major output as [`FlashAttention`].
/// `fallback`: the kernel that runs a shape cuDNN has no plan for (None: that is an error).
pub(super) struct CudnnAttention {
    pub scale: f32,
    pub fallback: Option<Kernel>,
}

impl CustomOp3 for CudnnAttention {
    fn name(&self) -> &'static str {
        "cudnn-attention"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let operands = [(q, q_layout), (k, k_layout), (v, v_layout)];
        let read = Operands::read(operands)?;
        let [b, h, n, _, d] = read.dims;
        let key = Key {
            device: q.device.id(),
            dtype: q.dtype(),
            dims: read.dims,
            q: read.q,
            k: read.k,
            v: read.v,
        };
        let out = match q.dtype() {
            DType::F16 => self.run::<half::f16>(&key, operands)?,
            DType::BF16 => self.run::<half::bf16>(&key, operands)?,
            other => candle_core::bail!("cuDNN attention of {other:?} tensors"),
        };
        match out {
            Some(storage) => Ok((storage, Shape::from((b, n, h, d)))),
            // No plan for this shape: the fallback kernel, on the same operands.
            None => match self.fallback {
                Some(kernel) => FlashAttention {
                    scale: self.scale,
                    kernel,
                }
                .cuda_fwd(q, q_layout, k, k_layout, v, v_layout),
                None => candle_core::bail!("cuDNN attention has no plan for {key:?}"),
            },
        }
    }
}

impl CudnnAttention {
    /// The output storage, or None where cuDNN has no plan for `key` and a fallback runs it.
    fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        key: &Key,
        [q, k, v]: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<Option<CudaStorage>> {
        let dev = &q.0.device;
        let stream = dev.cuda_stream();
        let handle = cudnn_graph::handle(dev)?;
        let [b, h, n, _, d] = key.dims;
        let (qv, kv, vv) = (view_from::<T>(q)?, view_from::<T>(k)?, view_from::<T>(v)?);
        let mut out = unsafe { stream.alloc::<T>(b * n * h * d) }.map_err(cuda_error)?;
        let mut scale = self.scale;
        {
            let (qp, _q) = qv.device_ptr(&stream);
            let (kp, _k) = kv.device_ptr(&stream);
            let (vp, _v) = vv.device_ptr(&stream);
            let (op, _o) = out.device_ptr_mut(&stream);
            let mut pointers: Vec<*mut c_void> =
                [qp, kp, vp, op].iter().map(|&p| p as *mut c_void).collect();
            pointers.push((&mut scale as *mut f32).cast());
            let bindings = Bindings {
                uids: &[uid::Q, uid::K, uid::V, uid::O, uid::SCALE],
                pointers: &pointers,
            };
            let ran = PLANS.with(|plans| -> candle_core::Result<bool> {
                let mut plans = plans.borrow_mut();
                if !plans.contains_key(key) {
                    let plan = build_plan(handle, &stream, key, bindings);
                    match &plan {
                        Ok((p, form)) => tracing::info!(
                            ?key,
                            ?form,
                            chosen = %p.chosen,
                            "cuDNN attention plan"
                        ),
                        Err(e) => tracing::warn!(
                            ?key,
                            "cuDNN attention unavailable for this shape, our kernel instead: {e}"
                        ),
                    }
                    plans.insert(key.clone(), plan.map(|(p, _)| p).map_err(|e| e.to_string()));
                }
                match plans.get(key) {
                    Some(Ok(plan)) => {
                        let mut scratch = unsafe { stream.alloc::<u8>(plan.workspace.max(1)) }
                            .map_err(cuda_error)?;
                        let (sp, _s) = scratch.device_ptr_mut(&stream);
                        plan.execute(handle, bindings, sp)?;
                        Ok(true)
                    }
                    Some(Err(why)) if self.fallback.is_none() => {
                        candle_core::bail!("{why}")
                    }
                    _ => Ok(false),
                }
            })?;
            if !ran {
                return Ok(None);
            }
        }
        Ok(Some(CudaStorage::wrap_cuda_slice(out, dev.clone())))
    }
}
