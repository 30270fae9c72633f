// Memory-bound ops of a denoiser step, fused and with 16-byte accesses. candle's element-wise
// kernels load one element per thread per iteration (about 1.4 TB/s on an H200 against PyTorch's
// 3.5+), its broadcasting kernels compute a strided index per element, and a Linear's bias, a
// GEGLU or a GroupNorm(+SiLU) is several of them in a row.
//
// Every kernel computes in f32 and takes T ∈ {float, __half, __nv_bfloat16}. `vec` (decided by the
// caller: sizes multiple of the pack and 16-byte aligned pointers) selects 16-byte packs of
// 16 / sizeof(T) elements; otherwise one element at a time.
//
// tests/cuda_emulator/ compiles this file as host C++ (CANDELA_EMULATE) to run the kernels on the
// CPU in CI.
#ifndef CANDELA_EMULATE
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

// e4m3 (OCP "fn": no infinities, ±448 at most), rounded to nearest even, saturating.
__device__ __forceinline__ unsigned char e4m3(float x) {
    return (unsigned char)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}
// The value of an e4m3 code (exact in f16, so in f32).
__device__ __forceinline__ float from_e4m3(unsigned char code) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}
#endif
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

template <typename T> struct __align__(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)blockDim.x * gridDim.x)

// Index arithmetic divides in 32 bits: a 64-bit division or remainder is a ~70-instruction
// subroutine, a 32-bit one ~20, and the memory-bound kernels below did up to four per 16-byte
// pack. The launchers take no tensor of 2^32 values or more (`elementwise.rs`), so every index
// and extent here fits.
__device__ __forceinline__ size_t div32(size_t a, size_t b) { return (unsigned)a / (unsigned)b; }
__device__ __forceinline__ size_t mod32(size_t a, size_t b) { return (unsigned)a % (unsigned)b; }

// out[r', c] = y[r, c] + bias[c] + residual[r, c]   (y: rows × cols; bias or residual may be
// null): a Linear's bias, and the residual its output joins (the UNet's transformer blocks), in
// one pass and one rounding. Row r (sample r / tokens, token r % tokens) lands at row r' = sample ·
// out_tokens + offset + token of `out`: a stream placed in a joint sequence (the DiTs' values);
// out_tokens = tokens = rows and offset 0 keep it in place.
__device__ __forceinline__ size_t placed_row(size_t r, size_t tokens, size_t out_tokens, size_t offset) {
    return div32(r, tokens) * out_tokens + offset + mod32(r, tokens);
}

template <typename T>
__device__ void bias_add(const T *y, const T *bias, const T *residual, T *out, size_t rows, size_t cols,
                         size_t tokens, size_t out_tokens, size_t offset, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, rows * cols / N) {
            size_t c = mod32(p * N, cols), r = div32(p * N, cols);
            size_t q = (placed_row(r, tokens, out_tokens, offset) * cols + c) / N;
            Pack<T> a = reinterpret_cast<const Pack<T> *>(y)[p];
            float v[N];
#pragma unroll
            for (int j = 0; j < N; ++j) v[j] = to_f(a.v[j]);
            if (bias) {
                Pack<T> b = *reinterpret_cast<const Pack<T> *>(bias + c);
#pragma unroll
                for (int j = 0; j < N; ++j) v[j] += to_f(b.v[j]);
            }
            if (residual) {
                Pack<T> r = reinterpret_cast<const Pack<T> *>(residual)[p];
#pragma unroll
                for (int j = 0; j < N; ++j) v[j] += to_f(r.v[j]);
            }
#pragma unroll
            for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(v[j]);
            reinterpret_cast<Pack<T> *>(out)[q] = a;
        }
    } else {
        GRID_STRIDE(i, rows * cols) {
            float v = to_f(y[i]);
            const size_t c = mod32(i, cols);
            if (bias) v += to_f(bias[c]);
            if (residual) v += to_f(residual[i]);
            out[placed_row(div32(i, cols), tokens, out_tokens, offset) * cols + c] = from_f<T>(v);
        }
    }
}

// Nearest-neighbour ×2 upsampling of (planes, h, w) data to (planes, 2h, 2w), one pass (the
// Upsample2D blocks of UNets and VAE decoders; candle's index_select twice made an intermediate).
template <typename T>
__device__ void upsample_nearest2x(const T *x, T *out, size_t planes, size_t h, size_t w, int vec) {
    constexpr int N = Pack<T>::N;
    const size_t ow = 2 * w, n = planes * 2 * h * ow;
    if (vec) {
        GRID_STRIDE(p, n / N) {
            const size_t e = p * N, row = div32(e, ow), col = mod32(e, ow);
            const T *in = x + (div32(row, 2 * h) * h + mod32(row, 2 * h) / 2) * w + col / 2;
            Pack<T> a;
#pragma unroll
            for (int j = 0; j < N; ++j) a.v[j] = in[j / 2];
            reinterpret_cast<Pack<T> *>(out)[p] = a;
        }
    } else {
        GRID_STRIDE(i, n) {
            const size_t row = div32(i, ow), col = mod32(i, ow);
            out[i] = x[(div32(row, 2 * h) * h + mod32(row, 2 * h) / 2) * w + col / 2];
        }
    }
}

// out[i] = x[i] + t[i / hw]: a value per (sample, channel) over (B, C, hw) data (a ResNet
// block's time embedding, added to its first convolution's output).
template <typename T>
__device__ void channel_add(const T *x, const T *t, T *out, size_t n, size_t hw, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, n / N) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
            const float add = to_f(t[div32(p * N, hw)]);
#pragma unroll
            for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(to_f(a.v[j]) + add);
            reinterpret_cast<Pack<T> *>(out)[p] = a;
        }
    } else {
        GRID_STRIDE(i, n) { out[i] = from_f<T>(to_f(x[i]) + to_f(t[div32(i, hw)])); }
    }
}

// out[r, c] = (h[r, c] + bias[c]) · gelu_erf(h[r, f + c] + bias[f + c])   (h: rows × 2f, out:
// rows × f; the projection's bias, of 2f, may be null)
template <typename T>
__device__ void geglu(const T *h, const T *bias, T *out, size_t rows, size_t f, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, rows * f / N) {
            size_t e = p * N, r = div32(e, f), c = mod32(e, f);
            Pack<T> a = *reinterpret_cast<const Pack<T> *>(h + r * 2 * f + c);
            Pack<T> g = *reinterpret_cast<const Pack<T> *>(h + r * 2 * f + f + c);
            float va[N], vg[N];
#pragma unroll
            for (int j = 0; j < N; ++j) {
                va[j] = to_f(a.v[j]);
                vg[j] = to_f(g.v[j]);
            }
            if (bias) {
                Pack<T> ba = *reinterpret_cast<const Pack<T> *>(bias + c);
                Pack<T> bg = *reinterpret_cast<const Pack<T> *>(bias + f + c);
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    va[j] += to_f(ba.v[j]);
                    vg[j] += to_f(bg.v[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(va[j] * gelu_erf(vg[j]));
            reinterpret_cast<Pack<T> *>(out)[p] = a;
        }
    } else {
        GRID_STRIDE(i, rows * f) {
            size_t r = div32(i, f), c = mod32(i, f);
            float a = to_f(h[r * 2 * f + c]), g = to_f(h[r * 2 * f + f + c]);
            if (bias) {
                a += to_f(bias[c]);
                g += to_f(bias[f + c]);
            }
            out[i] = from_f<T>(a * gelu_erf(g));
        }
    }
}

// y = gelu_tanh(x + bias[c]) over rows of `cols`: a Linear's bias added on the way (one pass over
// the MLP's widest tensor less); `bias` null: y = gelu_tanh(x).
template <typename T>
__device__ void gelu_tanh_map(const T *x, const T *bias, T *y, size_t n, size_t cols, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, n / N) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
            if (bias) {
                Pack<T> b = *reinterpret_cast<const Pack<T> *>(bias + mod32(p * N, cols));
#pragma unroll
                for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(gelu_tanh(to_f(a.v[j]) + to_f(b.v[j])));
            } else {
#pragma unroll
                for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(gelu_tanh(to_f(a.v[j])));
            }
            reinterpret_cast<Pack<T> *>(y)[p] = a;
        }
    } else {
        GRID_STRIDE(i, n) {
            y[i] = from_f<T>(gelu_tanh(to_f(x[i]) + (bias ? to_f(bias[mod32(i, cols)]) : 0.0f)));
        }
    }
}

// Welford's running (count, mean, M2), merged pairwise (Chan et al.).
struct Moments {
    float n, mean, m2;
};
__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    float n = a.n + b.n;
    if (n == 0.0f) return a;
    float d = b.mean - a.mean;
    float wb = b.n / n;
    return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}
__device__ __forceinline__ void push(Moments &m, float x) {
    m.n += 1.0f;
    float d = x - m.mean;
    m.mean += d / m.n;
    m.m2 += d * (x - m.mean);
}

// The moments of `len` contiguous values, merged over the block (every thread gets them).
template <typename T>
__device__ __forceinline__ Moments block_moments(const T *x, size_t len, int vec) {
    constexpr int N = Pack<T>::N;
    Moments m = {0.0f, 0.0f, 0.0f};
    if (vec) {
        for (size_t p = threadIdx.x; p < len / N; p += blockDim.x) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
#pragma unroll
            for (int j = 0; j < N; ++j) push(m, to_f(a.v[j]));
        }
    } else {
        for (size_t i = threadIdx.x; i < len; i += blockDim.x) push(m, to_f(x[i]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        Moments o = {__shfl_xor_sync(0xffffffff, m.n, off), __shfl_xor_sync(0xffffffff, m.mean, off),
                     __shfl_xor_sync(0xffffffff, m.m2, off)};
        m = merge(m, o);
    }
    __shared__ Moments warps[32];
    __shared__ Moments total;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warps[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        Moments t = warps[0];
        for (int w = 1; w < (int)(blockDim.x / 32); ++w) t = merge(t, warps[w]);
        total = t;
    }
    __syncthreads();
    return total;
}

// A GroupNorm's statistics in two passes, so that a few large groups still fill the GPU (a VAE
// decoder's 32 groups of 4 M values at 1024² were 32 blocks, ~0.7 ms per norm on an H200). The
// group's values are contiguous in NCHW; grid (batch · groups, slices): block (g, s) writes the
// moments of slice s (`slice` values, multiple of the pack; the last ones shorter or empty) to
// partial[3 · (g · slices + s) …] = n, mean, m2. With one slice a group (small groups) there is
// nothing to merge: the block writes the statistics group_norm_merge would, stats[2g] = mean,
// stats[2g + 1] = 1 / sqrt(var + eps), into `partial` — one launch less.
template <typename T>
__device__ void group_norm_partial(const T *x, float *partial, size_t group_size, size_t slice, float eps,
                                   int vec) {
    const size_t g = blockIdx.x, s = blockIdx.y, slices = gridDim.y, start = s * slice;
    const size_t left = start < group_size ? group_size - start : 0;
    const size_t len = left < slice ? left : slice;
    Moments m = block_moments(x + g * group_size + start, len, vec);
    if (threadIdx.x == 0 && slices == 1) {
        partial[2 * g] = m.mean;
        partial[2 * g + 1] = rsqrtf(m.m2 / m.n + eps);
    } else if (threadIdx.x == 0) {
        float *p = partial + 3 * (g * slices + s);
        p[0] = m.n;
        p[1] = m.mean;
        p[2] = m.m2;
    }
}

// One thread per group merges its slices' moments in order: stats[2g] = mean, stats[2g + 1] =
// 1 / sqrt(var + eps) (biased variance, as PyTorch).
__device__ void group_norm_merge(const float *partial, float *stats, size_t groups, size_t slices, float eps) {
    GRID_STRIDE(g, groups) {
        Moments t = {0.0f, 0.0f, 0.0f};
        for (size_t s = 0; s < slices; ++s) {
            const float *p = partial + 3 * (g * slices + s);
            t = merge(t, Moments{p[0], p[1], p[2]});
        }
        stats[2 * g] = t.mean;
        stats[2 * g + 1] = rsqrtf(t.m2 / t.n + eps);
    }
}

// A DiT's LayerNorm (no learned parameters, biased variance) and its modulation by per-sample
// (B, d) shift and scale in one kernel: y = (x − mean) · rstd · (1 + scale[b]) + shift[b], b =
// row / rows_per_batch. One block per row of d: the statistics, then one normalising pass (the
// row is read twice, the second time from cache). candle's layer_norm then the modulation read
// and wrote every token twice, with a rounding to T between.
//
// AFFINE: a LayerNorm's learned weight and bias instead (y = (x − mean) · rstd · scale + shift,
// rows_per_batch = every row): the UNets' and CLIP's LayerNorms, where candle's kernel took twice
// PyTorch's time (SDXL: 3.8 against 1.9 ms a step on an H200).
template <typename T, bool AFFINE = false>
__device__ void layer_norm_modulate(const T *x, const T *shift, const T *scale, T *y, size_t d,
                                    size_t rows_per_batch, float eps, int vec) {
    const float one = AFFINE ? 0.0f : 1.0f;
    constexpr int N = Pack<T>::N;
    const size_t row = blockIdx.x, b = row / rows_per_batch;
    const T *xr = x + row * d;
    T *yr = y + row * d;
    const T *sh = shift + b * d, *sc = scale + b * d;
    Moments total = block_moments(xr, d, vec);
    const float mean = total.mean, rstd = rsqrtf(total.m2 / total.n + eps);
    if (vec) {
        for (size_t p = threadIdx.x; p < d / N; p += blockDim.x) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(xr)[p];
            Pack<T> s = reinterpret_cast<const Pack<T> *>(sc)[p];
            Pack<T> h = reinterpret_cast<const Pack<T> *>(sh)[p];
#pragma unroll
            for (int j = 0; j < N; ++j)
                a.v[j] = from_f<T>((to_f(a.v[j]) - mean) * rstd * (one + to_f(s.v[j])) + to_f(h.v[j]));
            reinterpret_cast<Pack<T> *>(yr)[p] = a;
        }
    } else {
        for (size_t i = threadIdx.x; i < d; i += blockDim.x)
            yr[i] = from_f<T>((to_f(xr[i]) - mean) * rstd * (one + to_f(sc[i])) + to_f(sh[i]));
    }
}

// y = (x − mean) · rstd · scale[c] + shift[c], then SiLU if `with_silu`. x: (B, C, HW).
template <typename T>
__device__ void group_norm_apply(const T *x, const float *stats, const T *scale, const T *shift, T *y,
                                 size_t n, size_t channels, size_t hw, size_t per_group, int with_silu,
                                 int vec) {
    constexpr int N = Pack<T>::N;
    auto one = [&](size_t e, float v) {
        size_t c = mod32(div32(e, hw), channels);
        size_t bg = div32(e, hw * channels) * div32(channels, per_group) + div32(c, per_group);
        float out = (v - stats[2 * bg]) * stats[2 * bg + 1] * to_f(scale[c]) + to_f(shift[c]);
        return with_silu ? silu(out) : out;
    };
    if (vec) {
        GRID_STRIDE(p, n / N) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
            size_t e = p * N;
            // A pack lies in one channel (hw is a multiple of N).
            size_t c = mod32(div32(e, hw), channels);
            size_t bg = div32(e, hw * channels) * div32(channels, per_group) + div32(c, per_group);
            float mul = stats[2 * bg + 1] * to_f(scale[c]);
            float add = to_f(shift[c]) - stats[2 * bg] * mul;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                float out = to_f(a.v[j]) * mul + add;
                a.v[j] = from_f<T>(with_silu ? silu(out) : out);
            }
            reinterpret_cast<Pack<T> *>(y)[p] = a;
        }
    } else {
        GRID_STRIDE(i, n) { y[i] = from_f<T>(one(i, to_f(x[i]))); }
    }
}

// Rotary embedding with (N, D/2) f32 cosines and sines, pairs (2i, 2i+1) rotated in f32 as
// diffusers does: (a, b) → (a·cos − b·sin, b·cos + a·sin). x and y: (B, H, N, D) heads-first
// (heads_inner = 1) or (B, N, H, D) token-major (heads_inner = H); the token of a pair is
// (p / (D/2) / heads_inner) mod N either way.
template <typename T>
__device__ void rope(const T *x, const float *cos, const float *sin, T *y, size_t pairs, size_t n,
                     size_t half, size_t heads_inner) {
    GRID_STRIDE(p, pairs) {
        size_t i = mod32(p, half), row = mod32(div32(div32(p, half), heads_inner), n);
        float c = cos[row * half + i], s = sin[row * half + i];
        float a = to_f(x[2 * p]), b = to_f(x[2 * p + 1]);
        y[2 * p] = from_f<T>(a * c - b * s);
        y[2 * p + 1] = from_f<T>(b * c + a * s);
    }
}

// The DiT's adaptive-norm arithmetic over (B, N, D) tokens with per-sample (B, D) vectors:
// modulate: y = x · (1 + scale) + shift;   gated add: y = x + gate · (h + h2 + bias), where h is
// a Linear's product whose bias (D, or null) is added here rather than in a pass of its own, and
// h2 (or null) the product of the layer's other input columns (FLUX's single blocks multiply
// attention and MLP outputs apart instead of joining them first).
template <typename T>
__device__ void modulate(const T *x, const T *shift, const T *scale, T *y, size_t count, size_t per_batch,
                         size_t d, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, count / N) {
            size_t e = p * N, c = mod32(e, d), b = div32(e, per_batch);
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
            Pack<T> sh = *reinterpret_cast<const Pack<T> *>(shift + b * d + c);
            Pack<T> sc = *reinterpret_cast<const Pack<T> *>(scale + b * d + c);
#pragma unroll
            for (int j = 0; j < N; ++j)
                a.v[j] = from_f<T>(to_f(a.v[j]) * (1.0f + to_f(sc.v[j])) + to_f(sh.v[j]));
            reinterpret_cast<Pack<T> *>(y)[p] = a;
        }
    } else {
        GRID_STRIDE(i, count) {
            size_t c = mod32(i, d), b = div32(i, per_batch);
            y[i] = from_f<T>(to_f(x[i]) * (1.0f + to_f(scale[b * d + c])) + to_f(shift[b * d + c]));
        }
    }
}

template <typename T>
__device__ void gated_add(const T *x, const T *gate, const T *h, const T *h2, const T *bias, T *y,
                          size_t count, size_t per_batch, size_t d, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, count / N) {
            size_t e = p * N, c = mod32(e, d), b = div32(e, per_batch);
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
            Pack<T> u = reinterpret_cast<const Pack<T> *>(h)[p];
            Pack<T> g = *reinterpret_cast<const Pack<T> *>(gate + b * d + c);
            float v[N];
#pragma unroll
            for (int j = 0; j < N; ++j) v[j] = to_f(u.v[j]);
            if (h2) {
                Pack<T> w = reinterpret_cast<const Pack<T> *>(h2)[p];
#pragma unroll
                for (int j = 0; j < N; ++j) v[j] += to_f(w.v[j]);
            }
            if (bias) {
                Pack<T> o = *reinterpret_cast<const Pack<T> *>(bias + c);
#pragma unroll
                for (int j = 0; j < N; ++j) v[j] += to_f(o.v[j]);
            }
#pragma unroll
            for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(to_f(a.v[j]) + to_f(g.v[j]) * v[j]);
            reinterpret_cast<Pack<T> *>(y)[p] = a;
        }
    } else {
        GRID_STRIDE(i, count) {
            size_t c = mod32(i, d), b = div32(i, per_batch);
            float v = to_f(h[i]) + (h2 ? to_f(h2[i]) : 0.0f) + (bias ? to_f(bias[c]) : 0.0f);
            y[i] = from_f<T>(to_f(x[i]) + to_f(gate[b * d + c]) * v);
        }
    }
}

// The DiTs' per-head RMSNorm of queries or keys (diffusers' `norm_q`/`norm_k`, eps as given) with
// the projection's bias folded in, then FLUX's rotary embedding: one pass where the bias, the
// norm, the rotation and joining the text and image streams each took one. x: a stream's
// token-major projection, rows = B·tokens·heads of d; y: the joint sequence (B, out_tokens,
// heads, d), in which this stream's token t sits at t + offset (its row there, and its rotary
// angles); params = [bias (heads·d) | norm weight (d)]; table: (joint tokens, d/2) (cos, sin)
// pairs in f32, or null (no rotation).
//   v = x + bias;  v · rsqrt(mean(v²) + eps) · weight;  pairs (2i, 2i+1) rotated as in `rope`.
// A group of `qk_norm_lanes(d)` lanes per row (8, 16 or 32), each holding up to 4 pairs
// i ≡ lane (mod group) in registers (d ≤ 256), so a warp takes 4, 2 or 1 rows at once: one
// warp per row left SD3.5's 64-wide heads at one pair a lane, latency-bound (~1.5 TB/s on an
// H200). `paired` (16-byte aligned operands, decided by the caller): each pair read and
// written as one access.
__host__ __device__ __forceinline__ unsigned qk_norm_lanes(size_t d) {
    return d / 2 <= 8 * 4 ? 8 : d / 2 <= 16 * 4 ? 16 : 32;
}

template <typename T> struct alignas(2 * sizeof(T)) PairOf {
    T a, b;
};

template <typename T>
__device__ void qk_norm(const T *x, const T *params, const float *table, T *y, size_t rows, size_t d,
                        size_t heads, size_t tokens, size_t out_tokens, size_t offset, float eps, int paired) {
    constexpr int MAX_PAIRS = 4;
    const size_t half = d / 2;
    const unsigned group = qk_norm_lanes(d), per_warp = 32 / group;
    const unsigned lane = threadIdx.x % 32, sub = lane % group, slot = lane / group;
    const size_t warps = blockDim.x / 32, warp = (size_t)blockIdx.x * warps + threadIdx.x / 32;
    const T *weight = params + heads * d;
    auto load = [&](const T *p, size_t i, float &u, float &v) {
        if (paired) {
            const PairOf<T> w = reinterpret_cast<const PairOf<T> *>(p)[i];
            u = to_f(w.a);
            v = to_f(w.b);
        } else {
            u = to_f(p[2 * i]);
            v = to_f(p[2 * i + 1]);
        }
    };
    // `first` is the same for every lane of the warp: all of them reach the shuffles.
    for (size_t first = warp * per_warp; first < rows; first += (size_t)gridDim.x * warps * per_warp) {
        const size_t row = first + slot;
        const bool live = row < rows;
        const T *xr = x + row * d, *bias = params + mod32(row, heads) * d;
        float a[MAX_PAIRS], b[MAX_PAIRS], squares = 0.0f;
#pragma unroll
        for (int k = 0; k < MAX_PAIRS; ++k) {
            const size_t i = sub + group * k;
            a[k] = b[k] = 0.0f;
            if (live && i < half) {
                float xa, xb, ba, bb;
                load(xr, i, xa, xb);
                load(bias, i, ba, bb);
                a[k] = xa + ba;
                b[k] = xb + bb;
                squares += a[k] * a[k] + b[k] * b[k];
            }
        }
        // Within the row's group of lanes (aligned, so xor offsets below `group` stay in it).
        for (unsigned o = group / 2; o > 0; o /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, o);
        if (!live) continue;
        const float rstd = rsqrtf(squares / (float)d + eps);
        const size_t token = mod32(div32(row, heads), tokens) + offset;
        T *yr = y + ((div32(div32(row, heads), tokens) * out_tokens + token) * heads + mod32(row, heads)) * d;
#pragma unroll
        for (int k = 0; k < MAX_PAIRS; ++k) {
            const size_t i = sub + group * k;
            if (i >= half) continue;
            float wa, wb;
            load(weight, i, wa, wb);
            float u = a[k] * rstd * wa, v = b[k] * rstd * wb;
            if (table) {
                const float c = table[2 * (token * half + i)], s = table[2 * (token * half + i) + 1];
                const float ru = u * c - v * s, rv = v * c + u * s;
                u = ru;
                v = rv;
            }
            if (paired) {
                reinterpret_cast<PairOf<T> *>(yr)[i] = PairOf<T>{from_f<T>(u), from_f<T>(v)};
            } else {
                yr[2 * i] = from_f<T>(u);
                yr[2 * i + 1] = from_f<T>(v);
            }
        }
    }
}

// FP8 products (engine/cuda/fp8.rs). The activations' absolute maximum (non-negative floats order
// as their bit patterns, so an unsigned atomicMax takes it; `amax_bits` starts at 0).
template <typename T>
__device__ void fp8_absmax(const T *x, size_t n, unsigned *amax_bits, int vec) {
    constexpr int N = Pack<T>::N;
    float m = 0.0f;
    if (vec) {
        GRID_STRIDE(p, n / N) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(x)[p];
#pragma unroll
            for (int j = 0; j < N; ++j) m = fmaxf(m, fabsf(to_f(a.v[j])));
        }
    } else {
        GRID_STRIDE(i, n) { m = fmaxf(m, fabsf(to_f(x[i]))); }
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, __float_as_uint(m));
}

// Eight 16-bit values as e4m3 codes of value / scale, in eight bytes.
template <typename T>
__device__ __forceinline__ uint2 e4m3_pack(const Pack<T> a, float scale) {
    static_assert(Pack<T>::N == 8, "16-bit activations: eight codes per pack");
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        lo |= (uint32_t)e4m3(to_f(a.v[j]) / scale) << (8 * j);
        hi |= (uint32_t)e4m3(to_f(a.v[j + 4]) / scale) << (8 * j);
    }
    return make_uint2(lo, hi);
}

// The activations as e4m3 codes at scale absmax / 448 (1 for an all-zero tensor): codes[i] =
// e4m3(x[i] / scale); block 0 also writes the scale (the GEMM's B scale, read on the device).
template <typename T>
__device__ void fp8_quantize(const T *x, size_t n, const unsigned *amax_bits, unsigned char *codes,
                             float *scale_out, int vec) {
    constexpr int N = Pack<T>::N;
    const float amax = __uint_as_float(*amax_bits);
    const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
    if (vec) {
        GRID_STRIDE(p, n / N) {
            reinterpret_cast<uint2 *>(codes)[p] = e4m3_pack(reinterpret_cast<const Pack<T> *>(x)[p], scale);
        }
    } else {
        GRID_STRIDE(i, n) { codes[i] = e4m3(to_f(x[i]) / scale); }
    }
}

// Row-wise (per-token) activation scales for the FP8 products whose GEMM applies the scales
// itself (cuBLASLt's outer-vector scaling): one block per row of `d` values, scales[r] =
// max|x[r, :]| / 448 (1 for an all-zero row) and codes[r, :] = e4m3(x[r, :] / scales[r]). One
// launch where the per-tensor scale takes three (a zeroed maximum, the maximum, the codes), and
// a row's outlier no longer coarsens every other row's codes.
template <typename T>
__device__ void fp8_quantize_rows(const T *x, size_t d, unsigned char *codes, float *scales, int vec) {
    constexpr int N = Pack<T>::N;
    const T *xr = x + (size_t)blockIdx.x * d;
    unsigned char *cr = codes + (size_t)blockIdx.x * d;
    float m = 0.0f;
    if (vec) {
        for (size_t p = threadIdx.x; p < d / N; p += blockDim.x) {
            Pack<T> a = reinterpret_cast<const Pack<T> *>(xr)[p];
#pragma unroll
            for (int j = 0; j < N; ++j) m = fmaxf(m, fabsf(to_f(a.v[j])));
        }
    } else {
        for (size_t i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, fabsf(to_f(xr[i])));
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    __shared__ float warps[32];
    __shared__ float row_scale;
    if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float amax = warps[0];
        for (int w = 1; w < (int)(blockDim.x / 32); ++w) amax = fmaxf(amax, warps[w]);
        row_scale = amax > 0.0f ? amax / 448.0f : 1.0f;
        scales[blockIdx.x] = row_scale;
    }
    __syncthreads();
    const float scale = row_scale;
    if (vec) {
        for (size_t p = threadIdx.x; p < d / N; p += blockDim.x) {
            reinterpret_cast<uint2 *>(cr)[p] = e4m3_pack(reinterpret_cast<const Pack<T> *>(xr)[p], scale);
        }
    } else {
        for (size_t i = threadIdx.x; i < d; i += blockDim.x) cr[i] = e4m3(to_f(xr[i]) / scale);
    }
}

// FP8 weights' matrix-vector products (the DiTs' modulation: a row of activations per sample):
// y[b, o] = (sum_i e4m3(codes[o, i]) x[b, i]) sb[o] + sb[out + o] for b < batch <= 4. Widening
// the weight to the activations' type for a GEMV wrote it and read it back (five times the
// codes' bytes; FLUX-dev's modulation weights are 3.2 G values a step). One warp per output,
// sixteen codes a lane per step (inner a multiple of 16, codes and x 16-byte aligned), f32 sums.
#define FP8_GEMV_ROWS 4
template <typename T>
__device__ void fp8_gemv(const unsigned char *codes, const T *x, const T *sb, T *y, size_t out,
                         size_t inner, size_t batch) {
    static_assert(Pack<T>::N == 8, "16-bit activations: eight values a pack");
    const size_t warps = blockDim.x / 32;
    const size_t o = (size_t)blockIdx.x * warps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (o >= out) return;  // the whole warp: one output each
    float acc[FP8_GEMV_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
    const unsigned char *row = codes + o * inner;
    for (size_t i = (size_t)lane * 16; i < inner; i += 32 * 16) {
        const uint4 packed = *reinterpret_cast<const uint4 *>(row + i);
        const unsigned char *code = reinterpret_cast<const unsigned char *>(&packed);
        float w[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) w[j] = from_e4m3(code[j]);
#pragma unroll
        for (int b = 0; b < FP8_GEMV_ROWS; ++b) {
            if ((size_t)b >= batch) break;
            const Pack<T> *xs = reinterpret_cast<const Pack<T> *>(x + b * inner + i);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const Pack<T> a = xs[h];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[b] += w[8 * h + j] * to_f(a.v[j]);
            }
        }
    }
#pragma unroll
    for (int b = 0; b < FP8_GEMV_ROWS; ++b)
        for (int off = 16; off > 0; off >>= 1) acc[b] += __shfl_xor_sync(0xffffffff, acc[b], off);
    if (lane == 0)
        for (size_t b = 0; b < batch && b < FP8_GEMV_ROWS; ++b)
            y[b * out + o] = from_f<T>(acc[b] * to_f(sb[o]) + to_f(sb[out + o]));
}

// y[r, c] = y[r, c] · sb[c] + sb[cols + c]: the weight's per-channel scale, then the bias.
template <typename T>
__device__ void fp8_rescale(T *y, const T *sb, size_t rows, size_t cols, int vec) {
    constexpr int N = Pack<T>::N;
    if (vec) {
        GRID_STRIDE(p, rows * cols / N) {
            size_t c = mod32(p * N, cols);
            Pack<T> a = reinterpret_cast<Pack<T> *>(y)[p];
            Pack<T> s = *reinterpret_cast<const Pack<T> *>(sb + c);
            Pack<T> b = *reinterpret_cast<const Pack<T> *>(sb + cols + c);
#pragma unroll
            for (int j = 0; j < N; ++j) a.v[j] = from_f<T>(to_f(a.v[j]) * to_f(s.v[j]) + to_f(b.v[j]));
            reinterpret_cast<Pack<T> *>(y)[p] = a;
        }
    } else {
        GRID_STRIDE(i, rows * cols) {
            size_t c = mod32(i, cols);
            y[i] = from_f<T>(to_f(y[i]) * to_f(sb[c]) + to_f(sb[cols + c]));
        }
    }
}

// Casts to and from e4m3 codes, one element at a time (weights, once per load): candle 0.11.1's
// own CUDA casts for F8E4M3 are looked up under names its kernels do not define
// (`cast_f32_f8e4m3` for `cast_f32_f8_e4m3`), so they fail on every device.
template <typename T> __device__ void fp8_encode(const T *x, unsigned char *codes, size_t n) {
    GRID_STRIDE(i, n) { codes[i] = e4m3(to_f(x[i])); }
}
template <typename T> __device__ void fp8_decode(const unsigned char *codes, T *y, size_t n) {
    GRID_STRIDE(i, n) { y[i] = from_f<T>(from_e4m3(codes[i])); }
}

#define FP8_CASTS(SUFFIX, T)                                                                       \
    extern "C" __global__ void fp8_encode_##SUFFIX(const T *x, unsigned char *codes, size_t n) {   \
        fp8_encode<T>(x, codes, n);                                                                \
    }                                                                                              \
    extern "C" __global__ void fp8_decode_##SUFFIX(const unsigned char *codes, T *y, size_t n) {   \
        fp8_decode<T>(codes, y, n);                                                                \
    }

#define FP8_KERNELS(SUFFIX, T)                                                                     \
    extern "C" __global__ void fp8_absmax_##SUFFIX(const T *x, size_t n, unsigned *amax, int vec) { \
        fp8_absmax<T>(x, n, amax, vec);                                                            \
    }                                                                                              \
    extern "C" __global__ void fp8_quantize_##SUFFIX(const T *x, size_t n, const unsigned *amax,    \
                                                     unsigned char *codes, float *scale, int vec) { \
        fp8_quantize<T>(x, n, amax, codes, scale, vec);                                            \
    }                                                                                              \
    extern "C" __global__ void fp8_quantize_rows_##SUFFIX(const T *x, size_t d, unsigned char *codes, \
                                                          float *scales, int vec) {                \
        fp8_quantize_rows<T>(x, d, codes, scales, vec);                                            \
    }                                                                                              \
    extern "C" __global__ void fp8_gemv_##SUFFIX(const unsigned char *codes, const T *x, const T *sb, \
                                                 T *y, size_t out, size_t inner, size_t batch) {   \
        fp8_gemv<T>(codes, x, sb, y, out, inner, batch);                                           \
    }                                                                                              \
    extern "C" __global__ void fp8_rescale_##SUFFIX(T *y, const T *sb, size_t rows, size_t cols,   \
                                                    int vec) {                                     \
        fp8_rescale<T>(y, sb, rows, cols, vec);                                                    \
    }

#define KERNELS(SUFFIX, T)                                                                          \
    extern "C" __global__ void bias_add_##SUFFIX(const T *y, const T *b, const T *residual, T *out, \
                                                 size_t rows, size_t cols, size_t tokens,          \
                                                 size_t out_tokens, size_t offset, int vec) {      \
        bias_add<T>(y, b, residual, out, rows, cols, tokens, out_tokens, offset, vec);             \
    }                                                                                              \
    extern "C" __global__ void upsample_nearest2x_##SUFFIX(const T *x, T *out, size_t planes, size_t h, \
                                                           size_t w, int vec) {                    \
        upsample_nearest2x<T>(x, out, planes, h, w, vec);                                          \
    }                                                                                              \
    extern "C" __global__ void channel_add_##SUFFIX(const T *x, const T *t, T *out, size_t n, size_t hw, \
                                                    int vec) {                                     \
        channel_add<T>(x, t, out, n, hw, vec);                                                     \
    }                                                                                              \
    extern "C" __global__ void geglu_##SUFFIX(const T *h, const T *bias, T *out, size_t rows, size_t f, \
                                              int vec) {                                           \
        geglu<T>(h, bias, out, rows, f, vec);                                                      \
    }                                                                                              \
    extern "C" __global__ void gelu_tanh_##SUFFIX(const T *x, const T *bias, T *y, size_t n,        \
                                                  size_t cols, int vec) {                          \
        gelu_tanh_map<T>(x, bias, y, n, cols, vec);                                                \
    }                                                                                              \
    extern "C" __global__ void group_norm_partial_##SUFFIX(const T *x, float *partial, size_t group_size, \
                                                           size_t slice, float eps, int vec) {     \
        group_norm_partial<T>(x, partial, group_size, slice, eps, vec);                            \
    }                                                                                              \
    extern "C" __global__ void group_norm_apply_##SUFFIX(const T *x, const float *stats, const T *scale, \
                                                         const T *shift, T *y, size_t n, size_t channels, \
                                                         size_t hw, size_t per_group, int with_silu, int vec) { \
        group_norm_apply<T>(x, stats, scale, shift, y, n, channels, hw, per_group, with_silu, vec); \
    }                                                                                              \
    extern "C" __global__ void rope_##SUFFIX(const T *x, const float *cos, const float *sin, T *y,  \
                                             size_t pairs, size_t n, size_t half, size_t heads_inner) { \
        rope<T>(x, cos, sin, y, pairs, n, half, heads_inner);                                      \
    }                                                                                              \
    extern "C" __global__ void modulate_##SUFFIX(const T *x, const T *shift, const T *scale, T *y,  \
                                                 size_t count, size_t per_batch, size_t d, int vec) { \
        modulate<T>(x, shift, scale, y, count, per_batch, d, vec);                                 \
    }                                                                                              \
    extern "C" __global__ void gated_add_##SUFFIX(const T *x, const T *gate, const T *h, const T *h2,  \
                                                  const T *bias, T *y, size_t count, size_t per_batch, \
                                                  size_t d, int vec) {                             \
        gated_add<T>(x, gate, h, h2, bias, y, count, per_batch, d, vec);                           \
    }                                                                                              \
    extern "C" __global__ void qk_norm_##SUFFIX(const T *x, const T *params, const float *table, T *y, \
                                                size_t rows, size_t d, size_t heads, size_t tokens, \
                                                size_t out_tokens, size_t offset, float eps,       \
                                                int paired) {                                      \
        qk_norm<T>(x, params, table, y, rows, d, heads, tokens, out_tokens, offset, eps, paired);  \
    }                                                                                              \
    extern "C" __global__ void layer_norm_modulate_##SUFFIX(const T *x, const T *shift, const T *scale, \
                                                            T *y, size_t d, size_t rows_per_batch, \
                                                            float eps, int vec) {                  \
        layer_norm_modulate<T>(x, shift, scale, y, d, rows_per_batch, eps, vec);                   \
    }                                                                                              \
    extern "C" __global__ void layer_norm_affine_##SUFFIX(const T *x, const T *bias, const T *weight,   \
                                                          T *y, size_t d, size_t rows_per_batch,   \
                                                          float eps, int vec) {                    \
        layer_norm_modulate<T, true>(x, bias, weight, y, d, rows_per_batch, eps, vec);             \
    }

KERNELS(f32, float)
KERNELS(f16, __half)
KERNELS(bf16, __nv_bfloat16)
FP8_KERNELS(f16, __half)
FP8_KERNELS(bf16, __nv_bfloat16)
extern "C" __global__ void group_norm_merge_f32(const float *partial, float *stats, size_t groups,
                                                size_t slices, float eps) {
    group_norm_merge(partial, stats, groups, slices, eps);
}
FP8_CASTS(f32, float)
FP8_CASTS(f16, __half)
FP8_CASTS(bf16, __nv_bfloat16)
