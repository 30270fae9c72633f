//! Launch geometry of the fused attention kernels (cuda/attention.cu), outside the `cuda`
//! feature: the launches (engine/cuda/attention.rs) and the CPU emulation of the kernels in CI
//! (tests/cuda_emulated.rs) use the same numbers.

/// Threads per block of every attention kernel (4 warps).
pub const ATTENTION_THREADS: usize = 128;

/// Keys per tile of the tiled and pipelined kernels (`BLOCK_N`).
const TILED_KEYS: usize = 64;

/// The padded head size the kernels are built for, if any: the real size must be a multiple of 8.
pub fn padded_head_dim(d: usize) -> Option<usize> {
    if !d.is_multiple_of(8) {
        return None;
    }
    [48, 64, 80, 128, 160]
        .into_iter()
        .find(|&p| d <= p && p - d < 16)
}

/// The fused attention kernels of attention.cu. `Tiled` is the one measured on a GPU and run by
/// the models; the others are candidates, timed and checked against f32 by `candela bench
/// --kernels` (and run by the models with `candela bench --attention-kernel`) before one replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AttentionKernel {
    /// 64 queries per block (16 per warp), 64-key tiles, k/v loads then compute.
    Tiled = 0,
    /// `Tiled` with the next k/v tile copied (cp.async, two stages) during the current one.
    Pipelined = 1,
    /// FlashAttention-2's arrangement: 128 queries per block (32 per warp, each k/v fragment
    /// feeding two mma), q in shared memory, k and v loads overlapping the other half's compute.
    Wide = 2,
}

impl AttentionKernel {
    pub const ALL: [AttentionKernel; 3] = [Self::Tiled, Self::Pipelined, Self::Wide];

    pub fn name(self) -> &'static str {
        match self {
            Self::Tiled => "tiled",
            Self::Pipelined => "pipelined",
            Self::Wide => "wide",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kernel name's infix in attention.cu: `flash_attention_{infix}{f16|bf16}_{padded}`.
    pub fn infix(self) -> &'static str {
        match self {
            Self::Tiled => "",
            Self::Pipelined => "pipelined_",
            Self::Wide => "wide_",
        }
    }

    /// Queries per block: the grid is (⌈queries / this⌉, batch · heads).
    pub fn queries_per_block(self) -> usize {
        match self {
            Self::Tiled | Self::Pipelined => 64,
            Self::Wide => 128,
        }
    }

    /// Dynamic shared memory of one block for a padded head size and element size (0: the
    /// kernel's shared memory is static).
    pub fn shared_bytes(self, padded: usize, element_bytes: usize) -> usize {
        let row = padded + 8;
        let elements = match self {
            Self::Tiled => 0,
            Self::Pipelined => 4 * TILED_KEYS * row,
            // q's rows, then one tile of k and one of v (32 keys from head size 160: registers).
            Self::Wide => (128 + 2 * if padded <= 128 { 64 } else { 32 }) * row,
        };
        elements * element_bytes
    }
}
