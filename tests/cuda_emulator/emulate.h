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

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
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
inline float exp2_approx(float x) { return std::exp2(x); }
inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline unsigned atomicMax(unsigned *p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
struct uint2 {
    uint32_t x, y;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }

// float → e4m3 (OCP "fn": bias 7, 3 mantissa bits, no infinities, 0x7f NaN, ±448 largest),
// rounded to nearest even, saturating at ±448 (cuda_fp8.h's __NV_SATFINITE).
inline unsigned char e4m3(float x) {
    if (std::isnan(x))
        return 0x7f;
    const unsigned char sign = std::signbit(x) ? 0x80 : 0;
    const float a = std::fabs(x);
    if (a >= 448.0f)
        return sign | 0x7e;
    int e;
    std::frexp(a, &e);                    // a = f · 2^e, f ∈ [0.5, 1): a's exponent is e − 1
    const int exponent = std::max(e - 1, -6);  // below 2^-6: subnormals, spaced 2^-9
    const float step = std::ldexp(1.0f, exponent - 3);
    const float q = std::nearbyint(a / step) * step;  // the default rounding: to nearest even
    if (q < std::ldexp(1.0f, -6))
        return sign | (unsigned char)(q / std::ldexp(1.0f, -9));
    int qe;
    const float qf = std::frexp(q, &qe);  // q = qf · 2^qe
    const int mantissa = (int)std::lround((qf * 2.0f - 1.0f) * 8.0f);
    return sign | (unsigned char)(((qe - 1 + 7) << 3) | mantissa);
}
// The value of an e4m3 code: sign, 4 exponent bits (bias 7; 0: subnormals), 3 mantissa bits.
inline float from_e4m3(unsigned char code) {
    const int exponent = (code >> 3) & 15, mantissa = code & 7;
    if ((code & 0x7f) == 0x7f)
        return NAN;
    const float v = exponent == 0 ? std::ldexp(mantissa / 8.0f, -6) : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
    return (code & 0x80) ? -v : v;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {
struct Warp {
    std::barrier<> sync{32};
    uint32_t words[32][6];
    const void *addresses[32];
    float floats[32];
};
// A warpgroup (4 warps) exchanging wgmma operands.
struct Group {
    std::barrier<> sync{128};
    uint32_t a[128][4];
    uint64_t descriptor[128];
};
inline thread_local unsigned lane, warp;
inline Warp *warps;
inline Group *groups;
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
// Where dynamic shared memory starts in the emulated shared window: deliberately not on a
// 1024-byte boundary (a real block's may not be either), so kernels that align their tiles for
// the swizzle pattern do so here too.
constexpr uint32_t SHARED_WINDOW_START = 0x190;

// The 16-bit element (k, n) of a wgmma B operand (16 × N) in shared memory, per the PTX ISA's
// canonical layouts ("Canonical Layouts", T = 8 elements per 16 bytes) and descriptor format:
//   K-major, 128-byte swizzle: ((8,m),(T,2k)):((8T,SBO),(1,T)) — n % 8 at 128 bytes, n / 8 at SBO,
//     k contiguous;
//   N-major, 128-byte swizzle: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) — n % 64 contiguous, n / 64 at
//     LBO, k % 8 at 128 bytes, k / 8 at SBO;
// then Swizzle<3,4,3> on the byte address: bits 4-6 ^= bits 7-9. Only what our kernels use (the
// 128-byte swizzle, base offset 0) is emulated; anything else stops the test.
inline const uint16_t *operand_b(uint64_t desc, bool n_major, int k, int n) {
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4;
    const uint32_t leading = (uint32_t)((desc >> 16) & 0x3FFF) << 4;
    const uint32_t stride = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    assert((desc >> 62) == 1 && "only the 128-byte swizzle is emulated");
    assert(((desc >> 49) & 7) == 0 && "only base offset 0 is emulated");
    uint32_t address = n_major ? start + (n % 64) * 2 + (n / 64) * leading + (k % 8) * 128 + (k / 8) * stride
                               : start + (n % 8) * 128 + (n / 8) * stride + k * 2;
    address ^= ((address >> 7) & 7) << 4;
    assert(address >= SHARED_WINDOW_START && "wgmma operand before the block's shared memory");
    return reinterpret_cast<const uint16_t *>(dynamic_shared + (address - SHARED_WINDOW_START));
}

// One issued wgmma.mma_async: where its operands and accumulator are, read when it completes.
struct Pending {
    float *d;
    int n;
    const uint32_t *a;
    uint64_t desc;
    bool n_major;
    int accumulate;
    void (*complete)(const Pending &);
};
// This thread's wgmma issued since the last commit, and its committed groups, oldest first.
inline thread_local std::vector<Pending> issued;
inline thread_local std::deque<std::vector<Pending>> committed;

// wgmma.mma_async.m64nNk16 with A in registers, f32 accumulators (`accumulate` 0: d = a·b). The
// warpgroup's thread i (warp w = i / 32, lane (g, t) = (lane / 4, lane % 4)) holds
// A: registers 0-3 = rows 16w + g | 16w + g + 8 × k 2t..2t+1 | 2t+8.. (mma.m16n8k16's A per warp);
// D: value v = row 16w + g + 8((v / 2) % 2), column 8(v / 4) + 2t + v % 2
// (cute's ALayout_64x16 and CLayout_64xN). Computed as late as the hardware may: at the
// wait_group that retires it, from the A registers and shared memory as they are then — a
// kernel that touches either (or the accumulator) before waiting gets a wrong result here.
template <typename T>
void wgmma_complete(const Pending &p) {
    Group &G = groups[warp / 4];
    const unsigned id = warp % 4 * 32 + lane;
    for (int i = 0; i < 4; ++i)
        G.a[id][i] = p.a[i];
    G.descriptor[id] = p.desc;
    G.sync.arrive_and_wait();
    float *d = p.d;
    const int n = p.n, accumulate = p.accumulate;
    const uint64_t desc = p.desc;
    const bool n_major = p.n_major;
    assert(G.descriptor[id] == G.descriptor[0] && "the descriptor differs across the warpgroup");
    auto A = [&](int r, int k) {
        const int holder = (r / 16) * 32 + (r % 8) * 4 + (k % 8) / 2;
        return element<T>(G.a[holder][(r % 16 >= 8) + 2 * (k >= 8)], k % 2);
    };
    auto B = [&](int k, int col) {
        uint16_t bits = *operand_b(desc, n_major, k, col);
        return element<T>(bits, 0);
    };
    const int w = id / 32, g = lane / 4, t = lane % 4;
    for (int v = 0; v < n / 2; ++v) {
        const int row = 16 * w + g + 8 * ((v >> 1) & 1), col = 8 * (v >> 2) + 2 * t + (v & 1);
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k)
            sum += A(row, k) * B(k, col);
        d[v] = accumulate ? d[v] + sum : sum;
    }
    G.sync.arrive_and_wait();
}

template <typename T>
void wgmma(float *d, int n, const uint32_t *a, uint64_t desc, bool n_major, int accumulate) {
    issued.push_back({d, n, a, desc, n_major, accumulate, &wgmma_complete<T>});
}
inline void wgmma_commit() {
    committed.push_back(std::move(issued));
    issued.clear();
}
// wgmma.wait_group N: retires all but the N most recent committed groups (warpgroup-wide, as
// the instruction is .sync.aligned).
inline void wgmma_wait(int n) {
    while ((int)committed.size() > n) {
        for (const Pending &p : committed.front())
            p.complete(p);
        committed.pop_front();
    }
}
}  // namespace emu

inline uint32_t shared_address(const void *p) {
    return emu::SHARED_WINDOW_START + (uint32_t)((const unsigned char *)p - emu::dynamic_shared);
}
inline void fence_async_shared() {}
inline void wgmma_fence() {}
inline void wgmma_commit() { emu::wgmma_commit(); }
template <int N>
void wgmma_wait() {
    emu::wgmma_wait(N);
}
inline void pin(float &) {}
inline void pin(uint32_t &) {}

template <typename T>
struct Wgmma {
    template <int N, int TRANS_B>
    static void mma(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b, int accumulate) {
        emu::wgmma<T>(&d[0][0], N, a, b, TRANS_B, accumulate);
    }
};

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
            std::unique_ptr<emu::Group[]> groups(new emu::Group[(threads + 127) / 128]);
            emu::groups = groups.get();
            std::barrier<> block(threads);
            emu::block = &block;
            std::vector<std::thread> pool;
            for (unsigned i = 0; i < threads; ++i) {
                pool.emplace_back([&, i] {
                    threadIdx = {i, 0, 0};
                    emu::lane = i % 32;
                    emu::warp = i / 32;
                    kernel(args...);
                    assert(emu::issued.empty() && emu::committed.empty() &&
                           "a wgmma never waited for");
                });
            }
            for (auto &t : pool)
                t.join();
        }
    }
}
