//! 2-D convolution through cuDNN with a plan cached per shape.
//!
//! candle's own cuDNN convolution asks cuDNN's heuristics for an algorithm on every call
//! (`cudnnGetConvolutionForwardAlgorithm_v7`: milliseconds of host time each), computes half
//! precision in half (`CUDNN_DATA_HALF`), allocates a zeroed workspace per call and adds the bias
//! in a separate broadcast kernel. On an H200 a 2×320×64²→320 f16 3×3 convolution took 3.1 ms
//! that way against PyTorch's 0.08 ms, and SD 1.5's 98 convolutions made 85 % of a UNet step.
//! Here, per (device, dtype, shapes, padding, stride) and thread: descriptors made once, the
//! algorithm chosen once by timing them (`cudnnFindConvolutionForwardAlgorithm`, as PyTorch with
//! `cudnn.benchmark`), f32 accumulation with tensor cores for f16/bf16 (PyTorch's choice), and
//! no TF32 for f32 — f32 stays f32, as on the CPU (the CPU-vs-GPU parity check holds at 1e-3) —
//! except inside [`allow_tf32`] (the upcast VAE). The bias is added in place by cuDNN.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result as dnn, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{CustomOp3, DType, Layout, Shape, Tensor};

use super::conv_graph::{self, ConvEngine, ConvShape, GraphPlan, Pointers};
use super::cuda_error;

thread_local! {
    /// Whether f32 convolutions may use TF32 tensor cores on this thread (see [`allow_tf32`]).
    static TF32: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with f32 convolutions allowed to use TF32 (10-bit mantissa products, f32 sums) when
/// `allow`: PyTorch's default for cuDNN convolutions, used for the VAE that runs in f32 under a
/// half-precision model (SDXL's `force_upcast`), whose output is 8-bit pixels. Everything else in
/// f32 stays exact f32.
pub fn allow_tf32<T>(allow: bool, f: impl FnOnce() -> T) -> T {
    // Restored on unwinding too.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            TF32.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(TF32.with(|c| c.replace(allow)));
    f()
}

/// `conv2d(xs, weight) + bias` (NCHW, square padding and stride, no dilation or groups) through
/// a cached cuDNN plan. The CUDA path of [`crate::engine::models::blocks::Conv2d`]. Half
/// precision goes through [`conv_graph::engine_for`]'s API; a shape the graph API cannot run falls
/// back to the legacy one.
pub fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let engine = conv_graph::engine_for(xs.device());
    CudnnConv2d::new(padding, stride, engine, false).apply(xs, weight, bias)
}

/// [`conv2d`] through the given API, failing where it cannot run the shape (for the bench).
pub fn conv2d_by(
    engine: ConvEngine,
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    CudnnConv2d::new(padding, stride, engine, true).apply(xs, weight, bias)
}

/// [`conv2d`] by a graph-API plan that adds the bias itself, timed or not (for the device
/// check: a fused plan that wins only at some shapes is checked at any); an error where cuDNN
/// has no such plan for the shape.
pub fn conv2d_bias_fused(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let op = CudnnConv2d {
        fused_bias_only: true,
        ..CudnnConv2d::new(padding, stride, ConvEngine::Graph, true)
    };
    op.apply(xs, weight, bias)
}

/// Set when the device check found the conv-bias fusion wrong on this device: plans add the
/// bias in a pass of its own from then on, in this process.
static BIAS_FUSION_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The conv-bias fusion off for the process (logged).
pub fn switch_off_bias_fusion(why: &str) {
    if !BIAS_FUSION_OFF.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::error!("the graph API's conv-bias fusion {why} on this device; switched off");
    }
}

struct CudnnConv2d {
    /// Only a graph-API plan that adds the bias itself (see [`conv2d_bias_fused`]).
    fused_bias_only: bool,
    padding: usize,
    stride: usize,
    engine: ConvEngine,
    /// Fail instead of falling back to the legacy API.
    strict: bool,
}

impl CudnnConv2d {
    fn new(padding: usize, stride: usize, engine: ConvEngine, strict: bool) -> Self {
        Self {
            fused_bias_only: false,
            padding,
            stride,
            engine,
            strict,
        }
    }

    fn apply(&self, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        xs.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, self)
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    dtype: DType,
    input: [usize; 4],
    weight: [usize; 4],
    padding: usize,
    stride: usize,
    tf32: bool,
    /// A plan made by [`conv2d_bias_fused`] (kept apart from the timed choice's).
    fused_bias_only: bool,
}

/// The descriptors and algorithm of one convolution shape.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    bias: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            let _ = dnn::destroy_tensor_descriptor(self.x);
            let _ = dnn::destroy_filter_descriptor(self.w);
            let _ = dnn::destroy_tensor_descriptor(self.y);
            let _ = dnn::destroy_tensor_descriptor(self.bias);
            let _ = dnn::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// A legacy-API tensor descriptor, destroyed on drop.
struct TensorDescriptor(sys::cudnnTensorDescriptor_t);

impl Drop for TensorDescriptor {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}

/// A graph-API plan with the descriptors of its bias addition.
struct GraphEntry {
    plan: GraphPlan,
    /// The plan adds the bias itself (cuDNN's conv-bias fusion); else a pass of its own does.
    adds_bias: bool,
    y: TensorDescriptor,
    bias: TensorDescriptor,
}

/// y += bias per channel (the legacy API's pass, and the graph API's where it has no fused
/// plan).
fn add_bias(
    handle: sys::cudnnHandle_t,
    (bias_desc, y_desc): (sys::cudnnTensorDescriptor_t, sys::cudnnTensorDescriptor_t),
    pointers: Pointers,
) -> candle_core::Result<()> {
    let Some(b) = pointers.b else {
        return Ok(());
    };
    // Scaling factors are f32 for f16, bf16 and f32 data.
    let one = (&1f32 as *const f32).cast::<c_void>();
    unsafe {
        sys::cudnnAddTensor(
            handle,
            one,
            bias_desc,
            b as *const c_void,
            one,
            y_desc,
            pointers.y as *mut c_void,
        )
    }
    .result()
    .map_err(cuda_error)
}

#[derive(Default)]
struct ThreadState {
    plans: HashMap<PlanKey, Plan>,
    /// Graph-API plans, or why the graph API could not run the shape.
    graph_plans: HashMap<PlanKey, Result<GraphEntry, String>>,
    /// Per shape raced (`ConvEngine::Fastest`): whether the graph API's plan ran it faster than
    /// the legacy one.
    graph_faster: HashMap<PlanKey, bool>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

fn data_type(dtype: DType) -> candle_core::Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        other => candle_core::bail!("cuDNN convolution of {other:?} tensors"),
    })
}

fn tensor_desc(
    dtype: sys::cudnnDataType_t,
    dims: [usize; 4],
) -> candle_core::Result<sys::cudnnTensorDescriptor_t> {
    let desc = dnn::create_tensor_descriptor().map_err(cuda_error)?;
    unsafe {
        dnn::set_tensor4d_descriptor(
            desc,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            dtype,
            dims.map(|d| d as i32),
        )
    }
    .map_err(cuda_error)?;
    Ok(desc)
}

fn make_plan(
    handle: sys::cudnnHandle_t,
    key: &PlanKey,
    output: [usize; 4],
) -> candle_core::Result<Plan> {
    let dtype = data_type(key.dtype)?;
    let w = dnn::create_filter_descriptor().map_err(cuda_error)?;
    let conv = dnn::create_convolution_descriptor().map_err(cuda_error)?;
    // Made before anything can fail so that Drop frees them.
    let mut plan = Plan {
        x: tensor_desc(dtype, key.input)?,
        w,
        y: tensor_desc(dtype, output)?,
        bias: tensor_desc(dtype, [1, key.weight[0], 1, 1])?,
        conv,
        algo: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        workspace: 0,
    };
    let (p, s) = (key.padding as i32, key.stride as i32);
    unsafe {
        dnn::set_filter4d_descriptor(
            plan.w,
            dtype,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            key.weight.map(|d| d as i32),
        )
        .map_err(cuda_error)?;
        dnn::set_convolution2d_descriptor(
            plan.conv,
            p,
            p,
            s,
            s,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
        .map_err(cuda_error)?;
        // Tensor cores for half types (and TF32 where allowed); plain FMA for f32.
        let math = if key.dtype == DType::F32 && !key.tf32 {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        sys::cudnnSetConvolutionMathType(plan.conv, math)
            .result()
            .map_err(cuda_error)?;
        // Time every algorithm once (cuDNN allocates its own scratch for this) and keep the
        // fastest that ran.
        const ALGOS: usize = 8;
        let mut found = 0;
        let mut results: [sys::cudnnConvolutionFwdAlgoPerf_t; ALGOS] = std::mem::zeroed();
        sys::cudnnFindConvolutionForwardAlgorithm(
            handle,
            plan.x,
            plan.w,
            plan.conv,
            plan.y,
            ALGOS as i32,
            &mut found,
            results.as_mut_ptr(),
        )
        .result()
        .map_err(cuda_error)?;
        let best = results[..found.max(0) as usize]
            .iter()
            .filter(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
            .filter(|r| {
                key.dtype != DType::F32 || r.mathType != sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            })
            .min_by(|a, b| a.time.total_cmp(&b.time))
            .ok_or_else(|| {
                candle_core::Error::Msg("cuDNN found no convolution algorithm".into())
            })?;
        plan.algo = best.algo;
        sys::cudnnSetConvolutionMathType(plan.conv, best.mathType)
            .result()
            .map_err(cuda_error)?;
        plan.workspace = dnn::get_convolution_forward_workspace_size(
            handle, plan.x, plan.w, plan.conv, plan.y, plan.algo,
        )
        .map_err(cuda_error)?;
    }
    Ok(plan)
}

impl GraphEntry {
    /// y = conv(x, w) + bias: in the plan where it adds the bias, else in a pass after it.
    fn forward(
        &self,
        handle: sys::cudnnHandle_t,
        pointers: Pointers,
        workspace: u64,
    ) -> candle_core::Result<()> {
        if self.adds_bias {
            return pointers.with_bindings(|b| self.plan.execute(handle, b, workspace));
        }
        let unbiased = pointers.without_bias();
        unbiased.with_bindings(|b| self.plan.execute(handle, b, workspace))?;
        add_bias(handle, (self.bias.0, self.y.0), pointers)
    }
}

impl Plan {
    /// y = conv(x, w), without the bias (`workspace`: at least this plan's size).
    fn forward(
        &self,
        handle: sys::cudnnHandle_t,
        pointers: Pointers,
        workspace: u64,
    ) -> candle_core::Result<()> {
        // Scaling factors are f32 for f16, bf16 and f32 data.
        let (one, zero) = (1f32, 0f32);
        unsafe {
            dnn::convolution_forward(
                handle,
                (&one as *const f32).cast(),
                self.x,
                pointers.x as *const c_void,
                self.w,
                pointers.w as *const c_void,
                self.conv,
                self.algo,
                workspace as *mut c_void,
                self.workspace,
                (&zero as *const f32).cast(),
                self.y,
                pointers.y as *mut c_void,
            )
        }
        .map_err(cuda_error)
    }
}

/// The legacy-API plan of `key`, made (and its algorithm timed) on the shape's first use.
fn legacy_plan<'a>(
    plans: &'a mut HashMap<PlanKey, Plan>,
    handle: sys::cudnnHandle_t,
    key: &PlanKey,
    output: [usize; 4],
) -> candle_core::Result<&'a Plan> {
    // One lookup per call once the plan exists.
    if !plans.contains_key(key) {
        let plan = make_plan(handle, key, output)?;
        plans.insert(key.clone(), plan);
    }
    plans
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg("convolution plan cache".into()))
}

/// Whether the graph API's plan of `key` (built) runs it faster than the legacy API's: both
/// timed on the call's tensors when the shape is first met, remembered after. A legacy plan
/// that cannot be made leaves the graph API faster.
fn graph_faster(
    state: &mut ThreadState,
    handle: sys::cudnnHandle_t,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    key: &PlanKey,
    output: [usize; 4],
    pointers: Pointers,
) -> candle_core::Result<bool> {
    if let Some(&known) = state.graph_faster.get(key) {
        return Ok(known);
    }
    let Some(Ok(entry)) = state.graph_plans.get(key) else {
        return Ok(false);
    };
    const RUNS: usize = 3;
    let time = |workspace: usize, run: &dyn Fn(u64) -> candle_core::Result<()>| {
        let mut scratch = unsafe { stream.alloc::<u8>(workspace.max(1)) }.map_err(cuda_error)?;
        let (sp, _s) = scratch.device_ptr_mut(stream);
        super::seconds_per_run(stream, RUNS, || run(sp))
    };
    // Each with its bias added, as the call runs it.
    let graph_s = time(entry.plan.workspace, &|sp| {
        entry.forward(handle, pointers, sp)
    })?;
    let legacy_s = legacy_plan(&mut state.plans, handle, key, output).and_then(|plan| {
        time(plan.workspace, &|sp| {
            plan.forward(handle, pointers, sp)?;
            add_bias(handle, (plan.bias, plan.y), pointers)
        })
    });
    let faster = legacy_s
        .as_ref()
        .map_or(true, |legacy_s| graph_s < *legacy_s);
    tracing::debug!(
        input = ?key.input,
        weight = ?key.weight,
        graph_ms = graph_s * 1e3,
        legacy_ms = ?legacy_s.as_ref().map(|s| s * 1e3).map_err(ToString::to_string),
        chosen = if faster { "graph" } else { "legacy" },
        "convolution APIs raced"
    );
    state.graph_faster.insert(key.clone(), faster);
    Ok(faster)
}

fn dims4(layout: &Layout) -> candle_core::Result<[usize; 4]> {
    let (a, b, c, d) = layout.shape().dims4()?;
    Ok([a, b, c, d])
}

impl CudnnConv2d {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        dev: &CudaDevice,
        key: PlanKey,
        output: [usize; 4],
        x: CudaView<T>,
        w: CudaView<T>,
        b: CudaView<T>,
    ) -> candle_core::Result<CudaSlice<T>> {
        let stream = dev.cuda_stream();
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            let handle = super::cudnn_graph::handle(dev)?;
            let mut y =
                unsafe { stream.alloc::<T>(output.iter().product()) }.map_err(cuda_error)?;
            {
                let (xp, _x) = x.device_ptr(&stream);
                let (wp, _w) = w.device_ptr(&stream);
                let (bp, _b) = b.device_ptr(&stream);
                let (yp, _y) = y.device_ptr_mut(&stream);
                let pointers = Pointers {
                    x: xp,
                    w: wp,
                    y: yp,
                    b: Some(bp),
                };
                let by_graph = self.engine != ConvEngine::Legacy
                    && key.dtype != DType::F32
                    && self
                        .graph_entry(&mut state, handle, &stream, &key, output, pointers)?
                        .is_some()
                    && (self.engine != ConvEngine::Fastest
                        || graph_faster(&mut state, handle, &stream, &key, output, pointers)?);
                let graph = match state.graph_plans.get(&key) {
                    Some(Ok(entry)) if by_graph => Some(entry),
                    _ => None,
                };
                match graph {
                    Some(entry) => {
                        let mut scratch =
                            unsafe { stream.alloc::<u8>(entry.plan.workspace.max(1)) }
                                .map_err(cuda_error)?;
                        let (sp, _s) = scratch.device_ptr_mut(&stream);
                        entry.forward(handle, pointers, sp)?;
                    }
                    None => {
                        let plan = legacy_plan(&mut state.plans, handle, &key, output)?;
                        let mut workspace = unsafe { stream.alloc::<u8>(plan.workspace.max(1)) }
                            .map_err(cuda_error)?;
                        let (sp, _s) = workspace.device_ptr_mut(&stream);
                        plan.forward(handle, pointers, sp)?;
                        add_bias(handle, (plan.bias, plan.y), pointers)?;
                    }
                }
            }
            Ok(y)
        })
    }

    /// The graph-API plan of `key` (built and timed on first use), or None where the graph API
    /// cannot run it — then the legacy API runs it, unless `strict`.
    fn graph_entry<'a>(
        &self,
        state: &'a mut ThreadState,
        handle: sys::cudnnHandle_t,
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
        key: &PlanKey,
        output: [usize; 4],
        pointers: Pointers,
    ) -> candle_core::Result<Option<&'a GraphEntry>> {
        let unusable = |why: String| -> candle_core::Result<Option<&'a GraphEntry>> {
            if self.strict {
                Err(candle_core::Error::Msg(why))
            } else {
                Ok(None)
            }
        };
        if !pointers.aligned() {
            return unusable("graph-API convolution of tensors not 16-byte aligned".into());
        }
        if !state.graph_plans.contains_key(key) {
            let shape = ConvShape {
                dtype: key.dtype,
                input: key.input,
                weight: key.weight,
                output,
                padding: key.padding,
                stride: key.stride,
            };
            let entry = (|| -> candle_core::Result<GraphEntry> {
                let dtype = data_type(key.dtype)?;
                let y = TensorDescriptor(tensor_desc(dtype, output)?);
                let bias = TensorDescriptor(tensor_desc(dtype, [1, key.weight[0], 1, 1])?);
                // The bias in the plan where cuDNN fuses it and that is faster than the plain
                // plan and a pass of its own (the fused engines may be slower on NCHW).
                let fused = match BIAS_FUSION_OFF.load(std::sync::atomic::Ordering::Relaxed) {
                    false => conv_graph::build(handle, stream, &shape, pointers),
                    true => Err(candle_core::Error::Msg("switched off".into())),
                };
                if self.fused_bias_only {
                    let plan = fused?;
                    return Ok(GraphEntry {
                        y,
                        bias,
                        plan,
                        adds_bias: true,
                    });
                }
                let plain = conv_graph::build(handle, stream, &shape, pointers.without_bias());
                let (plan, adds_bias) = match (fused, plain) {
                    (Ok(fused), Ok(plain)) => {
                        let pass = super::seconds_per_run(stream, 3, || {
                            add_bias(handle, (bias.0, y.0), pointers)
                        })?;
                        match fused.seconds <= plain.seconds + pass {
                            true => (fused, true),
                            false => (plain, false),
                        }
                    }
                    (Ok(fused), Err(_)) => (fused, true),
                    (Err(no_fusion), Ok(plain)) => {
                        tracing::debug!(?shape, "no conv-bias fusion: {no_fusion}");
                        (plain, false)
                    }
                    (Err(_), Err(e)) => return Err(e),
                };
                Ok(GraphEntry {
                    y,
                    bias,
                    plan,
                    adds_bias,
                })
            })();
            match &entry {
                Ok(e) => {
                    let adds_bias = e.adds_bias;
                    tracing::debug!(?shape, adds_bias, chosen = %e.plan.chosen, "graph-API convolution plan")
                }
                Err(e) => tracing::warn!(
                    ?shape,
                    "graph-API convolution unavailable, legacy API instead: {e}"
                ),
            }
            state
                .graph_plans
                .insert(key.clone(), entry.map_err(|e| e.to_string()));
        }
        match state.graph_plans.get(key) {
            Some(Ok(entry)) => Ok(Some(entry)),
            Some(Err(why)) => unusable(why.clone()),
            None => Ok(None),
        }
    }
}

impl CustomOp3 for CudnnConv2d {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let input = dims4(x_layout)?;
        let weight = dims4(w_layout)?;
        if input[1] != weight[1] || b_layout.shape().elem_count() != weight[0] {
            candle_core::bail!(
                "convolution of {input:?} with {weight:?} and {:?} bias",
                b_layout.shape()
            );
        }
        let side = |size: usize, kernel: usize| -> candle_core::Result<usize> {
            (size + 2 * self.padding)
                .checked_sub(kernel)
                .map(|d| d / self.stride.max(1) + 1)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("a {kernel}-wide kernel over {size}"))
                })
        };
        let output = [
            input[0],
            weight[0],
            side(input[2], weight[2])?,
            side(input[3], weight[3])?,
        ];
        let dev = &x.device;
        let key = |dtype| PlanKey {
            device: dev.id(),
            dtype,
            input,
            weight,
            padding: self.padding,
            stride: self.stride.max(1),
            tf32: dtype == DType::F32 && TF32.with(|t| t.get()),
            fused_bias_only: self.fused_bias_only,
        };
        let dtype = x.dtype();
        if w.dtype() != dtype || b.dtype() != dtype {
            candle_core::bail!("cuDNN convolution needs tensors of one dtype");
        }
        let storage = super::by_dtype!(dtype, T => {
            let y = self.launch(
                dev,
                key(dtype),
                output,
                super::input::<T>(x, x_layout)?.0,
                super::input::<T>(w, w_layout)?.0,
                super::input::<T>(b, b_layout)?.0,
            )?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((storage, Shape::from(output.to_vec())))
    }
}
