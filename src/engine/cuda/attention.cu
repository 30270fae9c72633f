// Fused attention forward, softmax(q kᵀ · scale) v, for f16 and bf16 (f32 accumulation), no mask:
// the score matrix never leaves the chip (FlashAttention-2's online softmax; the algorithm from
// Dao 2023, written here for the head sizes the image models use).
//
// Layout: q (BH, N, D), k and v (BH, M, D), o (BH, N, D), contiguous, D = the real head size
// (a multiple of 8, ≤ DP). DP = D rounded up to 16 (the tensor-core k step); the padding columns
// are zero in shared memory and never written out.
//
// One block = 4 warps = 64 queries; each warp owns 16 query rows for the whole key loop. Per 64-key
// tile: the block stages k and v in shared memory, each warp computes its 16×64 scores with
// mma.m16n8k16 (f32 accumulators), updates the running row maximum and sum, rescales its output
// accumulators and adds p·v, p taken straight from the score registers (the accumulator layout of
// two n8 tiles is the A-operand layout of one k16 step).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK_M 64
#define BLOCK_N 64
#define WARPS 4

template <typename T> struct Ops;
template <> struct Ops<__half> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float *c, const uint32_t *a, const uint32_t *b) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <> struct Ops<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float *c, const uint32_t *a, const uint32_t *b) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

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

// Zero the padding columns [d, DP + 8) of `rows` shared rows of k and v once: the tile loads
// never write them.
template <typename T, int DP>
__device__ __forceinline__ void zero_padding(T *ks, T *vs, int rows, int d) {
    constexpr int STRIDE = DP + 8;
    for (int i = threadIdx.x; i < rows * (STRIDE - d); i += blockDim.x) {
        int r = i / (STRIDE - d), c = d + i % (STRIDE - d);
        ks[r * STRIDE + c] = T(0.0f);
        vs[r * STRIDE + c] = T(0.0f);
    }
}

// This warp's 16 query rows (from row0) as A fragments, one per 16-column step.
template <typename T, int DP>
__device__ __forceinline__ void load_queries(uint32_t (&qa)[DP / 16][4], const T *q, int row0, int n,
                                             int d, int g, int t) {
    const T zero = T(0.0f);
#pragma unroll
    for (int s = 0; s < DP / 16; ++s) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // columns 2t.. and 2t+8..
            int col = s * 16 + half * 8 + 2 * t;
#pragma unroll
            for (int r = 0; r < 2; ++r) {  // rows g and g+8
                int row = row0 + g + 8 * r;
                qa[s][half * 2 + r] = (row < n && col < d) ? pair(q + (size_t)row * d + col)
                                                           : pair2(zero, zero);
            }
        }
    }
}

// One 64-key tile (k and v rows in shared memory, row stride DP + 8) into this warp's running
// maximum, sum and output accumulators.
template <typename T, int DP>
__device__ __forceinline__ void attend_tile(const T *ks, const T *vs, const uint32_t (&qa)[DP / 16][4],
                                            float (&acc)[DP / 8][4], float (&row_max)[2],
                                            float (&row_sum)[2], int key0, int m, float scale_log2,
                                            int lane) {
    constexpr int STRIDE = DP + 8;
    const int g = lane >> 2, t = lane & 3;
    // Scores: 16 rows × 64 keys as 8 n8 tiles.
    float s[BLOCK_N / 8][4];
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int st = 0; st < DP / 16; ++st) {
            const T *kr = ks + (j * 8 + g) * STRIDE + st * 16 + 2 * t;
            uint32_t b[2] = {pair(kr), pair(kr + 8)};
            Ops<T>::mma(s[j], qa[st], b);
        }
    }
    // Online softmax in base 2; rows g (elements 0, 1) and g+8 (elements 2, 3).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int key = key0 + j * 8 + 2 * t + (e & 1);
            s[j][e] = key < m ? s[j][e] * scale_log2 : -INFINITY;
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
        }
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
        float new_max = fmaxf(row_max[r], tile_max[r]);
        rescale[r] = exp2f(row_max[r] - new_max);  // 0 on the first tile (-inf - finite)
        row_max[r] = new_max;
    }
    float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[j][e] = exp2f(s[j][e] - row_max[e >> 1]);
            tile_sum[e >> 1] += s[j][e];
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], 1);
        tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], 2);
        row_sum[r] = row_sum[r] * rescale[r] + tile_sum[r];
    }
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
        acc[j][0] *= rescale[0];
        acc[j][1] *= rescale[0];
        acc[j][2] *= rescale[1];
        acc[j][3] *= rescale[1];
    }
    // acc += p · v, one 16-key step at a time.
#pragma unroll
    for (int st = 0; st < BLOCK_N / 16; ++st) {
        uint32_t pa[4] = {
            Ops<T>::pack(s[2 * st][0], s[2 * st][1]),
            Ops<T>::pack(s[2 * st][2], s[2 * st][3]),
            Ops<T>::pack(s[2 * st + 1][0], s[2 * st + 1][1]),
            Ops<T>::pack(s[2 * st + 1][2], s[2 * st + 1][3]),
        };
        // B fragments of v for two n8 tiles at once: ldmatrix.x4.trans over the 8×8 blocks
        // (keys 0-7 | 8-15) × (columns of tile j | j+1); lane l gives the address of row l % 8
        // of block l / 8.
        const int block = lane >> 3;
        const T *vrow = vs + (st * 16 + (block & 1) * 8 + (lane & 7)) * STRIDE + (block >> 1) * 8;
#pragma unroll
        for (int j = 0; j < DP / 8; j += 2) {
            uint32_t b[4];
            uint32_t address = (uint32_t)__cvta_generic_to_shared(vrow + j * 8);
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                         : "r"(address));
            Ops<T>::mma(acc[j], pa, b);
            Ops<T>::mma(acc[j + 1], pa, b + 2);
        }
    }
}

// Normalise and write rows g and g+8, columns 2t and 2t+1 of each n8 tile.
template <typename T, int DP>
__device__ __forceinline__ void store_output(T *o, const float (&acc)[DP / 8][4], const float (&row_sum)[2],
                                             int row0, int n, int d, int g, int t) {
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
                *reinterpret_cast<uint32_t *>(o + (size_t)row * d + col) =
                    Ops<T>::pack(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
            }
        }
    }
}

template <typename T, int DP>
__device__ void flash_attention(const T *__restrict__ q, const T *__restrict__ k,
                                const T *__restrict__ v, T *__restrict__ o, int n, int m, int d,
                                float scale_log2) {
    constexpr int STRIDE = DP + 8;  // shared row stride (halves): spreads rows over the banks
    __shared__ __align__(16) T ks[BLOCK_N * STRIDE];
    __shared__ __align__(16) T vs[BLOCK_N * STRIDE];

    const int bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
    const int row0 = blockIdx.x * BLOCK_M + warp * 16;
    q += (size_t)bh * n * d;
    k += (size_t)bh * m * d;
    v += (size_t)bh * m * d;
    o += (size_t)bh * n * d;

    zero_padding<T, DP>(ks, vs, BLOCK_N, d);
    uint32_t qa[DP / 16][4];
    load_queries<T, DP>(qa, q, row0, n, d, g, t);

    float acc[DP / 8][4];
#pragma unroll
    for (int j = 0; j < DP / 8; ++j)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};

    const int chunks = d / 8;  // 16-byte pieces per row
    for (int key0 = 0; key0 < m; key0 += BLOCK_N) {
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < BLOCK_N * chunks; i += blockDim.x) {
            int r = i / chunks, c = (i % chunks) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key0 + r < m) {
                kv = *reinterpret_cast<const uint4 *>(k + (size_t)(key0 + r) * d + c);
                vv = *reinterpret_cast<const uint4 *>(v + (size_t)(key0 + r) * d + c);
            }
            *reinterpret_cast<uint4 *>(ks + r * STRIDE + c) = kv;
            *reinterpret_cast<uint4 *>(vs + r * STRIDE + c) = vv;
        }
        __syncthreads();
        attend_tile<T, DP>(ks, vs, qa, acc, row_max, row_sum, key0, m, scale_log2, lane);
    }
    store_output<T, DP>(o, acc, row_sum, row0, n, d, g, t);
}

// 16 bytes global → shared without passing through registers; `bytes` < 16 zero-fills the rest
// (0 for the rows past the last key).
__device__ __forceinline__ void copy16_async(void *shared, const void *global, int bytes) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
}

// The same attention with the next k/v tile loaded (cp.async, two shared-memory stages) while the
// current one is computed; in `flash_attention` every tile's loads wait for the previous tile's
// compute and the other way round. Dynamic shared memory: 4 · 64 · (DP + 8) elements.
template <typename T, int DP>
__device__ void flash_attention_pipelined(const T *__restrict__ q, const T *__restrict__ k,
                                          const T *__restrict__ v, T *__restrict__ o, int n, int m,
                                          int d, float scale_log2) {
    constexpr int STRIDE = DP + 8;
    constexpr int TILE = BLOCK_N * STRIDE;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T *ks = reinterpret_cast<T *>(shared_bytes);  // stages 0 and 1 of k, then of v
    T *vs = ks + 2 * TILE;

    const int bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * BLOCK_M + warp * 16;
    q += (size_t)bh * n * d;
    k += (size_t)bh * m * d;
    v += (size_t)bh * m * d;
    o += (size_t)bh * n * d;

    zero_padding<T, DP>(ks, vs, 2 * BLOCK_N, d);  // both stages
    uint32_t qa[DP / 16][4];
    load_queries<T, DP>(qa, q, row0, n, d, g, t);

    float acc[DP / 8][4];
#pragma unroll
    for (int j = 0; j < DP / 8; ++j)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};

    const int chunks = d / 8;
    const int tiles = (m + BLOCK_N - 1) / BLOCK_N;
    auto prefetch = [&](int tile) {
        const int key0 = tile * BLOCK_N;
        T *kd = ks + (tile & 1) * TILE;
        T *vd = vs + (tile & 1) * TILE;
        for (int i = threadIdx.x; i < BLOCK_N * chunks; i += blockDim.x) {
            int r = i / chunks, c = (i % chunks) * 8;
            bool inside = key0 + r < m;
            size_t from = (size_t)(inside ? key0 + r : 0) * d + c;  // a valid address either way
            copy16_async(kd + r * STRIDE + c, k + from, inside ? 16 : 0);
            copy16_async(vd + r * STRIDE + c, v + from, inside ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    prefetch(0);
    for (int tile = 0; tile < tiles; ++tile) {
        if (tile + 1 < tiles) {
            // The stage it fills was last read by tile − 1, which every warp has finished
            // (the barrier at the end of the previous iteration).
            prefetch(tile + 1);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();  // this tile's copies (every thread's) are visible
        attend_tile<T, DP>(ks + (tile & 1) * TILE, vs + (tile & 1) * TILE, qa, acc, row_max, row_sum,
                           tile * BLOCK_N, m, scale_log2, lane);
        __syncthreads();  // this stage is free for tile + 2
    }
    store_output<T, DP>(o, acc, row_sum, row0, n, d, g, t);
}

#define FLASH_PIPELINED(NAME, T, DP)                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                   \
        NAME(const T *q, const T *k, const T *v, T *o, int n, int m, int d, float scale_log2) { \
        flash_attention_pipelined<T, DP>(q, k, v, o, n, m, d, scale_log2);                     \
    }


#define FLASH(NAME, T, DP)                                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                   \
        NAME(const T *q, const T *k, const T *v, T *o, int n, int m, int d, float scale_log2) { \
        flash_attention<T, DP>(q, k, v, o, n, m, d, scale_log2);                               \
    }

// Every head size (padded to 16) for f16 and bf16: flash_attention_{f16,bf16}_DP and
// flash_attention_pipelined_{f16,bf16}_DP.
#define EACH_HEAD_SIZE(MAKE, PREFIX, SUFFIX, T) \
    MAKE(PREFIX##SUFFIX##_16, T, 16)             \
    MAKE(PREFIX##SUFFIX##_32, T, 32)             \
    MAKE(PREFIX##SUFFIX##_48, T, 48)             \
    MAKE(PREFIX##SUFFIX##_64, T, 64)             \
    MAKE(PREFIX##SUFFIX##_80, T, 80)             \
    MAKE(PREFIX##SUFFIX##_96, T, 96)             \
    MAKE(PREFIX##SUFFIX##_128, T, 128)           \
    MAKE(PREFIX##SUFFIX##_160, T, 160)

EACH_HEAD_SIZE(FLASH, flash_attention_, f16, __half)
EACH_HEAD_SIZE(FLASH, flash_attention_, bf16, __nv_bfloat16)
EACH_HEAD_SIZE(FLASH_PIPELINED, flash_attention_pipelined_, f16, __half)
EACH_HEAD_SIZE(FLASH_PIPELINED, flash_attention_pipelined_, bf16, __nv_bfloat16)
