//! A random stream that reproduces `torch.Generator("cpu").manual_seed(seed)` and
//! `torch.randn(shape, generator=g, dtype=torch.float32)` exactly, so that a seed means the same
//! picture here as in diffusers / A1111 ("same seed, same picture").
//!
//! torch's CPU generator is a plain MT19937 seeded with the low 32 bits of the seed. `randn` for a
//! float32 tensor of at least 16 elements fills the tensor with 24-bit uniforms, then turns each
//! block of 16 into normals with Box-Muller (first 8 = radius*cos, last 8 = radius*sin); a tail
//! that is not a multiple of 16 redraws the last 16 slots. Smaller tensors take the scalar path:
//! double-precision Box-Muller with one cached spare. A float16/bfloat16 tensor (what diffusers
//! draws when it serves in half precision) differs only there: torch fills just the whole
//! blocks of 16 with uniforms before redrawing the tail ([`TorchGenerator::randn_in`]).

use candle_core::DType;

const N: usize = 624;
const M: usize = 397;

#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    index: usize,
    /// The spare normal of the scalar (double) path, kept across calls as torch keeps it.
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("index", &self.index)
            .finish()
    }
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            index: N,
            next_double_normal: None,
        }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// torch's `uniform_real_distribution<float>`: 24 random bits scaled to [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        ((self.next_u32() & ((1 << 24) - 1)) as f64 * (1.0 / (1u64 << 24) as f64)) as f32
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(spare) = self.next_double_normal.take() {
            return spare;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (1.0 - u2).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel, dtype=float32)` in row-major order.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        self.randn_in(numel, DType::F32)
    }

    /// `torch.randn(numel, dtype=dtype)` in row-major order, before the rounding to `dtype`.
    /// For f16/bf16 torch (2.15, CPU) draws uniforms for the whole blocks of 16 only, not for
    /// every element, before redrawing the tail: the tail's values, and every later draw, then
    /// differ from the f32 stream's (measured against torch: a 100-value f16 draw differed in its
    /// last 16 by up to 3).
    pub fn randn_in(&mut self, numel: usize, dtype: DType) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let drawn = match dtype {
            DType::F16 | DType::BF16 => numel / 16 * 16,
            _ => numel,
        };
        let mut data: Vec<f32> = (0..drawn).map(|_| self.uniform_f32()).collect();
        data.resize(numel, 0.0);
        let mut i = 0;
        while i + 16 <= numel {
            normal_fill_16(&mut data[i..i + 16]);
            i += 16;
        }
        if !numel.is_multiple_of(16) {
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }
}

fn normal_fill_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0f64 * std::f64::consts::PI * u2 as f64) as f32;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // The C++ standard requires the 10000th output of mt19937 seeded with 5489 to be 4123659995.
        let mut g = TorchGenerator::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }
}

/// The noise of a batch that serves several requests at once: each request keeps its own
/// generator, and its rows of every noise tensor come from it, in the order a run of that request
/// alone would draw them. A batch of one is exactly that request's run.
#[derive(Debug, Clone)]
pub struct BatchNoise {
    /// (generator, rows of the batch it owns), in batch order.
    streams: Vec<(TorchGenerator, usize)>,
}

impl BatchNoise {
    /// One request's stream (every row).
    pub fn single(seed: u64, rows: usize) -> Self {
        Self {
            streams: vec![(TorchGenerator::new(seed), rows)],
        }
    }

    /// One stream per request: `(seed, rows)` in batch order.
    pub fn per_request(requests: &[(u64, usize)]) -> Self {
        Self {
            streams: requests
                .iter()
                .map(|&(seed, rows)| (TorchGenerator::new(seed), rows))
                .collect(),
        }
    }

    pub fn rows(&self) -> usize {
        self.streams.iter().map(|(_, r)| r).sum()
    }

    /// Normal noise for a tensor whose first dimension is the batch (`numel` values in all):
    /// each request's rows from its own generator.
    pub fn randn(&mut self, numel: usize) -> Result<Vec<f32>, String> {
        self.randn_in(numel, DType::F32)
    }

    /// [`Self::randn`] drawn as torch draws a `dtype` tensor ([`TorchGenerator::randn_in`]).
    pub fn randn_in(&mut self, numel: usize, dtype: DType) -> Result<Vec<f32>, String> {
        let rows = self.rows();
        if rows == 0 || !numel.is_multiple_of(rows) {
            return Err(format!(
                "noise for {numel} values cannot be split over a batch of {rows} rows"
            ));
        }
        let per_row = numel / rows;
        let mut out = Vec::with_capacity(numel);
        for (generator, r) in &mut self.streams {
            out.extend(generator.randn_in(*r * per_row, dtype));
        }
        Ok(out)
    }
}

impl BatchNoise {
    /// The generator of the `k`-th request in the batch.
    pub fn stream(&mut self, k: usize) -> Option<&mut TorchGenerator> {
        self.streams.get_mut(k).map(|(g, _)| g)
    }
}
