//! q8_0, q4k and q6k Linear layers on x86 CPUs with VNNI (AVX-512 VNNI, or AVX-VNNI on 256-bit
//! registers): the weight's codes held once, in tiles of 16 output columns laid out for
//! `vpdpbusd`, multiplied in int8 against the activations quantized per 32 inputs (as ggml's and
//! candle's quantized products quantize them).
//!
//! candle 0.11 keeps its own int8 tiles of such a layer beside the blocks (twice the memory,
//! `quantized::cpu_repacks`); at FLUX's shapes they ran 0.49–0.85× the f32 layer's time. These hold the
//! same codes and scales as the blocks, once — q8_0 at 8.5 bits a weight, q4k at 4.75 and q6k at
//! 6.625 (their super-blocks' d, and q4k's dmin, widened to f32) — and ran 0.37–0.53× (q8_0),
//! 0.40–0.56× (q4k) and 0.46–0.55× (q6k) with AVX-512, 0.63–0.73× (q8_0) and 0.82–1.02× (the
//! k-quants) on 256-bit registers, against the f32 layer on AVX-512 (`bench --kernels`). Each
//! block's integer dot product is exact; its scales and the sum over blocks are f32. Against the
//! blocks dequantized into f32 products (`QuantizedCpuLinear`, `--quantize q8_0-compact`) the
//! difference is the activations' rounding to 8 bits.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use half::f16;
use rayon::prelude::*;

use super::cpu_half_linear::forward_f32;
use super::cpu_util::{self, SharedOut};

/// Inputs per q8_0 block.
const QK: usize = 32;
/// Output columns per tile: one 512-bit register of i32 lanes.
const GROUP: usize = 16;
/// A tile of one block: 32 codes of 16 columns (+128, as u8: `vpdpbusd` multiplies unsigned by
/// signed bytes), four inputs of a column per 32-bit lane, then the 16 columns' f16 scales.
const TILE: usize = QK * GROUP + GROUP * 2;
/// Output columns per task.
const PANEL: usize = 128;
/// Blocks per pass over a panel: 512 inputs, whose tiles (q8_0 68 KiB, q4k 36) stay in L2 while
/// every row passes.
const PART: usize = 16;
/// Activation rows per kernel call (4 rows × 2 tiles of accumulators fill 16 registers).
const ROWS: usize = 4;

/// The kernels a CPU runs the tiles with (the tiles are the same for every one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F, BW and VNNI: 16 columns a register, `vpdpbusd` (Zen 4 and 5, Ice Lake and later
    /// server cores).
    Avx512Vnni,
    /// AVX2 with AVX-VNNI: 8 columns a register, `vpdpbusd` on 256 bits (Alder Lake and later
    /// Intel client cores). AVX2 alone (`vpmaddubsw`, `vpmaddwd`) is left to candle's tiles: a
    /// version on it ran the k-quants at 1.3–1.4× this CPU's f32 layer, slower than the blocks
    /// held once in f32 products, which candle's tiles beat where they fit.
    Avx2Vnni,
}

impl Isa {
    pub const ALL: [Self; 2] = [Self::Avx512Vnni, Self::Avx2Vnni];

    /// Whether this CPU has the instructions.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Self::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Self::Avx2Vnni => has!("avx2") && has!("fma") && has!("f16c") && has!("avxvnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// The widest of [`Isa`] this CPU runs.
pub fn isa() -> Option<Isa> {
    #[cfg(test)]
    if SIMULATED_ABSENT.get() {
        return None;
    }
    static DETECTED: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| Isa::ALL.into_iter().find(|isa| isa.runs_here()))
}

/// Whether this CPU runs our tiles for `format` (q8_0, q4k and q6k, where it has VNNI).
pub fn takes(format: GgmlDType) -> bool {
    isa().is_some() && matches!(format, GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K)
}

#[cfg(test)]
thread_local! {
    static SIMULATED_ABSENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` run on this thread as on a CPU without our kernels, where candle's tiles or the blocks
/// held once take the formats: so that a test of those paths runs on every CI machine. (Each
/// kernel set is tested directly, through `with_kernels`.)
#[cfg(test)]
pub(crate) fn as_if_absent<T>(f: impl FnOnce() -> T) -> T {
    SIMULATED_ABSENT.set(true);
    let result = f();
    SIMULATED_ABSENT.set(false);
    result
}

/// A Linear layer held as q8_0 tiles; its bias in f32.
#[derive(Debug, Clone)]
pub struct Q8TileLinear {
    /// The kernels the constructor found.
    isa: Isa,
    tiles: Vec<u8>,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

impl Q8TileLinear {
    /// Whether a layer of these widths fits the tiles: whole blocks of inputs, whole pairs of
    /// tiles of outputs.
    pub fn fits(inputs: usize, outputs: usize) -> bool {
        inputs > 0 && inputs.is_multiple_of(QK) && outputs > 0 && outputs.is_multiple_of(2 * GROUP)
    }

    /// `weight` (out, in) quantized to q8_0 (candle's codes and scales, block for block), with a
    /// bias of `out` values, multiplied by `isa`'s kernels (`bench --kernels` and the tests run
    /// each one this CPU has; models take [`Self::from_blocks_with`]).
    pub fn with_kernels(
        weight: &Tensor,
        bias: Option<&Tensor>,
        isa: Option<Isa>,
    ) -> candle_core::Result<Self> {
        if !weight.device().is_cpu() {
            candle_core::bail!("q8_0 tiles from a weight on another device");
        }
        let blocks = super::cpu_quantized_linear::quantize(weight, GgmlDType::Q8_0)?;
        Self::from_blocks_with(&blocks, bias, isa)
    }

    /// A layer of q8_0 `blocks` (out, in) as they are (a GGUF file's), multiplied by `isa`'s
    /// kernels.
    pub fn from_blocks_with(
        blocks: &QTensor,
        bias: Option<&Tensor>,
        isa: Option<Isa>,
    ) -> candle_core::Result<Self> {
        let (outputs, inputs) = blocks.shape().dims2()?;
        let isa = isa.filter(|isa| {
            isa.runs_here()
                && blocks.device().is_cpu()
                && blocks.dtype() == GgmlDType::Q8_0
                && Self::fits(inputs, outputs)
        });
        let Some(isa) = isa else {
            candle_core::bail!(
                "q8_0 tiles for {:?} blocks of a {outputs}×{inputs} weight on this CPU",
                blocks.dtype()
            );
        };
        let tiles = tiles_of(&blocks.data()?, inputs, outputs)?;
        let bias = cpu_util::optional_bias(bias, outputs)?;
        Ok(Self {
            isa,
            tiles,
            bias,
            inputs,
            outputs,
        })
    }

    /// Bytes the tiles and bias are held in.
    pub fn bytes(&self) -> usize {
        self.tiles.len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `xs` (…, in), f32 on the CPU, times the weight: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        forward_f32("a q8_0-tile", xs, self.inputs, self.outputs, |lhs, rows| {
            self.product(lhs, rows)
        })
    }

    fn product(&self, lhs: &[f32], rows: usize) -> Vec<f32> {
        let kn = [self.inputs, self.outputs];
        tiled_product(lhs, rows, kn, |x, at, dst| {
            // SAFETY: `new` checked the CPU's features; `tiled_product` keeps `at` inside the
            // tiles, `x` and `dst`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let bias = self.bias.as_deref();
                match self.isa {
                    Isa::Avx512Vnni => q8_kernel(&self.tiles, x, at, bias, dst, kn),
                    Isa::Avx2Vnni => wide256::q8_kernel(&self.tiles, x, at, bias, dst, kn),
                }
            }
        })
    }
}

/// Inputs per k-quant super-block (its f16 d, and q4k's dmin); q4k's 8 blocks of [`QK`] each have
/// a 6-bit scale and minimum, q6k's 16 sub-blocks of 16 an 8-bit signed scale.
const QK_K: usize = 256;
/// Codes of a tile (32 inputs of 16 columns) as nibbles: byte t of lane j in the h-th 64 bytes
/// holds the low four bits of code 4h + t low, of code 4(h + 4) + t high.
const NIBBLES: usize = QK * GROUP / 2;
/// A q4k tile: the nibbles (q4k's whole codes), then the columns' 6-bit scales and minimums.
const Q4K_TILE: usize = NIBBLES + 2 * GROUP;
/// A q6k tile: the nibbles; the codes' two high bits, 64 bytes per 16 inputs (bits 2h..2h + 1 of
/// byte t of lane j: code 4h + t of those 16); then the columns' scales of inputs 0..16, then of
/// 16..32 (i8).
const Q6K_TILE: usize = NIBBLES + QK * GROUP / 4 + 2 * GROUP;

/// The k-quants held as tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KQuant {
    /// A weight is d·scale·code − dmin·min, codes 0..15.
    Q4k,
    /// A weight is d·scale·(code − 32), codes 0..63.
    Q6k,
}

impl KQuant {
    fn of(format: GgmlDType) -> Option<Self> {
        match format {
            GgmlDType::Q4K => Some(Self::Q4k),
            GgmlDType::Q6K => Some(Self::Q6k),
            _ => None,
        }
    }

    fn tile_bytes(self) -> usize {
        match self {
            Self::Q4k => Q4K_TILE,
            Self::Q6k => Q6K_TILE,
        }
    }

    /// f32 super-block scales per column: d (and q4k's dmin).
    fn super_scales(self) -> usize {
        match self {
            Self::Q4k => 2,
            Self::Q6k => 1,
        }
    }
}

/// A Linear layer held as q4k or q6k tiles: the codes and block scales as stored, the
/// super-blocks' d (and dmin) widened to f32 — q4k 4.75 bits a weight (its blocks 4.5), q6k
/// 6.625 (6.5625), against candle's tiles beside its blocks, twice that; its bias in f32.
#[derive(Debug, Clone)]
pub struct KQuantTileLinear {
    kind: KQuant,
    /// The kernels the constructor found.
    isa: Isa,
    tiles: Vec<u8>,
    /// Per tile group and super-block: 16 columns' d, then (q4k) their dmin.
    supers: Vec<f32>,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

impl KQuantTileLinear {
    /// Bits each weight is held in, for the formats these tiles hold.
    pub fn bits_per_weight(format: GgmlDType) -> Option<f64> {
        let kind = KQuant::of(format)?;
        let per_tile_group = kind.tile_bytes() * (QK_K / QK) + kind.super_scales() * GROUP * 4;
        Some((per_tile_group * 8) as f64 / (QK_K * GROUP) as f64)
    }

    /// Whether a layer of these widths fits the tiles: whole super-blocks of inputs, whole pairs
    /// of tiles of outputs.
    pub fn fits(inputs: usize, outputs: usize) -> bool {
        inputs > 0
            && inputs.is_multiple_of(QK_K)
            && outputs > 0
            && outputs.is_multiple_of(2 * GROUP)
    }

    /// `weight` (out, in) quantized to `format`, q4k or q6k (candle's codes, block for block),
    /// with a bias, multiplied by `isa`'s kernels.
    pub fn with_kernels(
        weight: &Tensor,
        bias: Option<&Tensor>,
        format: GgmlDType,
        isa: Option<Isa>,
    ) -> candle_core::Result<Self> {
        if !weight.device().is_cpu() || KQuant::of(format).is_none() {
            candle_core::bail!("{format:?} tiles from a weight on this device");
        }
        let blocks = super::cpu_quantized_linear::quantize(weight, format)?;
        Self::from_blocks_with(&blocks, bias, isa)
    }

    /// A layer of q4k or q6k `blocks` (out, in) as they are (a GGUF file's), multiplied by
    /// `isa`'s kernels.
    pub fn from_blocks_with(
        blocks: &QTensor,
        bias: Option<&Tensor>,
        isa: Option<Isa>,
    ) -> candle_core::Result<Self> {
        let (outputs, inputs) = blocks.shape().dims2()?;
        let format = blocks.dtype();
        let found = KQuant::of(format).zip(isa).filter(|(_, isa)| {
            isa.runs_here() && blocks.device().is_cpu() && Self::fits(inputs, outputs)
        });
        let Some((kind, isa)) = found else {
            candle_core::bail!("{format:?} tiles for a {outputs}×{inputs} weight on this CPU");
        };
        let (tiles, supers) = super_block_tiles(kind, &blocks.data()?, inputs, outputs)?;
        let bias = cpu_util::optional_bias(bias, outputs)?;
        Ok(Self {
            kind,
            isa,
            tiles,
            supers,
            bias,
            inputs,
            outputs,
        })
    }

    /// Bytes the tiles, super-block scales and bias are held in.
    pub fn bytes(&self) -> usize {
        self.tiles.len() + 4 * self.supers.len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `xs` (…, in), f32 on the CPU, times the weight: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (k, n) = (self.inputs, self.outputs);
        // SAFETY (the kernels): as for q8_0's; the scratch is unpacked for the pass its kernel
        // reads.
        forward_f32("a k-quant-tile", xs, k, n, |lhs, rows| {
            unpacked_product(
                lhs,
                rows,
                [k, n],
                |scratch, at| {
                    scratch.resize(UNPACKED, 0);
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        unpack_k_quants(self, scratch, at)
                    }
                },
                |x, scratch, at, dst| {
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match self.isa {
                            Isa::Avx512Vnni => k_quant_kernel(self, x, scratch, at, dst),
                            Isa::Avx2Vnni => wide256::k_quant_kernel(self, x, scratch, at, dst),
                        }
                    }
                },
            )
        })
    }

    /// The first byte of tile group `g`'s tile of block `b`, and its super-block's f32 scales.
    #[inline]
    fn tile_at(&self, g: usize, b: usize) -> (*const u8, *const f32) {
        let (blocks, supers) = (self.inputs / QK, self.inputs / QK_K);
        let tile = (g * blocks + b) * self.kind.tile_bytes();
        let scales = (g * supers + b / (QK_K / QK)) * self.kind.super_scales() * GROUP;
        (self.tiles[tile..].as_ptr(), self.supers[scales..].as_ptr())
    }
}

/// ggml's 6-bit scale and minimum of block `j` of a q4k super-block.
fn q4k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Code `i` (0..32) of column `j` written into a tile's nibbles: its low four bits.
fn put_nibble(tile: &mut [u8], j: usize, i: usize, code: u8) {
    let (quad, t) = (i / 4, i % 4);
    let at = (quad % 4) * 4 * GROUP + j * 4 + t;
    tile[at] |= if quad < 4 {
        code & 0xF
    } else {
        (code & 0xF) << 4
    };
}

/// The tiles and f32 super-block scales of `kind` blocks in candle's layout (per output row, one
/// super-block after another):
/// - q4k, 144 bytes: f16 d and dmin, 12 bytes of packed 6-bit scales and minimums, 128 bytes of
///   codes (byte l of the c-th 32 holds input 64c + l low, 64c + 32 + l high);
/// - q6k, 210 bytes: 128 bytes of low nibbles (byte l of the c-th 32: input 128(c / 2) + 32(c %
///   2) + l low, that + 64 high), 64 bytes of high bit pairs (byte l of the h-th 32: inputs
///   128h + 32q + l at bits 2q), 16 i8 scales (one per 16 inputs), f16 d.
fn super_block_tiles(
    kind: KQuant,
    blocks: &[u8],
    inputs: usize,
    outputs: usize,
) -> candle_core::Result<(Vec<u8>, Vec<f32>)> {
    let (format, size) = match kind {
        KQuant::Q4k => (GgmlDType::Q4K, 4 + 12 + QK_K / 2),
        KQuant::Q6k => (GgmlDType::Q6K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
    };
    let per_row = inputs / QK_K;
    if format.type_size() != size || blocks.len() != outputs * per_row * size {
        candle_core::bail!("{format:?} blocks of an unexpected size");
    }
    let (tile_bytes, scales) = (kind.tile_bytes(), kind.super_scales() * GROUP);
    let per_super = QK_K / QK;
    let groups = outputs / GROUP;
    let mut tiles = vec![0u8; groups * per_row * per_super * tile_bytes];
    let mut supers = vec![0f32; groups * per_row * scales];
    tiles
        .par_chunks_mut(per_row * per_super * tile_bytes)
        .zip(supers.par_chunks_mut(per_row * scales))
        .enumerate()
        .for_each(|(g, (tiles, supers))| {
            for j in 0..GROUP {
                for sb in 0..per_row {
                    let at = ((g * GROUP + j) * per_row + sb) * size;
                    let block = &blocks[at..at + size];
                    let half = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]).to_f32();
                    let supers = &mut supers[sb * scales..][..scales];
                    let tiles = &mut tiles[sb * per_super * tile_bytes..][..per_super * tile_bytes];
                    match kind {
                        KQuant::Q4k => {
                            supers[j] = half(0);
                            supers[GROUP + j] = half(2);
                            let (scales, codes) = (&block[4..16], &block[16..]);
                            for (sub, tile) in tiles.chunks_exact_mut(tile_bytes).enumerate() {
                                let (scale, min) = q4k_scale_min(sub, scales);
                                tile[NIBBLES + j] = scale;
                                tile[NIBBLES + GROUP + j] = min;
                                for i in 0..QK {
                                    let byte = codes[(sub / 2) * QK + i];
                                    let code = if sub % 2 == 0 { byte } else { byte >> 4 };
                                    put_nibble(tile, j, i, code);
                                }
                            }
                        }
                        KQuant::Q6k => {
                            supers[j] = half(size - 2);
                            let (low, high) = (&block[..QK_K / 2], &block[QK_K / 2..3 * QK_K / 4]);
                            let scales = &block[3 * QK_K / 4..3 * QK_K / 4 + QK_K / 16];
                            for (sub, tile) in tiles.chunks_exact_mut(tile_bytes).enumerate() {
                                tile[NIBBLES + QK * GROUP / 4 + j] = scales[2 * sub];
                                tile[NIBBLES + QK * GROUP / 4 + GROUP + j] = scales[2 * sub + 1];
                                for i in 0..QK {
                                    let input = sub * QK + i;
                                    let (h, quarter, l) = (input / 128, input % 128 / 32, i);
                                    let byte = low[64 * h + 32 * (quarter % 2) + l];
                                    let nibble = if quarter < 2 { byte } else { byte >> 4 };
                                    put_nibble(tile, j, i, nibble);
                                    let bits = (high[32 * h + l] >> (2 * quarter)) & 3;
                                    let (quad, t) = (i / 4, i % 4);
                                    let at = NIBBLES + (quad / 4) * 4 * GROUP + j * 4 + t;
                                    tile[at] |= bits << (2 * (quad % 4));
                                }
                            }
                        }
                    }
                }
            }
        });
    Ok((tiles, supers))
}

/// The accumulators of rows r0..r0 + 4 of tiles g and g + 1: the bias (or zero) at the first
/// block, else what `out` holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn accumulators(
    bias: Option<&[f32]>,
    out: SharedOut,
    [g, r0, b0]: [usize; 3],
    n: usize,
) -> [[std::arch::x86_64::__m512; 2]; ROWS] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    for (r, acc) in acc.iter_mut().enumerate() {
        for (c, acc) in acc.iter_mut().enumerate() {
            *acc = match (b0, bias) {
                (0, Some(bias)) => _mm512_loadu_ps(bias.as_ptr().add((g + c) * GROUP)),
                (0, None) => _mm512_setzero_ps(),
                _ => _mm512_loadu_ps(out.at((r0 + r) * n + (g + c) * GROUP)),
            };
        }
    }
    acc
}

/// [`accumulators`]' rows and tiles written back to `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store(
    acc: &[[std::arch::x86_64::__m512; 2]; ROWS],
    out: SharedOut,
    [g, r0]: [usize; 2],
    n: usize,
) {
    use std::arch::x86_64::*;
    for (r, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.at((r0 + r) * n + (g + c) * GROUP), *acc);
        }
    }
}

/// The offset in [`unpacked_product`]'s scratch of tile group `g`'s codes of block `b` in the
/// pass from block `b0`.
fn unpacked_at(g: usize, b: usize, b0: usize) -> usize {
    ((g % (PANEL / GROUP)) * PART + (b - b0)) * QK * GROUP
}

/// The integer dot products of rows r0..r0 + 4 with tile groups g and g + 1 (their codes at
/// `codes`, q8_0's tile layout) over quads `quads` of block b.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots(
    codes: [*const u8; 2],
    x: &QuantizedRows,
    [r0, k, b]: [usize; 3],
    quads: std::ops::Range<usize>,
) -> [[std::arch::x86_64::__m512i; 2]; ROWS] {
    use std::arch::x86_64::*;
    let mut dots = [[_mm512_setzero_si512(); 2]; ROWS];
    for quad in quads {
        // (Not closures: those compile without the function's target features.)
        let weights = [
            _mm512_loadu_si512(codes[0].add(quad * 4 * GROUP).cast()),
            _mm512_loadu_si512(codes[1].add(quad * 4 * GROUP).cast()),
        ];
        for (r, dots) in dots.iter_mut().enumerate() {
            let at = (r0 + r) * k + b * QK + quad * 4;
            let four = _mm512_set1_epi32(x.codes.as_ptr().add(at).cast::<i32>().read_unaligned());
            for c in 0..2 {
                dots[c] = _mm512_dpbusd_epi32(dots[c], weights[c], four);
            }
        }
    }
    dots
}

/// As [`q8_kernel`] for the k-quants, their codes (unsigned, as `vpdpbusd` takes them) from
/// [`unpack_k_quants`]' scratch, for the activation codes c of scale d_x of each block: q4k a
/// block at a time (a weight is d·scale·code − dmin·min, so a block adds d_x·(d·scale·Σ code·c −
/// dmin·min·Σ c)), q6k sixteen inputs at a time (d·scale·(code − 32): each 16 add
/// d_x·d·scale·(Σ code·c − 32 Σ c)).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn k_quant_kernel(
    layer: &KQuantTileLinear,
    x: &QuantizedRows,
    scratch: &[u8],
    [g, r0, b0, b1]: [usize; 4],
    out: SharedOut,
) {
    use std::arch::x86_64::*;
    let (k, n) = (layer.inputs, layer.outputs);
    let blocks = k / QK;
    let mut acc = accumulators(layer.bias.as_deref(), out, [g, r0, b0], n);
    for b in b0..b1 {
        let (w, ds) = (layer.tile_at(g, b), layer.tile_at(g + 1, b));
        let (w, ds) = ([w.0, ds.0], [w.1, ds.1]);
        let codes = [g, g + 1].map(|g| scratch[unpacked_at(g, b, b0)..].as_ptr());
        match layer.kind {
            KQuant::Q4k => {
                let dots = dots(codes, x, [r0, k, b], 0..QK / 4);
                let mut scale = [_mm512_setzero_ps(); 2];
                let mut min = [_mm512_setzero_ps(); 2];
                for c in 0..2 {
                    let (ds, bytes) = (ds[c], w[c].add(NIBBLES));
                    let scales = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.cast()));
                    let mins = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.add(GROUP).cast()));
                    scale[c] = _mm512_mul_ps(_mm512_cvtepi32_ps(scales), _mm512_loadu_ps(ds));
                    min[c] =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(mins), _mm512_loadu_ps(ds.add(GROUP)));
                }
                for (r, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
                    let row = (r0 + r) * blocks + b;
                    let dx = *x.scales.get_unchecked(row);
                    let sum = _mm512_set1_ps(dx * *x.sums.get_unchecked(row) as f32);
                    let dx = _mm512_set1_ps(dx);
                    for c in 0..2 {
                        let dot = _mm512_cvtepi32_ps(dots[c]);
                        acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale[c], dx), acc[c]);
                        acc[c] = _mm512_fnmadd_ps(min[c], sum, acc[c]);
                    }
                }
            }
            KQuant::Q6k => {
                for sixteen in 0..2 {
                    let dots = dots(codes, x, [r0, k, b], 4 * sixteen..4 * sixteen + 4);
                    let mut scale = [_mm512_setzero_ps(); 2];
                    for c in 0..2 {
                        let bytes = w[c].add(NIBBLES + QK * GROUP / 4 + sixteen * GROUP);
                        let scales = _mm512_cvtepi8_epi32(_mm_loadu_si128(bytes.cast()));
                        scale[c] =
                            _mm512_mul_ps(_mm512_cvtepi32_ps(scales), _mm512_loadu_ps(ds[c]));
                    }
                    for (r, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
                        let row = (r0 + r) * blocks + b;
                        let dx = _mm512_set1_ps(*x.scales.get_unchecked(row));
                        let sum = *x.half_sums.get_unchecked(2 * row + sixteen);
                        let offset = _mm512_set1_epi32(32 * sum);
                        for c in 0..2 {
                            let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[c], offset));
                            acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale[c], dx), acc[c]);
                        }
                    }
                }
            }
        }
    }
    store(&acc, out, [g, r0], n);
}

/// `lhs` (rows × k) quantized per 32 inputs, times a weight held in tiles of 16 output columns
/// (n of them, whole pairs of tiles): by panels of [`PANEL`] columns over every core, each
/// passing [`PART`] blocks of inputs at a time over every [`ROWS`] rows, `kernel(x, [g, r0, b0,
/// b1], out)` accumulating tiles g and g + 1 over blocks b0..b1 for rows r0.. (onto the bias when
/// b0 = 0). Tasks write disjoint column panels.
fn tiled_product(
    lhs: &[f32],
    rows: usize,
    [k, n]: [usize; 2],
    kernel: impl Fn(&QuantizedRows, [usize; 4], SharedOut) + Sync,
) -> Vec<f32> {
    unpacked_product(
        lhs,
        rows,
        [k, n],
        |_, _| {},
        |x, _, at, out| kernel(x, at, out),
    )
}

/// Bytes of a panel's codes widened to one per input for one pass: [`PART`] blocks of
/// [`PANEL`] columns, laid out as q8_0's tiles (code t of column j of a block at (t / 4)·64 + 4j +
/// t % 4), tile group by tile group.
const UNPACKED: usize = PANEL / GROUP * PART * QK * GROUP;

/// As [`tiled_product`], with each pass over a panel first widening its codes into a
/// per-task scratch of [`UNPACKED`] bytes that `kernel(x, scratch, [g, r0, b0, b1], out)` reads
/// for every row (`unpack(scratch, [g0, g1, b0, b1])`: tile groups g0..g1, blocks b0..b1): where
/// putting a code together takes more than a mask (q6k), or registers are too few to widen them
/// beside the accumulators (the k-quants on 256 bits), that is done once per pass instead of once
/// per few rows.
fn unpacked_product(
    lhs: &[f32],
    rows: usize,
    [k, n]: [usize; 2],
    unpack: impl Fn(&mut Vec<u8>, [usize; 4]) + Sync,
    kernel: impl Fn(&QuantizedRows, &[u8], [usize; 4], SharedOut) + Sync,
) -> Vec<f32> {
    let padded = rows.next_multiple_of(ROWS);
    let x = QuantizedRows::new(lhs, rows, padded, k);
    let mut out = vec![0f32; padded * n];
    let dst = SharedOut(out.as_mut_ptr());
    let blocks = k / QK;
    (0..n.div_ceil(PANEL)).into_par_iter().for_each_init(
        Vec::new,
        |scratch: &mut Vec<u8>, panel| {
            let groups = panel * PANEL / GROUP..((panel + 1) * PANEL).min(n) / GROUP;
            for b0 in (0..blocks).step_by(PART) {
                let b1 = (b0 + PART).min(blocks);
                unpack(scratch, [groups.start, groups.end, b0, b1]);
                for r0 in (0..padded).step_by(ROWS) {
                    for g in groups.clone().step_by(2) {
                        kernel(&x, scratch, [g, r0, b0, b1], dst);
                    }
                }
            }
        },
    );
    out.truncate(rows * n);
    out
}

/// The tiles of q8_0 `blocks` (candle's layout: per output row, 34-byte blocks of an f16 scale
/// then 32 signed codes) of a weight (`outputs`, `inputs`).
fn tiles_of(blocks: &[u8], inputs: usize, outputs: usize) -> candle_core::Result<Vec<u8>> {
    const BLOCK: usize = 2 + QK;
    let per_row = inputs / QK;
    if GgmlDType::Q8_0.type_size() != BLOCK || blocks.len() != outputs * per_row * BLOCK {
        candle_core::bail!("q8_0 blocks of an unexpected size");
    }
    let mut tiles = vec![0u8; outputs / GROUP * per_row * TILE];
    tiles
        .par_chunks_mut(per_row * TILE)
        .enumerate()
        .for_each(|(g, group)| {
            for (b, tile) in group.chunks_exact_mut(TILE).enumerate() {
                for j in 0..GROUP {
                    let at = ((g * GROUP + j) * per_row + b) * BLOCK;
                    let block = &blocks[at..at + BLOCK];
                    for (t, &code) in block[2..].iter().enumerate() {
                        tile[(t / 4) * 4 * GROUP + j * 4 + t % 4] = (code as i8 as i16 + 128) as u8;
                    }
                    tile[QK * GROUP + 2 * j..][..2].copy_from_slice(&block[..2]);
                }
            }
        });
    Ok(tiles)
}

/// Activation rows quantized per 32 inputs: d = max|x| / 127, codes round(x / d); with each
/// block's scale and the sum of its codes (q8_0: 128 × it is what the +128 on the weight codes
/// adds to a dot product; q4k: what a block's minimum multiplies). Rows past `rows` up to
/// `padded` are zeros.
struct QuantizedRows {
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    /// The sums of each 16 codes (q6k's scales cover 16 inputs).
    half_sums: Vec<i32>,
}

impl QuantizedRows {
    fn new(x: &[f32], rows: usize, padded: usize, k: usize) -> Self {
        let blocks = k / QK;
        let mut codes = vec![0i8; padded * k];
        let mut scales = vec![0f32; padded * blocks];
        let mut sums = vec![0i32; padded * blocks];
        let mut half_sums = vec![0i32; padded * 2 * blocks];
        codes
            .par_chunks_mut(k)
            .zip(scales.par_chunks_mut(blocks))
            .zip(sums.par_chunks_mut(blocks))
            .zip(half_sums.par_chunks_mut(2 * blocks))
            .zip(x.par_chunks(k).take(rows))
            .for_each(|((((codes, scales), sums), half_sums), x)| {
                for (b, values) in x.chunks_exact(QK).enumerate() {
                    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = max / 127.0;
                    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let codes = &mut codes[b * QK..][..QK];
                    for (c, &v) in codes.iter_mut().zip(values) {
                        *c = (v * inverse).round() as i32 as i8;
                    }
                    let sum = |codes: &[i8]| codes.iter().map(|&c| i32::from(c)).sum::<i32>();
                    let (first, second) = codes.split_at(QK / 2);
                    half_sums[2 * b] = sum(first);
                    half_sums[2 * b + 1] = sum(second);
                    scales[b] = d;
                    sums[b] = half_sums[2 * b] + half_sums[2 * b + 1];
                }
            });
        Self {
            codes,
            scales,
            sums,
            half_sums,
        }
    }
}

/// Output rows r0..r0 + 4 of tiles g and g + 1 (32 columns), accumulated over blocks b0..b1 onto
/// what `out` holds (or onto the bias, or zero, when b0 = 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_kernel(
    tiles: &[u8],
    x: &QuantizedRows,
    [g, r0, b0, b1]: [usize; 4],
    bias: Option<&[f32]>,
    out: SharedOut,
    [k, n]: [usize; 2],
) {
    use std::arch::x86_64::*;
    let blocks = k / QK;
    let tile = |g: usize, b: usize| tiles.as_ptr().add((g * blocks + b) * TILE);
    let mut acc = accumulators(bias, out, [g, r0, b0], n);
    for b in b0..b1 {
        let (w0, w1) = (tile(g, b), tile(g + 1, b));
        let mut dots = [[_mm512_setzero_si512(); 2]; ROWS];
        for quad in 0..QK / 4 {
            let c0 = _mm512_loadu_si512(w0.add(quad * 4 * GROUP).cast());
            let c1 = _mm512_loadu_si512(w1.add(quad * 4 * GROUP).cast());
            for (r, dots) in dots.iter_mut().enumerate() {
                let four = x
                    .codes
                    .as_ptr()
                    .add((r0 + r) * k + b * QK + quad * 4)
                    .cast::<i32>()
                    .read_unaligned();
                let four = _mm512_set1_epi32(four);
                dots[0] = _mm512_dpbusd_epi32(dots[0], c0, four);
                dots[1] = _mm512_dpbusd_epi32(dots[1], c1, four);
            }
        }
        let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(w0.add(QK * GROUP).cast()));
        let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(w1.add(QK * GROUP).cast()));
        for (r, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
            let row = (r0 + r) * blocks + b;
            let scale = _mm512_set1_ps(*x.scales.get_unchecked(row));
            let offset = _mm512_set1_epi32(128 * *x.sums.get_unchecked(row));
            for (c, d) in [d0, d1].into_iter().enumerate() {
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[c], offset));
                acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, scale), acc[c]);
            }
        }
    }
    store(&acc, out, [g, r0], n);
}

/// The codes of tile groups g0..g1, blocks b0..b1, widened to a byte each (q4k 0..15; q6k
/// 0..63, a nibble and a bit pair put together) into `scratch`'s q8_0 layout
/// ([`unpacked_at`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_k_quants(
    layer: &KQuantTileLinear,
    scratch: &mut [u8],
    [g0, g1, b0, b1]: [usize; 4],
) {
    use std::arch::x86_64::*;
    let (low, high) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    for g in g0..g1 {
        for b in b0..b1 {
            let (tile, _) = layer.tile_at(g, b);
            let dst = scratch[unpacked_at(g, b, b0)..][..QK * GROUP].as_mut_ptr();
            // Each 64-byte row of a tile (a quad of 16 columns) as two halves of 8 columns.
            for half in [0, 32] {
                for h in 0..4 {
                    let raw = _mm256_loadu_si256(tile.add(h * 4 * GROUP + half).cast());
                    let nibbles = [
                        _mm256_and_si256(raw, low),
                        _mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
                    ];
                    for (upper, nibble) in nibbles.into_iter().enumerate() {
                        let code = match layer.kind {
                            KQuant::Q4k => nibble,
                            KQuant::Q6k => {
                                let at = NIBBLES + upper * 4 * GROUP + half;
                                let pairs = _mm256_loadu_si256(tile.add(at).cast());
                                // Bit pair h to bits 4 and 5 (16-bit shifts: what crosses
                                // a byte is masked).
                                let bits = match h {
                                    0 => _mm256_slli_epi16(pairs, 4),
                                    1 => _mm256_slli_epi16(pairs, 2),
                                    2 => pairs,
                                    _ => _mm256_srli_epi16(pairs, 2),
                                };
                                _mm256_or_si256(nibble, _mm256_and_si256(bits, high))
                            }
                        };
                        let quad = 4 * upper + h;
                        _mm256_storeu_si256(dst.add(quad * 4 * GROUP + half).cast(), code);
                    }
                }
            }
        }
    }
}

/// The kernels on 256-bit registers (CPUs without AVX-512): 8 columns a register, two rows at a
/// time (16 registers), over the same tiles. The k-quants' codes are widened into
/// [`unpacked_product`]'s scratch first, so one inner loop serves every format.
#[cfg(target_arch = "x86_64")]
mod wide256 {
    use super::*;
    use std::arch::x86_64::*;

    /// The integer dot products of rows r and r + 1 with 16 columns (two registers of 8) over
    /// quads `quads` of block b, from codes in q8_0's tile layout at `codes`.
    #[inline(always)]
    unsafe fn dots(
        codes: *const u8,
        x: &QuantizedRows,
        [r, k, b]: [usize; 3],
        quads: std::ops::Range<usize>,
    ) -> [[__m256i; 2]; 2] {
        let mut dots = [[_mm256_setzero_si256(); 2]; 2];
        for q in quads {
            let w = [
                _mm256_loadu_si256(codes.add(q * 4 * GROUP).cast()),
                _mm256_loadu_si256(codes.add(q * 4 * GROUP + 32).cast()),
            ];
            for (i, dots) in dots.iter_mut().enumerate() {
                let at = (r + i) * k + b * QK + q * 4;
                let four =
                    _mm256_set1_epi32(x.codes.as_ptr().add(at).cast::<i32>().read_unaligned());
                for h in 0..2 {
                    dots[h] = _mm256_dpbusd_avx_epi32(dots[h], w[h], four);
                }
            }
        }
        dots
    }

    /// Rows r and r + 1 of columns c0..c0 + 16: the bias (or zero) at the first block, else what
    /// `out` holds.
    #[inline(always)]
    unsafe fn load(
        bias: Option<&[f32]>,
        out: SharedOut,
        [r, c0, b0, n]: [usize; 4],
    ) -> [[__m256; 2]; 2] {
        let mut acc = [[_mm256_setzero_ps(); 2]; 2];
        for (i, acc) in acc.iter_mut().enumerate() {
            for (h, acc) in acc.iter_mut().enumerate() {
                *acc = match (b0, bias) {
                    (0, Some(bias)) => _mm256_loadu_ps(bias.as_ptr().add(c0 + 8 * h)),
                    (0, None) => _mm256_setzero_ps(),
                    _ => _mm256_loadu_ps(out.at((r + i) * n + c0 + 8 * h)),
                };
            }
        }
        acc
    }

    #[inline(always)]
    unsafe fn store(acc: &[[__m256; 2]; 2], out: SharedOut, [r, c0, n]: [usize; 3]) {
        for (i, acc) in acc.iter().enumerate() {
            for (h, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.at((r + i) * n + c0 + 8 * h), *acc);
            }
        }
    }

    /// Eight bytes (signed or not) widened to f32 lanes, times eight f32 at `by`.
    #[inline(always)]
    unsafe fn scaled<const SIGNED: bool>(bytes: *const u8, by: *const f32) -> __m256 {
        let eight = _mm_loadl_epi64(bytes.cast());
        let wide = if SIGNED {
            _mm256_cvtepi8_epi32(eight)
        } else {
            _mm256_cvtepu8_epi32(eight)
        };
        _mm256_mul_ps(_mm256_cvtepi32_ps(wide), _mm256_loadu_ps(by))
    }

    /// As the AVX-512 `q8_kernel`: tiles g and g + 1, rows r0..r0 + 4, blocks b0..b1.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn q8_kernel(
        tiles: &[u8],
        x: &QuantizedRows,
        [g0, r0, b0, b1]: [usize; 4],
        bias: Option<&[f32]>,
        out: SharedOut,
        [k, n]: [usize; 2],
    ) {
        let blocks = k / QK;
        for g in [g0, g0 + 1] {
            for r in (r0..r0 + ROWS).step_by(2) {
                let mut acc = load(bias, out, [r, g * GROUP, b0, n]);
                for b in b0..b1 {
                    let tile = tiles.as_ptr().add((g * blocks + b) * TILE);
                    let dots = dots(tile, x, [r, k, b], 0..QK / 4);
                    let d = [
                        _mm256_cvtph_ps(_mm_loadu_si128(tile.add(QK * GROUP).cast())),
                        _mm256_cvtph_ps(_mm_loadu_si128(tile.add(QK * GROUP + 16).cast())),
                    ];
                    for (i, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
                        let row = (r + i) * blocks + b;
                        let scale = _mm256_set1_ps(*x.scales.get_unchecked(row));
                        let offset = _mm256_set1_epi32(128 * *x.sums.get_unchecked(row));
                        for h in 0..2 {
                            let dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(dots[h], offset));
                            acc[h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d[h], scale), acc[h]);
                        }
                    }
                }
                store(&acc, out, [r, g * GROUP, n]);
            }
        }
    }

    /// The k-quants from [`unpack_k_quants`]' scratch: q4k a block at a time (d·scale·Σ code·c −
    /// dmin·min·Σ c), q6k sixteen inputs at a time (d·scale·(Σ code·c − 32 Σ c)).
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn k_quant_kernel(
        layer: &KQuantTileLinear,
        x: &QuantizedRows,
        scratch: &[u8],
        [g0, r0, b0, b1]: [usize; 4],
        out: SharedOut,
    ) {
        let (k, n) = (layer.inputs, layer.outputs);
        let blocks = k / QK;
        for g in [g0, g0 + 1] {
            for r in (r0..r0 + ROWS).step_by(2) {
                let mut acc = load(layer.bias.as_deref(), out, [r, g * GROUP, b0, n]);
                for b in b0..b1 {
                    let (tile, ds) = layer.tile_at(g, b);
                    let codes = scratch[unpacked_at(g, b, b0)..].as_ptr();
                    match layer.kind {
                        KQuant::Q4k => {
                            let dots = dots(codes, x, [r, k, b], 0..QK / 4);
                            let (bytes, g) = (tile.add(NIBBLES), GROUP);
                            let scale = [
                                scaled::<false>(bytes, ds),
                                scaled::<false>(bytes.add(8), ds.add(8)),
                            ];
                            let min = [
                                scaled::<false>(bytes.add(g), ds.add(g)),
                                scaled::<false>(bytes.add(g + 8), ds.add(g + 8)),
                            ];
                            for (i, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
                                let row = (r + i) * blocks + b;
                                let dx = *x.scales.get_unchecked(row);
                                let sum = _mm256_set1_ps(dx * *x.sums.get_unchecked(row) as f32);
                                let dx = _mm256_set1_ps(dx);
                                for h in 0..2 {
                                    let dot = _mm256_cvtepi32_ps(dots[h]);
                                    acc[h] =
                                        _mm256_fmadd_ps(dot, _mm256_mul_ps(scale[h], dx), acc[h]);
                                    acc[h] = _mm256_fnmadd_ps(min[h], sum, acc[h]);
                                }
                            }
                        }
                        KQuant::Q6k => {
                            for sixteen in 0..2 {
                                let quads = 4 * sixteen..4 * sixteen + 4;
                                let dots = dots(codes, x, [r, k, b], quads);
                                let at = NIBBLES + QK * GROUP / 4 + sixteen * GROUP;
                                let scale = [
                                    scaled::<true>(tile.add(at), ds),
                                    scaled::<true>(tile.add(at + 8), ds.add(8)),
                                ];
                                for (i, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
                                    let row = (r + i) * blocks + b;
                                    let dx = _mm256_set1_ps(*x.scales.get_unchecked(row));
                                    let sum = *x.half_sums.get_unchecked(2 * row + sixteen);
                                    let offset = _mm256_set1_epi32(32 * sum);
                                    for h in 0..2 {
                                        let dot =
                                            _mm256_cvtepi32_ps(_mm256_sub_epi32(dots[h], offset));
                                        acc[h] = _mm256_fmadd_ps(
                                            dot,
                                            _mm256_mul_ps(scale[h], dx),
                                            acc[h],
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                store(&acc, out, [r, g * GROUP, n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// The kernels a test runs: each of [`Isa`] (`None`: refused), and whether this CPU runs it.
    fn every_kernel() -> impl Iterator<Item = (Option<Isa>, bool)> {
        Isa::ALL
            .into_iter()
            .map(|isa| (Some(isa), isa.runs_here()))
            .chain([(None, false)])
    }

    /// q8_0's tiles against [`check_against_codes`], on every set of kernels this CPU runs.
    /// Shapes: one row, a partial pass over the inputs and a partial panel
    /// with a bias, rows not a multiple of four.
    #[test]
    fn q8_0_tiles_multiply_the_codes_exactly_per_block() -> candle_core::Result<()> {
        for (isa, runs) in every_kernel() {
            for (rows, inputs, outputs, with_bias) in [
                (1, 32, 32, false),
                (5, QK * (PART + 1), PANEL + 32, true),
                (77, 64, 64, false),
            ] {
                let (weight, bias, xs) = case(rows, inputs, outputs, with_bias)?;
                let layer = Q8TileLinear::with_kernels(&weight, bias.as_ref(), isa);
                if !runs {
                    assert!(layer.is_err(), "{isa:?}");
                    continue;
                }
                check_q8_0(layer?, [inputs, outputs], (&weight, bias.as_ref(), &xs))?;
            }
        }
        Ok(())
    }

    fn check_q8_0(
        layer: Q8TileLinear,
        [inputs, outputs]: [usize; 2],
        (weight, bias, xs): (&Tensor, Option<&Tensor>, &Tensor),
    ) -> candle_core::Result<()> {
        let with_bias = bias.is_some();
        {
            let expected = inputs * outputs * 17 / 16 + 4 * outputs * usize::from(with_bias);
            assert_eq!(layer.bytes(), expected);
            check_against_codes(&layer.forward(xs)?, GgmlDType::Q8_0, weight, bias, xs)?;
        }
        Ok(())
    }

    /// q4k's and q6k's tiles against [`check_against_codes`], on every set of kernels this CPU
    /// runs: one super-block and one row; three super-blocks (past one pass) over a partial
    /// panel with a bias; 77 rows.
    #[test]
    fn k_quant_tiles_multiply_the_codes_exactly_per_block() -> candle_core::Result<()> {
        for ((isa, runs), format) in
            every_kernel().flat_map(|k| [(k, GgmlDType::Q4K), (k, GgmlDType::Q6K)])
        {
            for (rows, inputs, outputs, with_bias) in [
                (1, QK_K, 32, false),
                (5, 3 * QK_K, PANEL + 32, true),
                (77, QK_K, 64, false),
            ] {
                let (weight, bias, xs) = case(rows, inputs, outputs, with_bias)?;
                let layer = KQuantTileLinear::with_kernels(&weight, bias.as_ref(), format, isa);
                if !runs {
                    assert!(layer.is_err(), "{isa:?}");
                    continue;
                }
                let layer = layer?;
                let bits = KQuantTileLinear::bits_per_weight(format).unwrap();
                let held = (inputs * outputs) as f64 * bits / 8.0;
                assert_eq!(
                    layer.bytes(),
                    held as usize + 4 * outputs * usize::from(with_bias)
                );
                check_against_codes(&layer.forward(&xs)?, format, &weight, bias.as_ref(), &xs)?;
            }
        }
        // What they hold a weight in: the blocks' bits and their d (and dmin) widened to f32.
        assert_eq!(
            KQuantTileLinear::bits_per_weight(GgmlDType::Q4K),
            Some(4.75)
        );
        assert_eq!(
            KQuantTileLinear::bits_per_weight(GgmlDType::Q6K),
            Some(6.625)
        );
        assert_eq!(KQuantTileLinear::bits_per_weight(GgmlDType::Q5K), None);
        Ok(())
    }

    /// A random weight (out, in), bias and input (rows, in).
    fn case(
        rows: usize,
        inputs: usize,
        outputs: usize,
        with_bias: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let dev = Device::Cpu;
        let bias = with_bias
            .then(|| Tensor::randn(0f32, 3., outputs, &dev))
            .transpose()?;
        Ok((
            Tensor::randn(0f32, 0.5, (outputs, inputs), &dev)?,
            bias,
            Tensor::randn(0f32, 1., (rows, inputs), &dev)?,
        ))
    }

    /// `ours` against the same arithmetic in f64: the activations' codes and scales times
    /// candle's dequantization of `weight` in `format`, block by block. Within f32's rounding of
    /// each block's scaling and of the sum over blocks ((blocks + 3) roundings of the terms'
    /// magnitudes: d_x Σ|c|(|w| + 2 max|w|), which bounds q4k's two parts, d·scale·Σ code·c and
    /// dmin·min·Σ c, whose minimum lies within the block's range), plus candle's own rounding of
    /// each dequantized weight. And against the f32 product of the dequantized weight within the
    /// activations' rounding: half a code of its block's scale per input.
    fn check_against_codes(
        ours: &Tensor,
        format: GgmlDType,
        weight: &Tensor,
        bias: Option<&Tensor>,
        xs: &Tensor,
    ) -> candle_core::Result<()> {
        let (rows, inputs) = xs.dims2()?;
        let outputs = weight.dim(0)?;
        let ours: Vec<Vec<f32>> = ours.to_vec2()?;
        let w: Vec<Vec<f32>> = QTensor::quantize(weight, format)?
            .dequantize(&Device::Cpu)?
            .to_vec2()?;
        let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = match bias {
            Some(b) => b.to_vec1()?,
            None => vec![0.0; outputs],
        };
        let q = QuantizedRows::new(&x, rows, rows, inputs);
        let blocks = inputs / QK;
        let eps = f64::from(f32::EPSILON);
        for i in 0..rows {
            for j in 0..outputs {
                let (mut exact, mut magnitude) = (f64::from(b[j]), f64::from(b[j].abs()));
                let (mut f32_product, mut activation) = (f64::from(b[j]), 0f64);
                for blk in 0..blocks {
                    let d = f64::from(q.scales[i * blocks + blk]);
                    let span = blk * QK..(blk + 1) * QK;
                    let largest = w[j][span.clone()]
                        .iter()
                        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
                    for t in span {
                        let (wt, c) = (f64::from(w[j][t]), f64::from(q.codes[i * inputs + t]));
                        exact += d * c * wt;
                        magnitude += d * c.abs() * (wt.abs() + 2.0 * largest);
                        f32_product += f64::from(x[i * inputs + t]) * wt;
                        activation += d / 2.0 * wt.abs();
                    }
                }
                let bound = (blocks + 3) as f64 * eps * magnitude;
                let got = f64::from(ours[i][j]);
                assert!(
                    (got - exact).abs() <= bound,
                    "{format:?} {rows}×{inputs}→{outputs} ({i}, {j}): {got} vs {exact} (bound {bound})"
                );
                assert!((got - f32_product).abs() <= activation + bound);
            }
        }
        Ok(())
    }

    /// Codes within half a step of x / d and inside ±127, with their sum; padded
    /// rows are zeros.
    #[test]
    fn activations_quantize_per_block() -> candle_core::Result<()> {
        let x: Vec<f32> = Tensor::randn(0f32, 2., (3, 64), &Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let q = QuantizedRows::new(&x, 3, 4, 64);
        for row in 0..4 {
            for blk in 0..2 {
                let d = q.scales[row * 2 + blk];
                let codes = &q.codes[row * 64 + blk * QK..][..QK];
                let sum = |codes: &[i8]| codes.iter().map(|&c| i32::from(c)).sum::<i32>();
                assert_eq!(q.sums[row * 2 + blk], sum(codes));
                let halves = &q.half_sums[(row * 2 + blk) * 2..][..2];
                assert_eq!(halves, [sum(&codes[..16]), sum(&codes[16..])]);
                for (t, &c) in codes.iter().enumerate() {
                    assert!(c.unsigned_abs() <= 127);
                    if row == 3 {
                        assert_eq!((c, d), (0, 0.0));
                    } else {
                        let v = x[row * 64 + blk * QK + t];
                        assert!((v / d - c as f32).abs() <= 0.5 + 1e-4, "{v} {d} {c}");
                    }
                }
            }
        }
        Ok(())
    }
}
