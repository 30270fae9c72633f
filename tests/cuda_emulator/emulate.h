// The CUDA primitives of our kernels, emulated on the CPU so that the kernels' own source
// (src/engine/cuda/*.cu, compiled with -DCANDELA_EMULATE) runs in CI on a machine without a GPU.
//
// Every CUDA thread of a block is a host thread; blocks run one after another. Warp-wide
// instructions (mma.sync, ldmatrix, shuffles) exchange their operands through a per-warp
// table between two barriers, with each lane computing its own part of the result from the
// fragment layouts of the PTX ISA (the part this emulation exists to check). cp.async copies at
// once. Shared memory: static __shared__ arrays become function statics (one block at a time),
// dynamic shared memory a heap buffer of exactly the launch's size, so AddressSanitizer catches
// a kernel reading past it or past its global buffers.
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define DYNAMIC_SHARED(NAME) unsigned char *NAME = emu::dynamic_shared

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
struct uint4 {
    uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

typedef _Float16 __half;
// bfloat16: the top half of an f32, rounded to nearest even.
struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        u += 0x7fff + ((u >> 16) & 1);
        bits = (uint16_t)(u >> 16);
    }
    operator float() const {
        uint32_t u = (uint32_t)bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};

inline thread_local Dim3 threadIdx;
inline Dim3 blockIdx, blockDim, gridDim;

// Conversions and fast math of cuda_fp16.h / cuda_bf16.h / the device math library.
inline float __half2float(__half x) { return (float)x; }
inline __half __float2half_rn(float x) { return (__half)x; }
inline float __bfloat162float(__nv_bfloat16 x) { return (float)x; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {
struct Warp {
    std::barrier<> sync{32};
    uint32_t words[32][6];
    const void *addresses[32];
    float floats[32];
};
inline thread_local unsigned lane, warp;
inline Warp *warps;
inline std::barrier<> *block;
inline unsigned char *dynamic_shared;

template <typename T>
float element(uint32_t word, int upper) {
    uint16_t bits = upper ? (uint16_t)(word >> 16) : (uint16_t)(word & 0xffff);
    T x;
    std::memcpy(&x, &bits, 2);
    return (float)x;
}

// mma.m16n8k16.row.col, f32 accumulators: lane (g, t) = (lane / 4, lane % 4) holds
// A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
// B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..).
template <typename T>
void mma(float *c, const uint32_t *a, const uint32_t *b) {
    Warp &w = warps[warp];
    for (int i = 0; i < 4; ++i)
        w.words[lane][i] = a[i];
    w.words[lane][4] = b[0];
    w.words[lane][5] = b[1];
    w.sync.arrive_and_wait();
    auto A = [&](int r, int k) {
        return element<T>(w.words[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2);
    };
    auto B = [&](int k, int n) { return element<T>(w.words[n * 4 + (k % 8) / 2][4 + (k >= 8)], k % 2); };
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k)
            sum += A(r, k) * B(k, n);
        c[i] += sum;
    }
    w.sync.arrive_and_wait();
}

// ldmatrix.m8n8.x4(.trans).b16: lane l gives the address of row l % 8 of matrix l / 8 (16-byte
// aligned); lane l receives row l / 4, columns 2(l % 4) and 2(l % 4) + 1 of each matrix — of the
// transposed matrix with .trans.
inline void ldmatrix(uint32_t (&r)[4], const void *shared, bool trans) {
    assert(((uintptr_t)shared & 15) == 0 && "ldmatrix row address not 16-byte aligned");
    Warp &w = warps[warp];
    w.addresses[lane] = shared;
    w.sync.arrive_and_wait();
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int m = 0; m < 4; ++m) {
        uint16_t v[2];
        for (int e = 0; e < 2; ++e) {
            const uint16_t *p = trans ? (const uint16_t *)w.addresses[m * 8 + col + e] + row
                                      : (const uint16_t *)w.addresses[m * 8 + row] + col + e;
            v[e] = *p;
        }
        r[m] = (uint32_t)v[0] | ((uint32_t)v[1] << 16);
    }
    w.sync.arrive_and_wait();
}
}  // namespace emu

inline void __syncthreads() { emu::block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    emu::Warp &w = emu::warps[emu::warp];
    w.floats[emu::lane] = v;
    w.sync.arrive_and_wait();
    float other = w.floats[emu::lane ^ lane_mask];
    w.sync.arrive_and_wait();
    return other;
}

template <typename T>
struct Ops {
    static uint32_t pack(float a, float b) {
        T lo(a), hi(b);
        uint16_t l, h;
        std::memcpy(&l, &lo, 2);
        std::memcpy(&h, &hi, 2);
        return (uint32_t)l | ((uint32_t)h << 16);
    }
    static void mma(float *c, const uint32_t *a, const uint32_t *b) { emu::mma<T>(c, a, b); }
};

inline void copy16_async(void *shared, const void *global, int bytes) {
    assert(((uintptr_t)shared & 15) == 0 && ((uintptr_t)global & 15) == 0);
    std::memcpy(shared, global, bytes);
    std::memset((char *)shared + bytes, 0, 16 - bytes);
}
inline void cp_async_commit() {}
template <int N>
void cp_async_wait() {}
inline void ldmatrix_x4(uint32_t (&r)[4], const void *shared) { emu::ldmatrix(r, shared, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void *shared) { emu::ldmatrix(r, shared, true); }

// A 16-byte-aligned heap array of exactly `count` elements (what a kernel may touch).
template <typename T>
struct Buffer {
    T *data;
    size_t count;
    explicit Buffer(size_t n) : data(nullptr), count(n) {
        if (n)
            data = static_cast<T *>(std::aligned_alloc(16, (n * sizeof(T) + 15) / 16 * 16));
    }
    ~Buffer() { std::free(data); }
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    T &operator[](size_t i) { return data[i]; }
};

// Runs kernel(args...) on a grid of (grid_x, grid_y) blocks of `threads` threads with
// `dynamic_bytes` of dynamic shared memory.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid_x, unsigned grid_y, unsigned threads, size_t dynamic_bytes,
            Args... args) {
    blockDim = {threads, 1, 1};
    gridDim = {grid_x, grid_y, 1};
    for (unsigned y = 0; y < grid_y; ++y) {
        for (unsigned x = 0; x < grid_x; ++x) {
            blockIdx = {x, y, 0};
            Buffer<unsigned char> shared(dynamic_bytes);
            emu::dynamic_shared = shared.data;
            std::unique_ptr<emu::Warp[]> warps(new emu::Warp[threads / 32]);
            emu::warps = warps.get();
            std::barrier<> block(threads);
            emu::block = &block;
            std::vector<std::thread> pool;
            for (unsigned i = 0; i < threads; ++i) {
                pool.emplace_back([&, i] {
                    threadIdx = {i, 0, 0};
                    emu::lane = i % 32;
                    emu::warp = i / 32;
                    kernel(args...);
                });
            }
            for (auto &t : pool)
                t.join();
        }
    }
}
