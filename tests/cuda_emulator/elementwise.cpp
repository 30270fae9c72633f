// Runs kernels of src/engine/cuda/elementwise.cu under the CPU emulation and prints their error
// against f64 references computed from the same rounded inputs:
//   elementwise OP DTYPE ROWS D BATCHES VEC SEED      (OP: layer_norm_modulate | group_norm)
// prints "relative_l2 max_abs". layer_norm_modulate: ROWS rows of D in BATCHES samples (shift and
// scale per sample), one block of 256 threads per row as the engine launches it. group_norm:
// ROWS = batch · groups blocks over D = values per group (channels per group · HW, with 4
// channels per group), then the apply kernel, with SiLU.
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

template <typename T>
void layer_norm_modulate_case(size_t rows, size_t d, size_t batches, int vec, unsigned seed,
                              void (*kernel)(const T *, const T *, const T *, T *, size_t, size_t, float, int)) {
    std::mt19937 rng(seed);
    Buffer<T> x(rows * d), shift(batches * d), scale(batches * d), y(rows * d);
    fill(x, rng, 0.5f, 2.0f);
    fill(shift, rng, 0.0f, 1.0f);
    fill(scale, rng, 0.0f, 0.5f);
    for (size_t i = 0; i < y.count; ++i)
        y[i] = T(NAN);
    const float eps = 1e-6f;
    const size_t per_batch = rows / batches;
    launch(kernel, (unsigned)rows, 1, THREADS, 0, (const T *)x.data, (const T *)shift.data,
           (const T *)scale.data, y.data, d, per_batch, eps, vec);
    Error e;
    for (size_t r = 0; r < rows; ++r) {
        const auto [mean, var] = moments(x.data + r * d, d);
        const size_t b = r / per_batch;
        for (size_t c = 0; c < d; ++c) {
            double norm = (f(x[r * d + c]) - mean) / std::sqrt(var + eps);
            e.add(f(y[r * d + c]), norm * (1.0 + f(scale[b * d + c])) + f(shift[b * d + c]));
        }
    }
    e.print();
}

template <typename T>
void group_norm_case(size_t blocks, size_t group_size, int vec, unsigned seed,
                     void (*stats_kernel)(const T *, float *, size_t, float, int),
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
    launch(stats_kernel, (unsigned)blocks, 1, THREADS, 0, (const T *)x.data, stats.data, group_size, eps, vec);
    const size_t items = vec ? n / Pack<T>::N : n;
    const unsigned grid = (unsigned)std::min<size_t>((items + THREADS - 1) / THREADS, 1 << 16);
    launch(apply_kernel, grid, 1, THREADS, 0, (const T *)x.data, (const float *)stats.data,
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

template <typename T>
int run(const std::string &op, size_t rows, size_t d, size_t batches, int vec, unsigned seed,
        void (*ln)(const T *, const T *, const T *, T *, size_t, size_t, float, int),
        void (*gs)(const T *, float *, size_t, float, int),
        void (*ga)(const T *, const float *, const T *, const T *, T *, size_t, size_t, size_t, size_t, int, int)) {
    if (op == "layer_norm_modulate")
        layer_norm_modulate_case<T>(rows, d, batches, vec, seed, ln);
    else if (op == "group_norm")
        group_norm_case<T>(rows, d, vec, seed, gs, ga);
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
#define RUN(T, S) run<T>(op, rows, d, batches, vec, seed, layer_norm_modulate_##S, group_norm_stats_##S, group_norm_apply_##S)
    if (dtype == "f32")
        return RUN(float, f32);
    if (dtype == "f16")
        return RUN(__half, f16);
    if (dtype == "bf16")
        return RUN(__nv_bfloat16, bf16);
    return 2;
}
