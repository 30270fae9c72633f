//! cuDNN's graph (backend) API, the parts our graphs share: descriptors, tensors, an operation
//! graph, the heuristics' engine configurations, and the fastest execution plan on the call's own
//! tensors (PyTorch's `cudnn.benchmark` over the same candidates). Used by the half-precision
//! convolutions (`conv_graph.rs`) and cuDNN's fused attention (`attention_graph.rs`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::cudnn::{result as dnn, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::DType;

pub use sys::cudnnBackendAttributeName_t as Attr;
pub use sys::cudnnBackendAttributeType_t as Kind;
pub use sys::cudnnBackendDescriptorType_t as DescriptorType;

use super::cuda_error;

thread_local! {
    /// One cuDNN handle per device, on the stream candle launches on from this thread.
    static HANDLES: RefCell<HashMap<DeviceId, sys::cudnnHandle_t>> = RefCell::new(HashMap::new());
}

/// This thread's cuDNN handle for `dev` (made on first use, bound to candle's stream).
pub fn handle(dev: &CudaDevice) -> candle_core::Result<sys::cudnnHandle_t> {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if let Some(h) = handles.get(&dev.id()) {
            return Ok(*h);
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(cuda_error)?;
        let h = dnn::create_handle().map_err(cuda_error)?;
        unsafe { dnn::set_stream(h, stream.cu_stream() as sys::cudaStream_t) }
            .map_err(cuda_error)?;
        handles.insert(dev.id(), h);
        Ok(h)
    })
}

pub fn status(what: &str, s: sys::cudnnStatus_t) -> candle_core::Result<()> {
    if s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "cuDNN graph API, {what}: {s:?}"
        )))
    }
}

/// The cuDNN type of half-precision data.
pub fn half_type(dtype: DType, what: &str) -> candle_core::Result<sys::cudnnDataType_t> {
    match dtype {
        DType::F16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_HALF),
        DType::BF16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        other => candle_core::bail!("graph-API {what} of {other:?} (half types only)"),
    }
}

/// A backend descriptor, destroyed on drop.
pub struct Descriptor(sys::cudnnBackendDescriptor_t);

impl Drop for Descriptor {
    fn drop(&mut self) {
        unsafe {
            let _ = sys::cudnnBackendDestroyDescriptor(self.0);
        }
    }
}

impl Descriptor {
    pub fn new(kind: DescriptorType) -> candle_core::Result<Self> {
        let mut raw: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        status("create descriptor", unsafe {
            sys::cudnnBackendCreateDescriptor(kind, &mut raw)
        })?;
        Ok(Self(raw))
    }

    /// Sets `attr` to `values` (of cuDNN type `kind`; `T` must be that type's C representation).
    pub fn set<T>(&self, attr: Attr, kind: Kind, values: &[T]) -> candle_core::Result<&Self> {
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

    pub fn set_i64s(&self, attr: Attr, values: &[i64]) -> candle_core::Result<&Self> {
        self.set(attr, Kind::CUDNN_TYPE_INT64, values)
    }

    pub fn set_data_type(
        &self,
        attr: Attr,
        data_type: sys::cudnnDataType_t,
    ) -> candle_core::Result<&Self> {
        self.set(attr, Kind::CUDNN_TYPE_DATA_TYPE, &[data_type])
    }

    pub fn set_descriptor(&self, attr: Attr, other: &Descriptor) -> candle_core::Result<&Self> {
        self.set_descriptors(attr, &[other])
    }

    pub fn set_descriptors(
        &self,
        attr: Attr,
        others: &[&Descriptor],
    ) -> candle_core::Result<&Self> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = others.iter().map(|d| d.0).collect();
        self.set(attr, Kind::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    pub fn finalize(self) -> candle_core::Result<Self> {
        status("finalize", unsafe { sys::cudnnBackendFinalize(self.0) })?;
        Ok(self)
    }
}

/// A finalised operation (or sub-)descriptor of `kind` with each of `links` set to its descriptor
/// (its tensors, and the descriptor saying what it computes).
pub fn operation(
    kind: DescriptorType,
    links: &[(Attr, &Descriptor)],
) -> candle_core::Result<Descriptor> {
    let op = Descriptor::new(kind)?;
    for (attr, descriptor) in links {
        op.set_descriptor(*attr, descriptor)?;
    }
    op.finalize()
}

/// y = x ∘ b (or f(x) for a unary mode), in f32.
pub fn pointwise(
    mode: sys::cudnnPointwiseMode_t,
    x: &Descriptor,
    b: Option<&Descriptor>,
    y: &Descriptor,
    parts: &mut Vec<Descriptor>,
) -> candle_core::Result<Descriptor> {
    let desc = Descriptor::new(DescriptorType::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    desc.set(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        Kind::CUDNN_TYPE_POINTWISE_MODE,
        &[mode],
    )?
    .set_data_type(
        Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    )?;
    let desc = desc.finalize()?;
    let mut links = vec![
        (Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &desc),
        (Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x),
        (Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y),
    ];
    links.extend(b.map(|b| (Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b)));
    let op = operation(
        DescriptorType::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
        &links,
    );
    parts.push(desc);
    op
}

/// How a graph tensor is held.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Device memory, handed to each execution in the variant pack.
    Device,
    /// An intermediate the fused kernel never writes out.
    Virtual,
    /// A host scalar passed by value in the variant pack (an f32 scale).
    ByValue,
}

/// A finalised tensor descriptor.
pub fn tensor(
    uid: i64,
    data_type: sys::cudnnDataType_t,
    dims: &[i64],
    strides: &[i64],
    storage: Storage,
) -> candle_core::Result<Descriptor> {
    let t = Descriptor::new(DescriptorType::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, data_type)?
        .set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, dims)?
        .set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, strides)?
        .set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[uid])?
        // Every device pointer handed to an execution is checked to be 16-byte aligned.
        .set_i64s(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[16])?;
    match storage {
        Storage::Device => {}
        Storage::Virtual => {
            t.set(
                Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
                Kind::CUDNN_TYPE_BOOLEAN,
                &[true],
            )?;
        }
        Storage::ByValue => {
            t.set(
                Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE,
                Kind::CUDNN_TYPE_BOOLEAN,
                &[true],
            )?;
        }
    }
    t.finalize()
}

/// Row-major strides of `dims`.
pub fn packed_strides<const N: usize>(dims: [i64; N]) -> [i64; N] {
    let mut strides = [1i64; N];
    for i in (0..N.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// An operation graph with every descriptor it was made from (kept alive as long as the graph:
/// the API does not say that finalising copies them).
pub struct Graph {
    graph: Descriptor,
    _parts: Vec<Descriptor>,
}

impl Graph {
    /// The finalised graph of `operations` (in data-flow order); `parts` are the tensors and
    /// sub-descriptors they refer to.
    pub fn new(
        handle: sys::cudnnHandle_t,
        operations: Vec<Descriptor>,
        mut parts: Vec<Descriptor>,
    ) -> candle_core::Result<Self> {
        let graph = Descriptor::new(DescriptorType::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        graph
            .set_descriptors(
                Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
                &operations.iter().collect::<Vec<_>>(),
            )?
            .set(
                Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
                Kind::CUDNN_TYPE_HANDLE,
                &[handle],
            )?;
        parts.extend(operations);
        Ok(Self {
            graph: graph.finalize()?,
            _parts: parts,
        })
    }
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

/// What one execution reads and writes: each graph tensor's uid with its pointer (a device
/// address, or a host scalar's address for a by-value tensor).
#[derive(Clone, Copy)]
pub struct Bindings<'a> {
    pub uids: &'a [i64],
    pub pointers: &'a [*mut c_void],
}

/// Runs `plan` on `bindings` (the workspace at least `plan`'s size).
fn execute(
    handle: sys::cudnnHandle_t,
    plan: &Descriptor,
    bindings: Bindings,
    workspace: u64,
) -> candle_core::Result<()> {
    let pack = Descriptor::new(DescriptorType::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
    pack.set(
        Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
        Kind::CUDNN_TYPE_VOID_PTR,
        bindings.pointers,
    )?
    .set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, bindings.uids)?
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

/// A finalised execution plan for one graph, with what it needs kept alive.
pub struct Plan {
    plan: Descriptor,
    pub workspace: usize,
    /// Which of the heuristics' configurations won, and how many were timed (for the logs).
    pub chosen: String,
    /// Its time per execution when it was chosen.
    pub seconds: f64,
    _config: Descriptor,
    _graph: Graph,
}

impl Plan {
    pub fn execute(
        &self,
        handle: sys::cudnnHandle_t,
        bindings: Bindings,
        workspace: u64,
    ) -> candle_core::Result<()> {
        execute(handle, &self.plan, bindings, workspace)
    }
}

/// Finalises up to `max_timed` of the configurations the heuristics propose for `graph` (mode A,
/// else the fallback list: the first few are the ones worth a try; a runtime-compiled engine
/// costs its compilation to finalise) and keeps the fastest on the call's own `bindings` (its
/// outputs are overwritten). `what` names the graph in errors.
pub fn fastest_plan(
    handle: sys::cudnnHandle_t,
    stream: &std::sync::Arc<CudaStream>,
    graph: Graph,
    bindings: Bindings,
    max_timed: usize,
    what: &str,
) -> candle_core::Result<Plan> {
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
            if plans.len() >= max_timed {
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
    let mut best: Option<(f64, usize)> = None;
    let timed = plans.len();
    for (i, (plan, size, _)) in plans.iter().enumerate() {
        let mut buffer = unsafe { stream.alloc::<u8>((*size).max(1)) }.map_err(cuda_error)?;
        let (scratch, _guard) = buffer.device_ptr_mut(stream);
        match super::seconds_per_run(stream, 3, || execute(handle, plan, bindings, scratch)) {
            Ok(seconds) if best.is_none_or(|(t, _)| seconds < t) => best = Some((seconds, i)),
            Ok(_) => {}
            Err(e) => rejected.push(e.to_string()),
        }
    }
    let Some((seconds, index)) = best else {
        candle_core::bail!(
            "cuDNN graph API: no engine ran this {what} ({} rejected: {})",
            rejected.len(),
            rejected
                .first()
                .map(String::as_str)
                .unwrap_or("no configuration proposed")
        );
    };
    let (plan, workspace, config) = plans.swap_remove(index);
    Ok(Plan {
        plan,
        workspace,
        chosen: format!("configuration {} of {timed} timed", index + 1),
        seconds,
        _config: config,
        _graph: graph,
    })
}
