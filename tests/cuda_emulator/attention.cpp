// Runs one fused attention kernel of src/engine/cuda/attention.cu under the CPU emulation and
// prints its error against an exact (f64) attention of the same rounded inputs:
//   attention KERNEL DTYPE PADDED BH N M D GRID_X THREADS SHARED_BYTES SEED
// prints "relative_l2 max_abs". KERNEL: tiled | pipelined | wide (the names of
// engine::cuda_geometry::AttentionKernel, which also gives GRID_X, THREADS and SHARED_BYTES).
#include "emulate.h"

#include "../../src/engine/cuda/attention.cu"

#include <cstdio>
#include <random>
#include <string>

template <typename T>
using Kernel = void (*)(const T *, const T *, const T *, T *, int, int, int, float);

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
                                    ROWS("wide", wide_, f16)};
static const Entry<__nv_bfloat16> BF16[] = {ROWS("tiled", , bf16), ROWS("pipelined", pipelined_, bf16),
                                            ROWS("wide", wide_, bf16)};

template <typename T, size_t N>
int run(const Entry<T> (&table)[N], const std::string &name, int padded, int bh, int n, int m, int d,
        unsigned grid_x, unsigned threads, size_t shared_bytes, unsigned seed) {
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
    launch(kernel, grid_x, (unsigned)bh, threads, shared_bytes, (const T *)q.data, (const T *)k.data,
           (const T *)v.data, o.data, n, m, d, scale_log2);

    double diff2 = 0, ref2 = 0, max_abs = 0;
    std::vector<double> p(m);
    for (int h = 0; h < bh; ++h) {
        for (int i = 0; i < n; ++i) {
            const T *qi = q.data + ((size_t)h * n + i) * d;
            double top = -INFINITY, sum = 0;
            for (int j = 0; j < m; ++j) {
                const T *kj = k.data + ((size_t)h * m + j) * d;
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
                    exact += p[j] * (double)(float)v.data[((size_t)h * m + j) * d + c];
                exact /= sum;
                double got = (double)(float)o.data[((size_t)h * n + i) * d + c];
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
    if (argc != 12) {
        std::fprintf(stderr, "usage: %s KERNEL DTYPE PADDED BH N M D GRID_X THREADS SHARED_BYTES SEED\n", argv[0]);
        return 2;
    }
    const std::string name = argv[1], dtype = argv[2];
    const int padded = std::atoi(argv[3]), bh = std::atoi(argv[4]), n = std::atoi(argv[5]),
              m = std::atoi(argv[6]), d = std::atoi(argv[7]);
    const unsigned grid_x = std::atoi(argv[8]), threads = std::atoi(argv[9]);
    const size_t shared = std::atol(argv[10]);
    const unsigned seed = std::atoi(argv[11]);
    if (dtype == "f16")
        return run(F16, name, padded, bh, n, m, d, grid_x, threads, shared, seed);
    if (dtype == "bf16")
        return run(BF16, name, padded, bh, n, m, d, grid_x, threads, shared, seed);
    std::fprintf(stderr, "dtype f16 or bf16\n");
    return 2;
}
