//! Launch geometry of the fused attention kernels (cuda/attention.cu), outside the `cuda`
//! feature: the launches (engine/cuda/attention.rs) and the CPU emulation of the kernels in CI
//! (tests/cuda_emulated.rs) use the same numbers.

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

/// The fused attention kernels of attention.cu. The models run `Hopper128` at head size 128 and
/// `Hopper` at 64 where they run (9.0 devices) and `Tiled` elsewhere; the others are candidates,
/// timed and checked against f32 by `candela bench --kernels` (and run by the models with
/// `candela bench --attention-kernel`).
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
    /// Hopper's warpgroup instructions (wgmma) for both products, k and v in 128-byte-swizzled
    /// shared memory, two stages (attention_hopper.cu): compute capability 9.0, head sizes 64
    /// and 128. One warpgroup, 64 queries per block; several blocks per SM.
    Hopper = 3,
    /// `Hopper` with two warpgroups (128 queries) per block sharing the k/v tiles (half the
    /// k/v traffic from L2; one block per SM, registers) and FlashAttention-3's intra-warpgroup
    /// pipelining: each tile's softmax runs while the previous tile's p·v is in flight.
    Hopper128 = 4,
    /// `Hopper` with 128-key tiles at both head sizes (at 128: 32 KiB of k and 32 of v, as
    /// cuDNN's FLUX attention tiles; `Hopper` takes 64 there) and the softmax overlapping p·v,
    /// three stages: one block per SM at head size 128. Candidate from session 25's traces.
    HopperKeys128 = 5,
    /// `Hopper128` (two warpgroups) with `HopperKeys128`'s tiles.
    Hopper128Keys128 = 6,
}

impl AttentionKernel {
    pub const ALL: [AttentionKernel; 7] = [
        Self::Tiled,
        Self::Pipelined,
        Self::Wide,
        Self::Hopper,
        Self::Hopper128,
        Self::HopperKeys128,
        Self::Hopper128Keys128,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Tiled => "tiled",
            Self::Pipelined => "pipelined",
            Self::Wide => "wide",
            Self::Hopper => "hopper",
            Self::Hopper128 => "hopper-128",
            Self::HopperKeys128 => "hopper-k128",
            Self::Hopper128Keys128 => "hopper-128-k128",
        }
    }

    /// Whether this is one of the Hopper (wgmma, compute_90a) kernels.
    pub fn is_hopper(self) -> bool {
        matches!(
            self,
            Self::Hopper | Self::Hopper128 | Self::HopperKeys128 | Self::Hopper128Keys128
        )
    }

    /// Threads per block: 4 warps, 8 for the two-warpgroup Hopper kernels.
    pub fn threads(self) -> usize {
        match self {
            Self::Hopper128 | Self::Hopper128Keys128 => 256,
            _ => 128,
        }
    }

    /// Whether the kernel is built for this (real) head size.
    pub fn handles(self, head_dim: usize) -> bool {
        match self.is_hopper() {
            true => matches!(head_dim, 64 | 128),
            false => padded_head_dim(head_dim).is_some(),
        }
    }

    /// Whether the kernel runs on a device of this compute capability (major, minor). The
    /// Hopper kernel is compute_90a code: architecture-specific, it loads on 9.0 only.
    pub fn runs_on(self, (major, minor): (i32, i32)) -> bool {
        match self.is_hopper() {
            true => (major, minor) == (9, 0),
            false => major >= 8,
        }
    }

    /// The kernel name's infix in attention.cu: `flash_attention_{infix}{f16|bf16}_{padded}`.
    pub fn infix(self) -> &'static str {
        match self {
            Self::Tiled => "",
            Self::Pipelined => "pipelined_",
            Self::Wide => "wide_",
            Self::Hopper => "hopper_",
            Self::Hopper128 => "hopper128_",
            Self::HopperKeys128 => "hopperk_",
            Self::Hopper128Keys128 => "hopper128k_",
        }
    }

    /// Queries per block: the grid is (⌈queries / this⌉, batch · heads).
    pub fn queries_per_block(self) -> usize {
        match self {
            Self::Tiled | Self::Pipelined | Self::Hopper | Self::HopperKeys128 => 64,
            Self::Wide | Self::Hopper128 | Self::Hopper128Keys128 => 128,
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
            // Stages of k and v tiles of 16 KiB each (two; three when the softmax overlaps
            // p·v), plus 1 KiB to put them on 1024-byte boundaries (the swizzle's period).
            Self::Hopper => return 2 * 2 * 16 * 1024 + 1024,
            Self::Hopper128 => return 3 * 2 * 16 * 1024 + 1024,
            // Three stages of 128-key k and v tiles.
            Self::HopperKeys128 | Self::Hopper128Keys128 => {
                return 3 * 2 * 128 * padded * element_bytes + 1024
            }
        };
        elements * element_bytes
    }
}

/// Where an attention operand's rows are (`Strides` in attention.cu): the element offset of
/// (batch, head, row) is batch·`batch` + head·`head` + row·`row`, its head_dim values contiguous.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strides {
    pub batch: i64,
    pub head: i64,
    pub row: i64,
}

/// The operands of one attention launch (`Layouts` in attention.cu; blockIdx.y = batch · heads +
/// head).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Layouts {
    pub heads: i32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub o: Strides,
}

impl Strides {
    /// The strides of a (batch, heads, tokens, head_dim) view the kernels can read in place:
    /// rows of contiguous values on 16-byte boundaries (start and strides multiples of 8
    /// half-precision elements) — a heads-first copy, or the token-major output of a projection
    /// seen heads-first. None: copy it first.
    pub fn of_view(layout: &candle_core::Layout) -> Option<Strides> {
        let stride = layout.stride();
        if layout.dims().len() != 4 || stride[3] != 1 {
            return None;
        }
        let aligned = |v: usize| v.is_multiple_of(8);
        (aligned(layout.start_offset()) && stride[..3].iter().all(|&s| aligned(s))).then(|| {
            Strides {
                batch: stride[0] as i64,
                head: stride[1] as i64,
                row: stride[2] as i64,
            }
        })
    }

    /// The kernels' output: token-major (batch, tokens, heads, head_dim), so that merging the
    /// heads back into a width is free.
    pub fn token_major(tokens: usize, heads: usize, head_dim: usize) -> Strides {
        Strides {
            batch: (tokens * heads * head_dim) as i64,
            head: head_dim as i64,
            row: (heads * head_dim) as i64,
        }
    }
}

/// Whether a (batch, heads, tokens, head_dim) layout is the heads-first view of contiguous
/// token-major (batch, tokens, heads, head_dim) data (the fused RoPE keeps such views).
pub fn token_major_view(layout: &candle_core::Layout) -> bool {
    match layout.shape().dims4() {
        Ok((_, h, n, d)) => layout.stride() == [n * h * d, d, h * d, 1],
        Err(_) => false,
    }
}

/// Threads of a block that normalises one row of `d` values read `per_access` at a time
/// (`layer_norm_modulate` and its affine form in elementwise.cu): one per access up to a power
/// of two, 32 to 256. A UNet's 320- or 640-wide f16 rows (40 or 80 16-byte packs) left most of
/// 256 threads idle, and fewer blocks fit on an SM. The CI emulation launches as this says.
pub fn norm_row_threads(d: usize, per_access: usize) -> u32 {
    d.div_ceil(per_access.max(1))
        .next_power_of_two()
        .clamp(32, 256) as u32
}

/// A tensor of cuDNN's attention graph: its dimensions and element strides.
pub type GraphTensor = ([i64; 4], [i64; 4]);

/// The tensors of cuDNN's attention graph (engine/cuda/attention_graph.rs) over the operands'
/// views: q (batch, heads, queries, d), k and v (batch, heads, keys, d), the output token-major
/// like our kernels'. `dims` = [batch, heads, queries, keys, d].
pub struct GraphTensors {
    pub q: GraphTensor,
    pub k: GraphTensor,
    /// k seen as kᵀ (batch, heads, d, keys): the composite graph's first product takes it so.
    pub k_transposed: GraphTensor,
    pub v: GraphTensor,
    pub o: GraphTensor,
}

impl GraphTensors {
    pub fn new(dims: [usize; 5], q: Strides, k: Strides, v: Strides) -> Self {
        let [b, h, n, m, d] = dims.map(|x| x as i64);
        let rows = |s: Strides| [s.batch, s.head, s.row, 1];
        let o = Strides::token_major(n as usize, h as usize, d as usize);
        Self {
            q: ([b, h, n, d], rows(q)),
            k: ([b, h, m, d], rows(k)),
            k_transposed: ([b, h, d, m], [k.batch, k.head, 1, k.row]),
            v: ([b, h, m, d], rows(v)),
            o: ([b, h, n, d], rows(o)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn a_norm_row_block_has_a_thread_per_access_from_32_to_256() {
        // SD 1.5's and SDXL's f16 rows, an odd row read value by value, a short one, the DiTs'.
        assert_eq!(
            [norm_row_threads(320, 8), norm_row_threads(640, 8)],
            [64, 128]
        );
        assert_eq!(
            [norm_row_threads(203, 1), norm_row_threads(16, 8)],
            [256, 32]
        );
        assert_eq!(
            [norm_row_threads(3072, 8), norm_row_threads(2432, 8)],
            [256, 256]
        );
    }

    /// cuDNN's view of each operand reaches the element candle's view holds at the same index:
    /// a token-major q, a heads-first copy of k (and k transposed), a narrowed v, and the output
    /// written token-major.
    #[test]
    fn cudnn_graph_tensors_address_the_views_elements() {
        let dev = Device::Cpu;
        let (b, h, n, m, d) = (2, 3, 5, 7, 8);
        // Each element's value is its offset in storage.
        let numbered = |count: usize| {
            Tensor::arange(0u32, count as u32, &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let q = numbered(b * n * h * d)
            .reshape((b, n, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let k = numbered(b * h * m * d).reshape((b, h, m, d)).unwrap();
        let v = numbered(b * h * m * 2 * d)
            .reshape((b, h, m, 2 * d))
            .unwrap()
            .narrow(3, d, d)
            .unwrap();
        let strides = |t: &Tensor| Strides::of_view(t.layout()).unwrap();
        let graph = GraphTensors::new([b, h, n, m, d], strides(&q), strides(&k), strides(&v));
        let offset = |(dims, s): GraphTensor, index: [usize; 4]| -> f32 {
            for (i, dim) in index.iter().zip(dims) {
                assert!((*i as i64) < dim);
            }
            index.iter().zip(s).map(|(&i, s)| i as i64 * s).sum::<i64>() as f32
        };
        let at = |t: &Tensor, [i, j, k, l]: [usize; 4]| -> f32 {
            t.get(i)
                .and_then(|t| t.get(j))
                .and_then(|t| t.get(k))
                .and_then(|t| t.get(l))
                .and_then(|t| t.to_scalar::<f32>())
                .unwrap()
        };
        for (bi, hi, ri, di) in [(0, 0, 0, 0), (1, 2, 4, 7), (1, 0, 3, 5), (0, 1, 2, 3)] {
            assert_eq!(offset(graph.q, [bi, hi, ri, di]), at(&q, [bi, hi, ri, di]));
            let key = (ri + 2).min(m - 1);
            assert_eq!(
                offset(graph.k, [bi, hi, key, di]),
                at(&k, [bi, hi, key, di])
            );
            assert_eq!(
                offset(graph.k_transposed, [bi, hi, di, key]),
                at(&k, [bi, hi, key, di])
            );
            // The pointer handed to cuDNN starts at the view's offset.
            let start = v.layout().start_offset() as f32;
            assert_eq!(
                start + offset(graph.v, [bi, hi, key, di]),
                at(&v, [bi, hi, key, di])
            );
            // The output: (batch, queries, heads, d) contiguous, seen heads-first.
            let written = ((bi * n + ri) * h + hi) * d + di;
            assert_eq!(offset(graph.o, [bi, hi, ri, di]), written as f32);
        }
    }

    #[test]
    fn views_read_in_place_and_views_copied() {
        let dev = Device::Cpu;
        let (b, n, h, d) = (2, 5, 3, 16);
        // A projection's (b, n, h·d) output seen as (b, h, n, d): read in place.
        let tokens = Tensor::zeros((b, n, h * d), DType::F16, &dev).unwrap();
        let heads_first = tokens
            .reshape((b, n, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert_eq!(
            Strides::of_view(heads_first.layout()),
            Some(Strides::token_major(n, h, d))
        );
        // A contiguous heads-first tensor.
        let copy = heads_first.contiguous().unwrap();
        let row = d as i64;
        assert_eq!(
            Strides::of_view(copy.layout()),
            Some(Strides {
                batch: (h * n * d) as i64,
                head: (n * d) as i64,
                row,
            })
        );
        assert!(token_major_view(heads_first.layout()));
        assert!(!token_major_view(copy.layout()));
        // Rows that do not start on 16-byte boundaries, or are not contiguous: copied first.
        let odd = Tensor::zeros((b, h, n, d + 4), DType::F16, &dev).unwrap();
        assert_eq!(
            Strides::of_view(odd.narrow(3, 0, d).unwrap().layout()),
            None
        );
        assert_eq!(
            Strides::of_view(copy.transpose(2, 3).unwrap().layout()),
            None
        );
        assert_eq!(
            Strides::of_view(copy.narrow(3, 4, 8).unwrap().layout()),
            None
        );
    }

    /// Every kernel launches within what a block may use on the cards it runs on: shared memory
    /// (Ampere A100 163 KiB, Hopper 227 KiB per block) and 1024 threads; the Hopper kernels'
    /// stages hold 16 KiB tiles of k and v (32 KiB for the `k128` candidates at head size 128)
    /// plus the 1 KiB that aligns them.
    #[test]
    fn launches_fit_the_cards() {
        for kernel in AttentionKernel::ALL {
            let limit = if kernel.runs_on((8, 0)) { 163 } else { 227 } * 1024;
            for d in (8..=160).step_by(8).filter(|&d| kernel.handles(d)) {
                let padded = padded_head_dim(d).unwrap();
                let bytes = kernel.shared_bytes(padded, 2);
                assert!(
                    bytes <= limit,
                    "{} at head size {d}: {bytes} B",
                    kernel.name()
                );
                assert!(kernel.threads() <= 1024 && kernel.threads().is_multiple_of(128));
            }
        }
        assert!(!AttentionKernel::Hopper.handles(80) && AttentionKernel::Hopper.handles(128));
        assert!(
            !AttentionKernel::Hopper128.runs_on((8, 9))
                && !AttentionKernel::Hopper.runs_on((10, 0))
        );
        let stages = |k: AttentionKernel| (k.shared_bytes(64, 2) - 1024) / (2 * 16 * 1024);
        assert_eq!(
            (
                stages(AttentionKernel::Hopper),
                stages(AttentionKernel::Hopper128)
            ),
            (2, 3)
        );
        // The 128-key candidates: three stages of 32 KiB k and v tiles at head size 128.
        for kernel in [
            AttentionKernel::HopperKeys128,
            AttentionKernel::Hopper128Keys128,
        ] {
            assert_eq!((kernel.shared_bytes(128, 2) - 1024) / (2 * 32 * 1024), 3);
        }
    }
}
