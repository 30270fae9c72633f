// What the fused attention kernels share (attention.cu for every card from Ampere on,
// attention_hopper.cu for compute capability 9.0): the tensor-core operand types, the device-only
// primitives, operand strides, and the per-warp pieces of the online softmax over 16 query rows
// held in mma.m16n8k16 fragments (the layout the Hopper warpgroup instructions use per warp too).
#pragma once

#ifndef CANDELA_EMULATE
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
#include <stdint.h>

template <typename T> struct Ops;
#ifndef CANDELA_EMULATE
// Per operand type: two floats packed into the 32-bit register mma reads, and the mma itself.
#define OPS(T, T2, PACK, PTX_TYPE)                                                                 \
    template <> struct Ops<T> {                                                                    \
        static __device__ __forceinline__ uint32_t pack(float a, float b) {                        \
            T2 h = PACK(a, b);                                                                     \
            return *reinterpret_cast<uint32_t *>(&h);                                              \
        }                                                                                          \
        static __device__ __forceinline__ void mma(float *c, const uint32_t *a, const uint32_t *b) { \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "    \
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                 \
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                          \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));       \
        }                                                                                          \
    };
OPS(__half, __half2, __floats2half2_rn, "f16")
OPS(__nv_bfloat16, __nv_bfloat162, __floats2bfloat162_rn, "bf16")

#endif  // CANDELA_EMULATE

// Two adjacent 16-bit values as one 32-bit register (the low half first, as mma reads them).
template <typename T>
__device__ __forceinline__ uint32_t pair(const T *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}
template <typename T>
__device__ __forceinline__ uint32_t pair2(T lo, T hi) {
    uint16_t l = *reinterpret_cast<uint16_t *>(&lo);
    uint16_t h = *reinterpret_cast<uint16_t *>(&hi);
    return (uint32_t)l | ((uint32_t)h << 16);
}

#ifndef CANDELA_EMULATE
// 16 bytes global → shared without passing through registers; `bytes` < 16 zero-fills the rest
// (0 for the rows past the last key).
__device__ __forceinline__ void copy16_async(void *shared, const void *global, int bytes) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
}

// Four 8×8 blocks of 16-bit values from shared memory (lane l gives the address of row l % 8 of
// block l / 8); each lane receives row l / 4, columns 2(l % 4) and 2(l % 4) + 1 of every block —
// or with `.trans` the transposed blocks.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *shared) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(shared);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *shared) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(shared);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 2^x in one MUFU.EX2 (exp2f adds a range fix-up of three instructions for subnormal results;
// probabilities below 2^-126 of the row's maximum flush to 0 instead).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The block's dynamic shared memory.
#define DYNAMIC_SHARED(NAME) extern __shared__ __align__(16) unsigned char NAME[]

#endif  // CANDELA_EMULATE

// Element offset of (batch b, head h, row i) in an operand: b·batch + h·head + i·row.
struct Strides {
    long long batch, head, row;
};
struct Layouts {
    int heads;  // blockIdx.y = batch · heads + head
    Strides q, k, v, o;
};

// `p` moved to this block's (batch, head).
template <typename P>
__device__ __forceinline__ P *head_of(P *p, const Strides &s, int heads) {
    const int batch = blockIdx.y / heads, head = blockIdx.y % heads;
    return p + batch * s.batch + head * s.head;
}

// All four operands moved to this block's (batch, head).
template <typename T>
__device__ __forceinline__ void to_head(const T *__restrict__ &q, const T *__restrict__ &k,
                                        const T *__restrict__ &v, T *__restrict__ &o, const Layouts &L) {
    q = head_of(q, L.q, L.heads);
    k = head_of(k, L.k, L.heads);
    v = head_of(v, L.v, L.heads);
    o = head_of(o, L.o, L.heads);
}

// A warp's 16 rows before the first key: no output, no sum, maximum −∞.
template <int DP>
__device__ __forceinline__ void start_rows(float (&acc)[DP / 8][4], float (&row_max)[2], float (&row_sum)[2]) {
#pragma unroll
    for (int j = 0; j < DP / 8; ++j)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.0f;
}

// This warp's 16 query rows (from row0) as A fragments, one per 16-column step.
template <typename T, int DP>
__device__ __forceinline__ void load_queries(uint32_t (&qa)[DP / 16][4], const T *q, int row0, int n,
                                             int d, long long q_row, int g, int t) {
    const T zero = T(0.0f);
#pragma unroll
    for (int s = 0; s < DP / 16; ++s) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // columns 2t.. and 2t+8..
            int col = s * 16 + half * 8 + 2 * t;
#pragma unroll
            for (int r = 0; r < 2; ++r) {  // rows g and g+8
                int row = row0 + g + 8 * r;
                qa[s][half * 2 + r] = (row < n && col < d) ? pair(q + row * q_row + col)
                                                           : pair2(zero, zero);
            }
        }
    }
}

// The online-softmax step for one tile of scores (this warp's 16 rows × N keys, base 2): masks
// keys past m, raises the running row maximum, rescales the running sum, and leaves
// exp2(score − maximum) in `s` (the p of p·v) and in `rescale` the factor of each row's output
// accumulators (applied by `rescale_output`, at once or once they are no longer in flight). Rows
// g (elements 0, 1) and g+8 (elements 2, 3).
// FOLDED (FlashAttention-2's form, fewer instructions per score): the running maximum of the raw
// scores (row_max is then raw), the scale folded into one FFMA per score, 2^x by one MUFU.EX2,
// and the key mask only on a tile that reaches past m.
template <int N, bool FOLDED = false>
__device__ __forceinline__ void softmax_scores(float (&s)[N / 8][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&rescale)[2], int key0,
                                               int m, float scale_log2, int t) {
    float tile_max[2] = {-INFINITY, -INFINITY};
    const bool partial = key0 + N > m;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int key = key0 + j * 8 + 2 * t + (e & 1);
            if constexpr (FOLDED) {
                if (partial && key >= m)
                    s[j][e] = -INFINITY;
            } else {
                s[j][e] = key < m ? s[j][e] * scale_log2 : -INFINITY;
            }
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
        float new_max = fmaxf(row_max[r], tile_max[r]);
        // 0 on the first tile (-inf - finite)
        rescale[r] = FOLDED ? exp2f((row_max[r] - new_max) * scale_log2) : exp2f(row_max[r] - new_max);
        row_max[r] = new_max;
    }
    const float offset[2] = {FOLDED ? row_max[0] * scale_log2 : row_max[0],
                             FOLDED ? row_max[1] * scale_log2 : row_max[1]};
    float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[j][e] = FOLDED ? exp2_approx(fmaf(s[j][e], scale_log2, -offset[e >> 1]))
                             : exp2f(s[j][e] - offset[e >> 1]);
            tile_sum[e >> 1] += s[j][e];
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], 1);
        tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], 2);
        row_sum[r] = row_sum[r] * rescale[r] + tile_sum[r];
    }
}

template <int DP>
__device__ __forceinline__ void rescale_output(float (&acc)[DP / 8][4], const float (&rescale)[2]) {
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
        acc[j][0] *= rescale[0];
        acc[j][1] *= rescale[0];
        acc[j][2] *= rescale[1];
        acc[j][3] *= rescale[1];
    }
}

// Both: the step for kernels whose output accumulators are not in flight.
template <int DP, int N, bool FOLDED = false>
__device__ __forceinline__ void softmax_update(float (&s)[N / 8][4], float (&acc)[DP / 8][4],
                                               float (&row_max)[2], float (&row_sum)[2], int key0,
                                               int m, float scale_log2, int t) {
    float rescale[2];
    softmax_scores<N, FOLDED>(s, row_max, row_sum, rescale, key0, m, scale_log2, t);
    rescale_output<DP>(acc, rescale);
}

// Normalise and write rows g and g+8, columns 2t and 2t+1 of each n8 tile.
template <typename T, int DP>
__device__ __forceinline__ void store_output(T *o, const float (&acc)[DP / 8][4], const float (&row_sum)[2],
                                             int row0, int n, int d, long long o_row, int g, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = row0 + g + 8 * r;
        if (row >= n)
            continue;
        float inv = 1.0f / row_sum[r];
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) {
            int col = j * 8 + 2 * t;
            if (col < d) {
                *reinterpret_cast<uint32_t *>(o + row * o_row + col) =
                    Ops<T>::pack(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
            }
        }
    }
}
