// Runs one fused attention kernel of src/engine/cuda/attention.cu or attention_hopper.cu under the CPU emulation and
// prints its error against an exact (f64) attention of the same rounded inputs:
//   attention KERNEL DTYPE PADDED B H N M D LAYOUT GRID_X THREADS SHARED_BYTES SEED
// prints "relative_l2 max_abs". KERNEL: tiled | pipelined | wide | hopper | hopper-128 | hopper-k128 | hopper-128-k128 (the names of
// engine::cuda_geometry::AttentionKernel, which also gives GRID_X, THREADS and SHARED_BYTES).
// LAYOUT of q, k and v: heads_first (B, H, tokens, D) or tokens_first (B, tokens, H, D), read in
// place through strides; the output is token-major (B, N, H, D), as the engine expects.
#include "emulate.h"

#include "../../src/engine/cuda/attention.cu"
#include "../../src/engine/cuda/attention_hopper.cu"

#include <cstdio>
#include <random>
#include <string>

template <typename T>
using Kernel = void (*)(const T *, const T *, const T *, T *, int, int, int, Layouts, float);

template <typename T>
struct Entry {
    const char *name;
    int padded;
    Kernel<T> kernel;
};

#define ROW(NAME, INFIX, DT, P) {NAME, P, flash_attention_##INFIX##DT##_##P}
#define ROWS(NAME, INFIX, DT)                                                              \
    ROW(NAME, INFIX, DT, 16), ROW(NAME, INFIX, DT, 32), ROW(NAME, INFIX, DT, 48),          \
        ROW(NAME, INFIX, DT, 64), ROW(NAME, INFIX, DT, 80), ROW(NAME, INFIX, DT, 96),      \
        ROW(NAME, INFIX, DT, 128), ROW(NAME, INFIX, DT, 160)
static const Entry<__half> F16[] = {ROWS("tiled", , f16), ROWS("pipelined", pipelined_, f16),
                                    ROWS("wide", wide_, f16), ROW("hopper", hopper_, f16, 64),
                                    ROW("hopper", hopper_, f16, 128), ROW("hopper-128", hopper128_, f16, 64),
                                    ROW("hopper-128", hopper128_, f16, 128), ROW("hopper-k128", hopperk_, f16, 64),
                                    ROW("hopper-k128", hopperk_, f16, 128),
                                    ROW("hopper-128-k128", hopper128k_, f16, 64),
                                    ROW("hopper-128-k128", hopper128k_, f16, 128)};
static const Entry<__nv_bfloat16> BF16[] = {ROWS("tiled", , bf16), ROWS("pipelined", pipelined_, bf16),
                                            ROWS("wide", wide_, bf16), ROW("hopper", hopper_, bf16, 64),
                                            ROW("hopper", hopper_, bf16, 128),
                                            ROW("hopper-128", hopper128_, bf16, 64),
                                            ROW("hopper-128", hopper128_, bf16, 128),
                                            ROW("hopper-k128", hopperk_, bf16, 64),
                                            ROW("hopper-k128", hopperk_, bf16, 128),
                                            ROW("hopper-128-k128", hopper128k_, bf16, 64),
                                            ROW("hopper-128-k128", hopper128k_, bf16, 128)};

// Strides of a (B, H, tokens, D) operand stored in `layout`.
Strides strides_of(const std::string &layout, int heads, int tokens, int d) {
    if (layout == "tokens_first")
        return {(long long)tokens * heads * d, d, (long long)heads * d};
    return {(long long)heads * tokens * d, (long long)tokens * d, d};
}

template <typename T, size_t N>
int run(const Entry<T> (&table)[N], const std::string &name, int padded, int batch, int heads, int n,
        int m, int d, const std::string &layout, unsigned grid_x, unsigned threads, size_t shared_bytes,
        unsigned seed) {
    const int bh = batch * heads;
    Kernel<T> kernel = nullptr;
    for (const auto &e : table)
        if (name == e.name && padded == e.padded)
            kernel = e.kernel;
    if (!kernel) {
        std::fprintf(stderr, "no kernel %s for head size %d\n", name.c_str(), padded);
        return 2;
    }
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    Buffer<T> q((size_t)bh * n * d), k((size_t)bh * m * d), v((size_t)bh * m * d), o((size_t)bh * n * d);
    for (auto *b : {&q, &k, &v})
        for (size_t i = 0; i < b->count; ++i)
            (*b)[i] = T(normal(rng));
    for (size_t i = 0; i < o.count; ++i)
        o[i] = T(NAN);  // a row the kernel never writes shows as NaN
    const float scale = 1.0f / std::sqrt((float)d);
    const float scale_log2 = scale * 1.4426950408889634f;
    const Strides qs = strides_of(layout, heads, n, d), ks = strides_of(layout, heads, m, d);
    const Layouts L = {heads, qs, ks, ks, strides_of("tokens_first", heads, n, d)};
    launch(kernel, grid_x, (unsigned)bh, threads, shared_bytes, (const T *)q.data, (const T *)k.data,
           (const T *)v.data, o.data, n, m, d, L, scale_log2);
    // Element offset of (batch · heads + head, row) in an operand.
    auto at = [heads](const Strides &s, int bh, int row) {
        return (size_t)((bh / heads) * s.batch + (bh % heads) * s.head + row * s.row);
    };

    double diff2 = 0, ref2 = 0, max_abs = 0;
    std::vector<double> p(m);
    const Strides os = L.o;
    for (int h = 0; h < bh; ++h) {
        for (int i = 0; i < n; ++i) {
            const T *qi = q.data + at(qs, h, i);
            double top = -INFINITY, sum = 0;
            for (int j = 0; j < m; ++j) {
                const T *kj = k.data + at(ks, h, j);
                double s = 0;
                for (int c = 0; c < d; ++c)
                    s += (double)(float)qi[c] * (double)(float)kj[c];
                p[j] = s * scale;
                top = std::max(top, p[j]);
            }
            for (int j = 0; j < m; ++j)
                sum += (p[j] = std::exp(p[j] - top));
            for (int c = 0; c < d; ++c) {
                double exact = 0;
                for (int j = 0; j < m; ++j)
                    exact += p[j] * (double)(float)v.data[at(ks, h, j) + c];
                exact /= sum;
                double got = (double)(float)o.data[at(os, h, i) + c];
                diff2 += (got - exact) * (got - exact);
                ref2 += exact * exact;
                max_abs = std::max(max_abs, std::fabs(got - exact));
                if (std::isnan(got))
                    max_abs = NAN;
            }
        }
    }
    std::printf("%.3e %.3e\n", std::sqrt(diff2 / ref2), max_abs);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 14) {
        std::fprintf(stderr, "usage: %s KERNEL DTYPE PADDED B H N M D LAYOUT GRID_X THREADS SHARED_BYTES SEED\n",
                     argv[0]);
        return 2;
    }
    const std::string name = argv[1], dtype = argv[2], layout = argv[9];
    const int padded = std::atoi(argv[3]), batch = std::atoi(argv[4]), heads = std::atoi(argv[5]),
              n = std::atoi(argv[6]), m = std::atoi(argv[7]), d = std::atoi(argv[8]);
    const unsigned grid_x = std::atoi(argv[10]), threads = std::atoi(argv[11]);
    const size_t shared = std::atol(argv[12]);
    const unsigned seed = std::atoi(argv[13]);
    if (dtype == "f16")
        return run(F16, name, padded, batch, heads, n, m, d, layout, grid_x, threads, shared, seed);
    if (dtype == "bf16")
        return run(BF16, name, padded, batch, heads, n, m, d, layout, grid_x, threads, shared, seed);
    std::fprintf(stderr, "dtype f16 or bf16\n");
    return 2;
}
