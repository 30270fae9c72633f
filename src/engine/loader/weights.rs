//! Memory-mapped safetensors behind candle's `VarBuilder`, with errors that name the file and
//! tensor (candle's own backend names neither the file nor, on a dtype problem, the tensor).

use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};

use crate::engine::error::{EngineError, Result};

pub struct SafetensorsFile {
    path: PathBuf,
    tensors: MmapedSafetensors,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(EngineError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        // SAFETY: the file is mapped read-only; like every safetensors loader we rely on nobody
        // truncating a model file while it is loaded.
        let tensors =
            unsafe { MmapedSafetensors::new(path) }.map_err(|e| EngineError::Weights {
                path: path.to_path_buf(),
                tensor: "<header>".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// One component's files (a single file or shards) as one set of tensors.
    pub fn open_all(paths: &[PathBuf]) -> Result<Self> {
        match paths {
            [one] => Self::open(one),
            [] => Err(EngineError::Internal("no weight files given".into())),
            many => {
                if let Some(absent) = many.iter().find(|p| !p.is_file()) {
                    return Err(EngineError::MissingFile {
                        path: absent.clone(),
                    });
                }
                // SAFETY: as in `open`.
                let tensors = unsafe { MmapedSafetensors::multi(many) }.map_err(|e| {
                    EngineError::Weights {
                        path: many[0].clone(),
                        tensor: "<header>".into(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(Self {
                    path: many[0].parent().map(Path::to_path_buf).unwrap_or_default(),
                    tensors,
                })
            }
        }
    }

    /// A component of a model folder by its weight stem (`unet/diffusion_pytorch_model`).
    pub fn open_component(dir: &crate::engine::loader::ModelDir, stem: &str) -> Result<Self> {
        Self::open_all(&dir.weight_files(stem)?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The half-precision dtype every weight a CPU model holds in its own dtype
    /// (`blocks::cpu_holds_in_model_dtype`) is stored in here, if they all share one (read from
    /// the header).
    pub fn products_stored_in_half(&self) -> Option<DType> {
        let mut dtypes = self
            .tensors
            .tensors()
            .into_iter()
            .filter_map(|(name, view)| {
                let product =
                    crate::engine::models::blocks::cpu_holds_in_model_dtype(&name, view.shape());
                product.then(|| DType::try_from(view.dtype()).ok())
            });
        let first = dtypes.next()??;
        let uniform = dtypes.all(|d| d == Some(first));
        (uniform && crate::engine::models::cpu_half_linear::is_half(first)).then_some(first)
    }

    /// Each tensor's dtype in the file (read from the header).
    pub fn stored_dtypes(&self) -> StoredDtypes {
        StoredDtypes::ByName(
            self.tensors
                .tensors()
                .into_iter()
                .filter_map(|(name, view)| Some((name, DType::try_from(view.dtype()).ok()?)))
                .collect(),
        )
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// `tensor` (read as `name`) if it has the shape the config implies, else an error naming
    /// the file and the tensor.
    pub(crate) fn expect_shape(
        &self,
        name: &str,
        tensor: Tensor,
        expected: &Shape,
    ) -> candle_core::Result<Tensor> {
        expect_shape(&self.path, name, tensor, expected)
    }

    fn error(&self, tensor: &str, reason: impl Into<String>) -> candle_core::Error {
        weights_error(&self.path, tensor, reason)
    }
}

impl SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.expect_shape(name, self.get_unchecked(name, dtype, dev)?, &s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if self.tensors.get(name).is_err() {
            return Err(self.error(name, "missing from the file"));
        }
        self.tensors
            .load(name, dev)
            // An fp8 checkpoint's codes are widened on the device.
            .and_then(|t| crate::engine::models::quantized::cast(&t, dtype))
            .map_err(|e| self.error(name, e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }
}

/// `tensor` (read as `name` from the file at `path`) if it has the shape the config implies,
/// else an error naming the file and the tensor.
pub(crate) fn expect_shape(
    path: &Path,
    name: &str,
    tensor: Tensor,
    expected: &Shape,
) -> candle_core::Result<Tensor> {
    if tensor.shape() != expected {
        let reason = format!(
            "shape mismatch: the file has {:?}, the config implies {:?}",
            tensor.dims(),
            expected.dims()
        );
        return Err(weights_error(path, name, reason));
    }
    Ok(tensor)
}

/// A weight file's error as candle carries it, naming the file and the tensor.
pub(crate) fn weights_error(
    path: &Path,
    tensor: &str,
    reason: impl Into<String>,
) -> candle_core::Error {
    candle_core::Error::Msg(
        EngineError::Weights {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
        .to_string(),
    )
}

/// The dtype each tensor has in its file, for a model that holds some weights as stored (T5 on
/// the CPU: [`crate::engine::models::t5`]).
#[derive(Debug, Clone)]
pub enum StoredDtypes {
    ByName(std::collections::HashMap<String, DType>),
    /// Every tensor (random weights standing in for a checkpoint stored in this dtype).
    Every(DType),
}

impl StoredDtypes {
    pub fn of(&self, name: &str) -> Option<DType> {
        match self {
            Self::ByName(dtypes) => dtypes.get(name).copied(),
            Self::Every(dtype) => Some(*dtype),
        }
    }

    /// As stored, but what is stored in f32 as if stored in `half`: a CPU model asked for in
    /// half precision holds its f32-stored text encoders' weights in it (`blocks::cpu_half_dtype`).
    pub fn narrowed_to(self, half: Option<DType>) -> Self {
        if half.is_none() {
            return self;
        }
        match self {
            Self::ByName(dtypes) => Self::ByName(
                dtypes
                    .into_iter()
                    .map(|(name, stored)| (name, narrowed(stored, half)))
                    .collect(),
            ),
            Self::Every(stored) => Self::Every(narrowed(stored, half)),
        }
    }
}

/// `stored`, or `half` in place of f32 ([`StoredDtypes::narrowed_to`]).
pub fn narrowed(stored: DType, half: Option<DType>) -> DType {
    match half {
        Some(half) if stored == DType::F32 => half,
        _ => stored,
    }
}

/// Random weights (each layer's own init) as plain tensors, for benchmarks. Unlike candle's
/// `VarMap`, nothing here is a trainable `Var`, so inference records no autograd graph (a
/// `VarMap`-built model keeps every activation of a whole run alive through the graph).
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let var = init.var(s, DType::F32, dev)?;
        var.as_detached_tensor().to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

impl SafetensorsFile {
    /// Bytes of the widest CPU Winograd transform among this file's 3×3 convolution weights
    /// (the layers wide enough to take it, `cpu_winograd::worthwhile`): the buffer the model's
    /// thread keeps for it. Read from the header only.
    pub fn winograd_buffer_bytes(&self) -> u64 {
        self.tensors
            .tensors()
            .into_iter()
            .filter_map(|(_, view)| match view.shape() {
                [co, ci, 3, 3] if crate::engine::models::cpu_winograd::worthwhile(*ci) => Some(
                    crate::engine::models::cpu_winograd::WinogradWeight::transformed_bytes(*co, *ci)
                        as u64,
                ),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Bytes the tensors take once loaded as `dtype` (floating tensors are converted; others keep
    /// their own width). Read from the header only.
    pub fn loaded_bytes(&self, dtype: DType) -> u64 {
        self.loaded_bytes_by(|_, _| dtype)
    }

    /// [`Self::loaded_bytes`] with each floating tensor's dtype chosen by its name and stored
    /// dtype (T5 holds some layers in f32 under f16: `t5::weight_dtype`).
    pub fn loaded_bytes_by(&self, dtype_of: impl Fn(&str, DType) -> DType) -> u64 {
        self.loaded_bytes_with(|name, stored, shape| {
            (shape.iter().product::<usize>() * dtype_of(name, stored).size_in_bytes()) as u64
        })
    }

    /// The sum of `bytes_of(name, stored, shape)` over the floating tensors (a format candle
    /// cannot hold, fp8 codes, …, as f32: converted on load), the others at their own size.
    pub fn loaded_bytes_with(&self, bytes_of: impl Fn(&str, DType, &[usize]) -> u64) -> u64 {
        self.tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| match DType::try_from(view.dtype()) {
                Ok(d) if !d.is_float() => {
                    (view.shape().iter().product::<usize>() * d.size_in_bytes()) as u64
                }
                Ok(d) => bytes_of(&name, d, view.shape()),
                Err(_) => bytes_of(&name, DType::F32, view.shape()),
            })
            .sum()
    }
}
