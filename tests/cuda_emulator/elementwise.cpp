// Runs kernels of src/engine/cuda/elementwise.cu under the CPU emulation and prints their error
// against f64 references computed from the same rounded inputs:
//   elementwise OP DTYPE ROWS D BATCHES VEC SEED
// prints "relative_l2 max_abs". OP:
//   layer_norm_modulate  ROWS rows of D in BATCHES samples (shift and scale per sample), one
//                        block per row as the engine launches it (32 to 256 threads by D);
//   layer_norm_affine    the same with a LayerNorm's weight and bias (BATCHES = 1: one of each);
//   group_norm           ROWS = batch · groups groups of D values (4 channels per group · HW),
//                        their statistics in BATCHES slices per group then merged, then the
//                        apply kernel, with SiLU;
//   modulate, gated_add  ROWS tokens of D in BATCHES samples (per-sample vectors); gated_add_bias
//                        adds a bias of D to the gated term, gated_add_sum also a second
//                        product (ROWS × D);
//   bias_add             ROWS × D plus a bias of D;  bias_add_residual  also plus a residual
//                        (ROWS × D);  residual_add  ROWS × D plus a residual, no bias;
//   geglu                ROWS × 2D → ROWS × D;  geglu_bias  with a bias of 2D;
//   channel_add          ROWS = samples · channels rows of D values plus one value per row;
//   upsample             ROWS planes of BATCHES × D (rows × columns) → 2·BATCHES × 2·D, nearest;
//   bias_join            ROWS = 2 samples · tokens rows of D plus a bias, placed at token 3 of a
//                        joint sequence of 5 more tokens (the rows around must stay untouched);
//   gelu_tanh            ROWS × D;  gelu_tanh_bias  of ROWS × D plus a bias of D;
//   qk_norm              ROWS = 2 samples · tokens · BATCHES heads rows of D (token-major), the
//                        bias folded in, RMSNorm, then (VEC = 1) the rotary embedding from a
//                        table of 5 more tokens than the stream's, the stream at token 3;
//   rope                 ROWS rows of D over BATCHES = tokens, f32 cos/sin tables; VEC = heads
//                        between a token and its values (1: heads-first, H: token-major);
//   fp8_quantize         ROWS × D activations → absmax → e4m3 codes (f16/bf16): the scale must
//                        be absmax / 448 and every code the nearest-even e4m3 value of x / scale
//                        (found by search over all 256 codes): prints "0 0", else the share of
//                        wrong codes; then the relative L2 error of codes · scale against x;
//   fp8_quantize_rows    the same with a scale per row (one block a row, the engine's threads):
//                        rows of different ranges and an all-zero one;
//   fp8_rescale          ROWS × D · a per-column scale + a bias.
//   fp8_gemv             ROWS outputs of D e4m3 codes times BATCHES rows of activations, scaled,
//                        plus a bias;
//   cast_e4m3            ROWS × D values → e4m3 codes, each the nearest-even code (saturating), and
//                        every finite code → its value: prints the count of wrong ones (0 0).
// The grid-stride kernels get the engine's grid: ⌈items / 256⌉ blocks.
#include "emulate.h"

#include "../../src/engine/cuda/elementwise.cu"

#include <cstdio>
#include <random>
#include <string>

constexpr unsigned THREADS = 256;

struct Error {
    double diff2 = 0, ref2 = 0, max_abs = 0;
    void add(double got, double exact) {
        diff2 += (got - exact) * (got - exact);
        ref2 += exact * exact;
        max_abs = std::isnan(got) ? NAN : std::max(max_abs, std::fabs(got - exact));
    }
    void print() const { std::printf("%.3e %.3e\n", std::sqrt(diff2 / ref2), max_abs); }
};

template <typename T>
void fill(Buffer<T> &b, std::mt19937 &rng, float mean, float std) {
    std::normal_distribution<float> normal(mean, std);
    for (size_t i = 0; i < b.count; ++i)
        b[i] = T(normal(rng));
}

template <typename T>
double f(T x) {
    return (double)(float)x;
}

// Mean and biased variance of n values, in f64.
template <typename T>
std::pair<double, double> moments(const T *x, size_t n) {
    double mean = 0, var = 0;
    for (size_t i = 0; i < n; ++i)
        mean += f(x[i]);
    mean /= n;
    for (size_t i = 0; i < n; ++i)
        var += (f(x[i]) - mean) * (f(x[i]) - mean);
    return {mean, var / n};
}

// AFFINE: the layer_norm_affine kernel (scale is the weight, not 1 + scale).
template <typename T>
void layer_norm_modulate_case(size_t rows, size_t d, size_t batches, int vec, unsigned seed,
                              void (*kernel)(const T *, const T *, const T *, T *, size_t, size_t, float, int),
                              bool affine) {
    std::mt19937 rng(seed);
    Buffer<T> x(rows * d), shift(batches * d), scale(batches * d), y(rows * d);
    fill(x, rng, 0.5f, 2.0f);
    fill(shift, rng, 0.0f, 1.0f);
    fill(scale, rng, 0.0f, 0.5f);
    for (size_t i = 0; i < y.count; ++i)
        y[i] = T(NAN);
    const float eps = 1e-6f;
    const size_t per_batch = rows / batches;
    // The engine's block for the row (`norm_row_threads` in cuda_geometry.rs): a thread per
    // access up to a power of two, 32 to 256.
    const size_t accesses = vec ? (d + Pack<T>::N - 1) / Pack<T>::N : d;
    size_t threads = 32;
    while (threads < accesses && threads < THREADS) threads *= 2;
    launch(kernel, (unsigned)rows, 1, (unsigned)threads, 0, (const T *)x.data, (const T *)shift.data,
           (const T *)scale.data, y.data, d, per_batch, eps, vec);
    Error e;
    for (size_t r = 0; r < rows; ++r) {
        const auto [mean, var] = moments(x.data + r * d, d);
        const size_t b = r / per_batch;
        for (size_t c = 0; c < d; ++c) {
            double norm = (f(x[r * d + c]) - mean) / std::sqrt(var + eps);
            e.add(f(y[r * d + c]), norm * ((affine ? 0.0 : 1.0) + f(scale[b * d + c])) + f(shift[b * d + c]));
        }
    }
    e.print();
}

// A grid-stride kernel's launch as the engine makes it (`config` in elementwise.rs).
unsigned grid_for(size_t items) {
    return (unsigned)std::max<size_t>(1, std::min<size_t>((items + THREADS - 1) / THREADS, 1 << 16));
}

template <typename T>
void group_norm_case(size_t blocks, size_t group_size, size_t slices, int vec, unsigned seed,
                     void (*partial_kernel)(const T *, float *, size_t, size_t, float, int),
                     void (*apply_kernel)(const T *, const float *, const T *, const T *, T *, size_t, size_t,
                                          size_t, size_t, int, int)) {
    // blocks = batch · groups; 4 channels per group, 2 samples.
    const size_t per_group = 4, batch = 2, groups = blocks / batch, channels = groups * per_group;
    const size_t hw = group_size / per_group, n = blocks * group_size;
    std::mt19937 rng(seed);
    Buffer<T> x(n), scale(channels), shift(channels), y(n);
    Buffer<float> stats(2 * blocks);
    fill(x, rng, 1.0f, 3.0f);
    fill(scale, rng, 1.0f, 0.5f);
    fill(shift, rng, 0.0f, 1.0f);
    const float eps = 1e-5f;
    // Slices as the engine cuts them: a multiple of 8 values (the last ones shorter or empty).
    const size_t slice = (group_size + slices - 1) / slices;
    const size_t rounded = (slice + 7) / 8 * 8;
    Buffer<float> partial(3 * blocks * slices);
    launch(partial_kernel, (unsigned)blocks, (unsigned)slices, THREADS, 0, (const T *)x.data, partial.data,
           group_size, rounded, eps, vec);
    // As the engine: one slice a group leaves the statistics in `partial` itself, no merge.
    if (slices > 1)
        launch(group_norm_merge, grid_for(blocks), 1, THREADS, 0, (const float *)partial.data, stats.data, blocks,
               slices, eps);
    const float *final_stats = slices > 1 ? stats.data : partial.data;
    const size_t items = vec ? n / Pack<T>::N : n;
    const unsigned grid = (unsigned)std::min<size_t>((items + THREADS - 1) / THREADS, 1 << 16);
    launch(apply_kernel, grid, 1, THREADS, 0, (const T *)x.data, final_stats,
           (const T *)scale.data, (const T *)shift.data, y.data, n, channels, hw, per_group, 1, vec);
    Error e;
    for (size_t g = 0; g < blocks; ++g) {
        const auto [mean, var] = moments(x.data + g * group_size, group_size);
        for (size_t i = 0; i < group_size; ++i) {
            size_t e_index = g * group_size + i;
            size_t c = (e_index / hw) % channels;
            double v = (f(x[e_index]) - mean) / std::sqrt(var + eps) * f(scale[c]) + f(shift[c]);
            e.add(f(y[e_index]), v / (1.0 + std::exp(-v)));
        }
    }
    e.print();
}

// The per-token kernels against f64: modulate, gated_add, bias_add, geglu, rope.
template <typename T>
void map_case(const std::string &op, size_t rows, size_t d, size_t batches, int vec, unsigned seed) {
    constexpr size_t P = Pack<T>::N;
    std::mt19937 rng(seed);
    const size_t count = rows * d, per_batch = (rows / batches) * d;
    const bool gated = op == "gated_add" || op == "gated_add_bias" || op == "gated_add_sum";
    const bool geglu_op = op == "geglu" || op == "geglu_bias";
    const size_t in_width = geglu_op ? 2 * d : d;
    Buffer<T> x(rows * in_width), a(gated || op == "bias_add_residual" || op == "residual_add" ? count : batches * d),
        b(batches * d), y(count), bias(geglu_op ? 2 * d : d), second(count);
    Buffer<float> cos(batches * d / 2), sin(batches * d / 2);
    fill(x, rng, 0.0f, 1.0f);
    fill(a, rng, 0.0f, 1.0f);
    fill(b, rng, 0.0f, 0.5f);
    fill(bias, rng, 0.0f, 1.0f);
    fill(second, rng, 0.0f, 1.0f);
    std::uniform_real_distribution<float> angle(-3.14159f, 3.14159f);
    for (size_t i = 0; i < cos.count; ++i) {
        float t = angle(rng);
        cos[i] = std::cos(t);
        sin[i] = std::sin(t);
    }
    for (size_t i = 0; i < y.count; ++i)
        y[i] = T(NAN);
    const size_t items = vec ? count / P : count;
    Error e;
    if (op == "modulate" || gated) {
        // modulate: (x, shift = a, scale = b); gated add: (x, gate = b, h = a, bias or none).
        const T *added = op == "gated_add" ? nullptr : (const T *)bias.data;
        const T *h2 = op == "gated_add_sum" ? (const T *)second.data : nullptr;
        if (op == "modulate")
            launch(modulate<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, (const T *)a.data,
                   (const T *)b.data, y.data, count, per_batch, d, vec);
        else
            launch(gated_add<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, (const T *)b.data,
                   (const T *)a.data, h2, added, y.data, count, per_batch, d, vec);
        for (size_t i = 0; i < count; ++i) {
            size_t c = i % d, s = i / per_batch;
            double exact = op == "modulate"
                               ? f(x[i]) * (1.0 + f(b[s * d + c])) + f(a[s * d + c])
                               : f(x[i]) + f(b[s * d + c]) * (f(a[i]) + (h2 ? f(second[i]) : 0.0) +
                                                              (added ? f(bias[c]) : 0.0));
            e.add(f(y[i]), exact);
        }
    } else if (op == "gelu_tanh" || op == "gelu_tanh_bias") {
        const T *added = op == "gelu_tanh_bias" ? (const T *)bias.data : nullptr;
        launch(gelu_tanh_map<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, added, y.data, count, d, vec);
        for (size_t i = 0; i < count; ++i) {
            double v = f(x[i]) + (added ? f(bias[i % d]) : 0.0);
            e.add(f(y[i]), 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v))));
        }
    } else if (op == "bias_add" || op == "bias_add_residual" || op == "residual_add") {
        const T *added = op == "residual_add" ? nullptr : (const T *)b.data;
        const T *residual = op == "bias_add" ? nullptr : (const T *)a.data;
        launch(bias_add<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, added, residual, y.data,
               rows, d, rows, rows, (size_t)0, vec);
        for (size_t i = 0; i < count; ++i)
            e.add(f(y[i]), f(x[i]) + (added ? f(b[i % d]) : 0.0) + (residual ? f(a[i]) : 0.0));
    } else if (op == "upsample") {
        // x holds rows × d; seen as `rows / batches` planes of batches × d.
        const size_t h = batches, planes = rows / h, out_n = planes * 4 * h * d;
        Buffer<T> up(out_n);
        const size_t up_items = vec ? out_n / Pack<T>::N : out_n;
        launch(upsample_nearest2x<T>, grid_for(up_items), 1, THREADS, 0, (const T *)x.data, up.data, planes, h,
               d, vec);
        for (size_t i = 0; i < out_n; ++i) {
            const size_t plane = i / (4 * h * d), r = i / (2 * d) % (2 * h), c = i % (2 * d);
            e.add(f(up[i]), f(x[(plane * h + r / 2) * d + c / 2]));
        }
    } else if (op == "channel_add") {
        Buffer<T> t(rows);
        fill(t, rng, 0.0f, 1.0f);
        launch(channel_add<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, (const T *)t.data, y.data,
               count, d, vec);
        for (size_t i = 0; i < count; ++i)
            e.add(f(y[i]), f(x[i]) + f(t[i / d]));
    } else if (geglu_op) {
        const T *added = op == "geglu_bias" ? (const T *)bias.data : nullptr;
        launch(geglu<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, added, y.data, rows, d, vec);
        for (size_t r = 0; r < rows; ++r)
            for (size_t c = 0; c < d; ++c) {
                double v = f(x[r * 2 * d + c]) + (added ? f(bias[c]) : 0.0);
                double g = f(x[r * 2 * d + d + c]) + (added ? f(bias[d + c]) : 0.0);
                e.add(f(y[r * d + c]), v * 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0))));
            }
    } else if (op == "rope") {
        const size_t tokens = batches, half = d / 2, pairs = count / 2, heads_inner = vec;
        launch(rope<T>, grid_for(pairs), 1, THREADS, 0, (const T *)x.data, (const float *)cos.data,
               (const float *)sin.data, y.data, pairs, tokens, half, heads_inner);
        for (size_t p = 0; p < pairs; ++p) {
            size_t i = p % half, row = (p / half / heads_inner) % tokens;
            double c = cos[row * half + i], s = sin[row * half + i];
            double u = f(x[2 * p]), v = f(x[2 * p + 1]);
            e.add(f(y[2 * p]), u * c - v * s);
            e.add(f(y[2 * p + 1]), v * c + u * s);
        }
    }
    e.print();
}

// A stream's rows plus a bias, placed in a joint sequence (the DiTs' values).
template <typename T>
void bias_join_case(size_t rows, size_t d, int vec, unsigned seed) {
    const size_t batch = 2, tokens = rows / batch, out_tokens = tokens + 5, offset = 3;
    std::mt19937 rng(seed);
    Buffer<T> x(rows * d), bias(d), y(batch * out_tokens * d);
    fill(x, rng, 0.0f, 1.0f);
    fill(bias, rng, 0.0f, 1.0f);
    for (size_t i = 0; i < y.count; ++i)
        y[i] = T(NAN);
    const size_t items = vec ? rows * d / Pack<T>::N : rows * d;
    launch(bias_add<T>, grid_for(items), 1, THREADS, 0, (const T *)x.data, (const T *)bias.data,
           (const T *)nullptr, y.data, rows, d, tokens, out_tokens, offset, vec);
    Error e;
    for (size_t b = 0; b < batch; ++b)
        for (size_t t = 0; t < out_tokens; ++t)
            for (size_t c = 0; c < d; ++c) {
                const double got = f(y[(b * out_tokens + t) * d + c]);
                if (t < offset || t >= offset + tokens) {
                    if (!std::isnan(got))  // written outside the stream's place
                        e.add(1.0, 0.0);
                    continue;
                }
                e.add(got, f(x[(b * tokens + t - offset) * d + c]) + f(bias[c]));
            }
    e.print();
}

// The per-head q/k norm (+ rotary embedding) against f64, launched as the engine does: 256
// threads, a warp per row.
template <typename T>
void qk_norm_case(size_t rows, size_t d, size_t heads, int with_rope, unsigned seed) {
    const size_t batch = 2, tokens = rows / heads / batch, offset = 3, half = d / 2;
    const size_t table_tokens = tokens + 5, out_tokens = table_tokens;
    std::mt19937 rng(seed);
    Buffer<T> x(rows * d), params(heads * d + d), y(batch * out_tokens * heads * d);
    Buffer<float> table(2 * table_tokens * half);
    fill(x, rng, 0.3f, 2.0f);
    fill(params, rng, 0.0f, 1.0f);
    for (size_t i = 0; i < d; ++i)  // norm weights near 1, as trained ones are
        params[heads * d + i] = T(1.0f + 0.3f * (float)params[heads * d + i]);
    std::uniform_real_distribution<float> angle(-3.14159f, 3.14159f);
    for (size_t i = 0; i < table_tokens * half; ++i) {
        float t = angle(rng);
        table[2 * i] = std::cos(t);
        table[2 * i + 1] = std::sin(t);
    }
    const float eps = 1e-6f;
    Error e;
    std::vector<double> v(d);
    // Each pair as one access and element by element: both must give the same result. The
    // engine's grid (a block of 8 warps per 8 · rows-per-warp rows).
    for (int paired = 0; paired < 2; ++paired) {
    for (size_t i = 0; i < y.count; ++i)
        y[i] = T(NAN);
    const size_t per_block = 8 * (32 / qk_norm_lanes(d));
    const unsigned grid = (unsigned)std::min<size_t>((rows + per_block - 1) / per_block, 1 << 16);
    launch(qk_norm<T>, grid, 1, THREADS, 0, (const T *)x.data, (const T *)params.data,
           with_rope ? (const float *)table.data : nullptr, y.data, rows, d, heads, tokens, out_tokens, offset,
           eps, paired);
    for (size_t r = 0; r < rows; ++r) {
        double squares = 0;
        for (size_t c = 0; c < d; ++c) {
            v[c] = f(x[r * d + c]) + f(params[(r % heads) * d + c]);
            squares += v[c] * v[c];
        }
        const double rstd = 1.0 / std::sqrt(squares / d + eps);
        for (size_t c = 0; c < d; ++c)
            v[c] *= rstd * f(params[heads * d + c]);
        const size_t token = (r / heads) % tokens + offset;
        const T *yr = y.data + ((r / heads / tokens * out_tokens + token) * heads + r % heads) * d;
        for (size_t i = 0; i < half; ++i) {
            double u = v[2 * i], w = v[2 * i + 1];
            if (with_rope) {
                const double c = table[2 * (token * half + i)], s = table[2 * (token * half + i) + 1];
                e.add(f(yr[2 * i]), u * c - w * s);
                e.add(f(yr[2 * i + 1]), w * c + u * s);
            } else {
                e.add(f(yr[2 * i]), u);
                e.add(f(yr[2 * i + 1]), w);
            }
        }
    }
    // The joint sequence's other tokens (the other stream's place) stay untouched.
    for (size_t b = 0; b < batch; ++b)
        for (size_t t = 0; t < out_tokens; ++t)
            if (t < offset || t >= offset + tokens)
                for (size_t i = 0; i < heads * d; ++i)
                    if (!std::isnan(f(y[(b * out_tokens + t) * heads * d + i])))
                        e.add(1.0, 0.0);
    }
    e.print();
}

// The value of an e4m3 code, decoded from its bits (the reference the kernel's codes are held
// to: independent of the conversion the kernel or the emulation uses).
double e4m3_value(unsigned code) {
    const int exponent = (code >> 3) & 15, mantissa = code & 7;
    double v = exponent == 0 ? std::ldexp(mantissa / 8.0, -6) : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
    return (code & 0x80) ? -v : v;
}

// The nearest finite e4m3 code of x with x's sign (ties to the even code), saturating at ±448.
unsigned nearest_e4m3(float x) {
    const unsigned sign = std::signbit(x) ? 0x80 : 0;
    unsigned best = sign;
    double best_d = INFINITY;
    for (unsigned m = 0; m < 0x7f; ++m) {  // 0x7f: NaN
        double d = std::fabs(e4m3_value(sign | m) - (double)x);
        if (d < best_d || (d == best_d && (m & 1) == 0)) {
            best = sign | m;
            best_d = d;
        }
    }
    return best;
}

template <typename T>
void fp8_case(const std::string &op, size_t rows, size_t d, int vec, unsigned seed,
              void (*absmax)(const T *, size_t, unsigned *, int),
              void (*quantize)(const T *, size_t, const unsigned *, unsigned char *, float *, int),
              void (*quantize_rows)(const T *, size_t, unsigned char *, float *, int),
              void (*rescale)(T *, const T *, size_t, size_t, int)) {
    std::mt19937 rng(seed);
    const size_t n = rows * d;
    Buffer<T> x(n), sb(2 * d), y(n);
    fill(x, rng, 0.0f, 3.0f);
    x[n / 2] = T(0.0f);  // an exact zero
    auto grid = [](size_t items) { return (unsigned)std::min<size_t>((items + THREADS - 1) / THREADS, 65536); };
    if (op == "fp8_quantize_rows") {
        // Rows of different ranges (a row's scale must be its own maximum), and an all-zero
        // row (scale 1, zero codes).
        for (size_t r = 0; r < rows; ++r)
            for (size_t c = 0; c < d; ++c)
                x[r * d + c] = T(f(x[r * d + c]) * (float)(1 + r % 7) * (r == 1 ? 0.0f : 1.0f));
        Buffer<unsigned char> codes(n);
        Buffer<float> scales(rows);
        // The engine's block for the row (`norm_row_threads`), one row a block.
        const size_t accesses = vec ? (d + Pack<T>::N - 1) / Pack<T>::N : d;
        size_t threads = 32;
        while (threads < accesses && threads < THREADS) threads *= 2;
        launch(quantize_rows, (unsigned)rows, 1, (unsigned)threads, 0, (const T *)x.data, d, codes.data,
               scales.data, vec);
        size_t wrong = 0;
        for (size_t r = 0; r < rows; ++r) {
            double top = 0;
            for (size_t c = 0; c < d; ++c)
                top = std::max(top, std::fabs(f(x[r * d + c])));
            const float scale = top > 0 ? (float)top / 448.0f : 1.0f;
            if (scales[r] != scale) {
                std::printf("1 1\n");  // a row's scale is not its absmax / 448
                return;
            }
            for (size_t c = 0; c < d; ++c)
                wrong += codes[r * d + c] != nearest_e4m3((float)f(x[r * d + c]) / scale);
        }
        std::printf("%.3e %.3e\n", (double)wrong / n, wrong ? 1.0 : 0.0);
    } else if (op == "fp8_quantize") {
        Buffer<unsigned> amax(1);
        Buffer<unsigned char> codes(n);
        Buffer<float> scale(1);
        amax[0] = 0;
        const size_t items = vec ? n / 8 : n;
        launch(absmax, grid(items), 1, THREADS, 0, (const T *)x.data, n, amax.data, vec);
        launch(quantize, grid(items), 1, THREADS, 0, (const T *)x.data, n, (const unsigned *)amax.data,
               codes.data, scale.data, vec);
        double top = 0;
        for (size_t i = 0; i < n; ++i)
            top = std::max(top, std::fabs(f(x[i])));
        if (scale[0] != (float)top / 448.0f) {
            std::printf("1 1\n");  // the scale is not absmax / 448
            return;
        }
        size_t wrong = 0;
        for (size_t i = 0; i < n; ++i)
            wrong += codes[i] != nearest_e4m3((float)f(x[i]) / scale[0]);
        // Every code exact ("0 0"), or the share of wrong ones.
        std::printf("%.3e %.3e\n", (double)wrong / n, wrong ? 1.0 : 0.0);
    } else {
        fill(sb, rng, 0.0f, 1.0f);
        for (size_t i = 0; i < n; ++i)
            y[i] = x[i];
        const size_t items = vec ? n / Pack<T>::N : n;
        launch(rescale, grid(items), 1, THREADS, 0, y.data, (const T *)sb.data, rows, d, vec);
        Error e;
        for (size_t i = 0; i < n; ++i)
            e.add(f(y[i]), f(x[i]) * f(sb[i % d]) + f(sb[d + i % d]));
        e.print();
    }
}

// FP8 matrix-vector products: OUT outputs of INNER codes (every code but NaN's, cycled), BATCH
// rows of activations, the weight's scale and the bias per output; one warp an output, eight a
// block (the engine's launch). Relative L2 against f64 sums of the decoded codes.
template <typename T>
void fp8_gemv_case(size_t out, size_t inner, size_t batch, unsigned seed,
                   void (*gemv)(const unsigned char *, const T *, const T *, T *, size_t, size_t, size_t)) {
    std::mt19937 rng(seed);
    Buffer<unsigned char> codes(out * inner);
    for (size_t i = 0; i < codes.count; ++i) {
        unsigned char c = (unsigned char)((i * 37 + seed) % 256);
        codes[i] = (c & 0x7f) == 0x7f ? 0 : c;  // e4m3fn's NaNs left out
    }
    Buffer<T> x(batch * inner), sb(2 * out), y(batch * out);
    fill(x, rng, 0.0f, 1.0f);
    fill(sb, rng, 0.0f, 0.05f);
    for (size_t i = 0; i < y.count; ++i)
        y[i] = T(NAN);
    const unsigned warps = THREADS / 32;
    launch(gemv, (unsigned)((out + warps - 1) / warps), 1, THREADS, 0, (const unsigned char *)codes.data,
           (const T *)x.data, (const T *)sb.data, y.data, out, inner, batch);
    Error e;
    for (size_t b = 0; b < batch; ++b)
        for (size_t o = 0; o < out; ++o) {
            double sum = 0;
            for (size_t i = 0; i < inner; ++i)
                sum += (double)from_e4m3(codes[o * inner + i]) * f(x[b * inner + i]);
            e.add(f(y[b * out + o]), sum * f(sb[o]) + f(sb[out + o]));
        }
    e.print();
}

// Casts to e4m3 (a weight's values, saturating past ±448, a subnormal, ±0) must give the
// nearest-even code of each value, and every finite code must decode to its exact value:
// prints the number of wrong codes and values twice (any fails the case).
template <typename T>
void cast_e4m3_case(size_t rows, size_t d, unsigned seed) {
    std::mt19937 rng(seed);
    const size_t n = rows * d;
    Buffer<T> x(n);
    fill(x, rng, 0.0f, 150.0f);
    const float special[] = {0.0f, -0.0f, 600.0f, -1000.0f, 0.0013f, -0.0009f, 448.0f, 232.0f};
    for (size_t i = 0; i < std::size(special) && i < n; ++i)
        x[i] = T(special[i]);
    auto grid = [](size_t items) { return (unsigned)std::min<size_t>((items + THREADS - 1) / THREADS, 65536); };
    Buffer<unsigned char> codes(n);
    launch(fp8_encode<T>, grid(n), 1, THREADS, 0, (const T *)x.data, codes.data, n);
    size_t wrong = 0;
    for (size_t i = 0; i < n; ++i)
        wrong += codes[i] != nearest_e4m3((float)f(x[i]));
    Buffer<unsigned char> every(256);
    Buffer<T> values(256);
    for (unsigned c = 0; c < 256; ++c)
        every[c] = (unsigned char)c;
    launch(fp8_decode<T>, grid(256), 1, THREADS, 0, (const unsigned char *)every.data, values.data, (size_t)256);
    for (unsigned c = 0; c < 256; ++c)
        if ((c & 0x7f) != 0x7f)  // NaN
            wrong += f(values[c]) != e4m3_value(c);
    std::printf("%zu %zu\n", wrong, wrong);
}

template <typename T>
int run(const std::string &op, size_t rows, size_t d, size_t batches, int vec, unsigned seed,
        void (*ln)(const T *, const T *, const T *, T *, size_t, size_t, float, int),
        void (*ln_affine)(const T *, const T *, const T *, T *, size_t, size_t, float, int),
        void (*gs)(const T *, float *, size_t, size_t, float, int),
        void (*ga)(const T *, const float *, const T *, const T *, T *, size_t, size_t, size_t, size_t, int, int)) {
    if (op == "layer_norm_modulate")
        layer_norm_modulate_case<T>(rows, d, batches, vec, seed, ln, false);
    else if (op == "layer_norm_affine")
        layer_norm_modulate_case<T>(rows, d, batches, vec, seed, ln_affine, true);
    else if (op == "group_norm")
        group_norm_case<T>(rows, d, batches, vec, seed, gs, ga);
    else if (op == "modulate" || op == "gated_add" || op == "gated_add_bias" || op == "gated_add_sum" ||
             op == "bias_add" ||
             op == "bias_add_residual" || op == "residual_add" || op == "geglu" || op == "geglu_bias" ||
             op == "channel_add" || op == "upsample" ||
             op == "rope" || op == "gelu_tanh" || op == "gelu_tanh_bias")
        map_case<T>(op, rows, d, batches, vec, seed);
    else if (op == "qk_norm")
        qk_norm_case<T>(rows, d, batches, vec, seed);
    else if (op == "bias_join")
        bias_join_case<T>(rows, d, vec, seed);
    else if (op == "cast_e4m3")
        cast_e4m3_case<T>(rows, d, seed);
    else if (op == "fp8_gemv") {
        if constexpr (sizeof(T) == 2)
            fp8_gemv_case<T>(rows, d, batches, seed, fp8_gemv<T>);
        else
            return 2;
    }
    else if (op == "fp8_quantize" || op == "fp8_quantize_rows" || op == "fp8_rescale") {
        if constexpr (sizeof(T) == 2)  // the FP8 kernels take 16-bit activations
            fp8_case<T>(op, rows, d, vec, seed, fp8_absmax<T>, fp8_quantize<T>, fp8_quantize_rows<T>,
                        fp8_rescale<T>);
        else
            return 2;
    }
    else
        return 2;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        std::fprintf(stderr, "usage: %s OP DTYPE ROWS D BATCHES VEC SEED\n", argv[0]);
        return 2;
    }
    const std::string op = argv[1], dtype = argv[2];
    const size_t rows = std::atol(argv[3]), d = std::atol(argv[4]), batches = std::atol(argv[5]);
    const int vec = std::atoi(argv[6]);
    const unsigned seed = std::atoi(argv[7]);
#define RUN(T, S)                                                                                    \
    run<T>(op, rows, d, batches, vec, seed, layer_norm_modulate_##S, layer_norm_affine_##S,          \
           group_norm_partial_##S, group_norm_apply_##S)
    if (dtype == "f32")
        return RUN(float, f32);
    if (dtype == "f16")
        return RUN(__half, f16);
    if (dtype == "bf16")
        return RUN(__nv_bfloat16, bf16);
    return 2;
}
