//! GGUF files (llama.cpp's container, as the community's quantized FLUX and SD3.5 transformers
//! ship: city96's `flux1-dev-Q4_K_S.gguf`, …): a header of named tensors, each in a GGML block
//! format (q8_0, q4_k, …) or f32 / f16 / bf16. A tensor's rows are read out as blocks
//! ([`GgufFile::rows`]) — a quantized layer keeps them as the file stores them — or widened into
//! a dense tensor for everything else. Read, not mapped: pages of a mapped file count in the
//! process's resident memory until it is unmapped (FLUX-dev in q4k, a 6.8 GB file, peaked at
//! 18.3 GiB resident mapped, where the model holds 12.9).

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::engine::error::{EngineError, Result};

/// GGUF's magic, the file's first four bytes.
const MAGIC: &[u8; 4] = b"GGUF";

pub struct GgufFile {
    path: PathBuf,
    tensors: std::collections::HashMap<String, gguf_file::TensorInfo>,
    /// Where the tensor data starts (each tensor's offset is relative to it).
    data_start: u64,
    file: std::sync::Mutex<std::fs::File>,
    len: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufFile({})", self.path.display())
    }
}

/// Whether a tensor format is GGML blocks (held as stored by a quantized layer) rather than
/// plain floats.
pub fn is_block_format(format: GgmlDType) -> bool {
    !matches!(format, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

impl GgufFile {
    /// Whether `path` is a GGUF file (by its magic; a missing or short file is not).
    pub fn is_gguf(path: &Path) -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|_| &magic == MAGIC)
    }

    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::Weights {
            path: path.to_path_buf(),
            tensor: "<header>".into(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|_| EngineError::MissingFile {
            path: path.to_path_buf(),
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let gguf = Self {
            path: path.to_path_buf(),
            tensors: content.tensor_infos,
            data_start: content.tensor_data_offset,
            file: std::sync::Mutex::new(file),
            len,
        };
        // Every tensor within the file, so no read goes past its end.
        for name in gguf.tensors.keys() {
            gguf.extent(name).map_err(|e| bad(e.to_string()))?;
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's format in the file.
    pub fn format(&self, name: &str) -> Option<GgmlDType> {
        self.tensors.get(name).map(|t| t.ggml_dtype)
    }

    /// A tensor's shape, outermost first (rows, then inputs, as safetensors'; GGUF stores it
    /// innermost first and candle's reader turns it).
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.dims())
    }

    /// Bytes a tensor takes in the file.
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        let t = self.tensors.get(name)?;
        Some(t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size())
    }

    /// Where a tensor's data starts in the file, and its length.
    fn extent(&self, name: &str) -> candle_core::Result<(u64, usize)> {
        let (Some(info), Some(size)) = (self.tensors.get(name), self.stored_bytes(name)) else {
            return Err(self.error(name, "missing from the file"));
        };
        if !info
            .shape
            .elem_count()
            .is_multiple_of(info.ggml_dtype.block_size())
        {
            return Err(self.error(name, "not a whole number of blocks"));
        }
        let start = self.data_start.saturating_add(info.offset);
        match start.checked_add(size as u64) {
            Some(end) if end <= self.len => Ok((start, size)),
            _ => Err(self.error(name, "its data runs past the end of the file")),
        }
    }

    /// Rows `ranges` of a tensor (along its first dimension), one after another, as a tensor of
    /// the file's format on the CPU: cut fused projections apart (q, k, v) or reorder halves
    /// without touching the blocks (each row is whole blocks).
    pub fn rows(&self, name: &str, ranges: &[Range<usize>]) -> candle_core::Result<QTensor> {
        use std::io::{Read, Seek, SeekFrom};
        let (start, size) = self.extent(name)?;
        let (format, dims) = match (self.format(name), self.dims(name)) {
            (Some(f), Some(d)) => (f, d.to_vec()),
            _ => return Err(self.error(name, "missing from the file")),
        };
        let rows = dims.first().copied().unwrap_or(1);
        let row_bytes = size / rows.max(1);
        let mut data = vec![0u8; ranges.iter().map(|r| r.len()).sum::<usize>() * row_bytes];
        let mut file = (self.file.lock()).map_err(|_| self.error(name, "its reader panicked"))?;
        let mut at = 0;
        for r in ranges {
            if r.start > r.end || r.end > rows {
                return Err(self.error(name, format!("rows {r:?} of {rows}")));
            }
            let part = &mut data[at..at + r.len() * row_bytes];
            file.seek(SeekFrom::Start(start + (r.start * row_bytes) as u64))
                .and_then(|_| file.read_exact(part))
                .map_err(|e| self.error(name, e.to_string()))?;
            at += part.len();
        }
        let mut shape = dims;
        if let Some(first) = shape.first_mut() {
            *first = ranges.iter().map(|r| r.len()).sum();
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, format)?;
        QTensor::new(storage, shape)
    }

    /// Rows `ranges` of a tensor as a dense `dtype` tensor on `device` (blocks dequantized).
    pub fn dense_rows(
        &self,
        name: &str,
        ranges: &[Range<usize>],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let blocks = self.rows(name, ranges)?;
        (blocks.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(dtype)?.to_device(device))
            .map_err(|e| self.error(name, e.to_string()))
    }

    fn error(&self, tensor: &str, reason: impl Into<String>) -> candle_core::Error {
        super::weights::weights_error(&self.path, tensor, reason)
    }
}
