// Fused attention forward, softmax(q kᵀ · scale) v, for f16 and bf16 (f32 accumulation), no mask:
// the score matrix never leaves the chip (FlashAttention-2's online softmax; the algorithm from
// Dao 2023, written here for the head sizes the image models use).
//
// Layout: q (B, H, N, D), k and v (B, H, M, D) as any strided views whose rows are D contiguous
// values on 16-byte boundaries (`Layouts`: heads-first copies or the token-major output of a
// projection, read in place); o written token-major, (B, N, H, D), so that merging the heads is
// free. D = the real head size (a multiple of 8, ≤ DP). DP = D rounded up to 16 (the tensor-core
// k step); the padding columns are zero in shared memory and never written out.
//
// One block = 4 warps = 64 queries; each warp owns 16 query rows for the whole key loop. Per 64-key
// tile: the block stages k and v in shared memory, each warp computes its 16×64 scores with
// mma.m16n8k16 (f32 accumulators), updates the running row maximum and sum, rescales its output
// accumulators and adds p·v, p taken straight from the score registers (the accumulator layout of
// two n8 tiles is the A-operand layout of one k16 step).
//
// The device-only primitives (tensor-core mma, ldmatrix, cp.async and the half types) sit in
// `#ifndef CANDELA_EMULATE` sections: tests/cuda_emulator/ compiles this file as host C++ with
// emulated ones, so CI runs these kernels on the CPU against an exact attention.
#include "attention_common.cuh"

#define BLOCK_M 64
#define BLOCK_N 64
#define WARPS 4

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
    softmax_update<DP, BLOCK_N>(s, acc, row_max, row_sum, key0, m, scale_log2, t);
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
            ldmatrix_x4_trans(b, vrow + j * 8);
            Ops<T>::mma(acc[j], pa, b);
            Ops<T>::mma(acc[j + 1], pa, b + 2);
        }
    }
}

template <typename T, int DP>
__device__ void flash_attention(const T *__restrict__ q, const T *__restrict__ k,
                                const T *__restrict__ v, T *__restrict__ o, int n, int m, int d,
                                Layouts L, float scale_log2) {
    constexpr int STRIDE = DP + 8;  // shared row stride (halves): spreads rows over the banks
    __shared__ __align__(16) T ks[BLOCK_N * STRIDE];
    __shared__ __align__(16) T vs[BLOCK_N * STRIDE];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
    const int row0 = blockIdx.x * BLOCK_M + warp * 16;
    to_head(q, k, v, o, L);

    zero_padding<T, DP>(ks, vs, BLOCK_N, d);
    uint32_t qa[DP / 16][4];
    load_queries<T, DP>(qa, q, row0, n, d, L.q.row, g, t);

    float acc[DP / 8][4], row_max[2], row_sum[2];
    start_rows<DP>(acc, row_max, row_sum);

    const int chunks = d / 8;  // 16-byte pieces per row
    for (int key0 = 0; key0 < m; key0 += BLOCK_N) {
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < BLOCK_N * chunks; i += blockDim.x) {
            int r = i / chunks, c = (i % chunks) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key0 + r < m) {
                kv = *reinterpret_cast<const uint4 *>(k + (key0 + r) * L.k.row + c);
                vv = *reinterpret_cast<const uint4 *>(v + (key0 + r) * L.v.row + c);
            }
            *reinterpret_cast<uint4 *>(ks + r * STRIDE + c) = kv;
            *reinterpret_cast<uint4 *>(vs + r * STRIDE + c) = vv;
        }
        __syncthreads();
        attend_tile<T, DP>(ks, vs, qa, acc, row_max, row_sum, key0, m, scale_log2, lane);
    }
    store_output<T, DP>(o, acc, row_sum, row0, n, d, L.o.row, g, t);
}

// The same attention with the next k/v tile loaded (cp.async, two shared-memory stages) while the
// current one is computed; in `flash_attention` every tile's loads wait for the previous tile's
// compute and the other way round. Dynamic shared memory: 4 · 64 · (DP + 8) elements.
template <typename T, int DP>
__device__ void flash_attention_pipelined(const T *__restrict__ q, const T *__restrict__ k,
                                          const T *__restrict__ v, T *__restrict__ o, int n, int m,
                                          int d, Layouts L, float scale_log2) {
    constexpr int STRIDE = DP + 8;
    constexpr int TILE = BLOCK_N * STRIDE;
    DYNAMIC_SHARED(shared_bytes);
    T *ks = reinterpret_cast<T *>(shared_bytes);  // stages 0 and 1 of k, then of v
    T *vs = ks + 2 * TILE;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * BLOCK_M + warp * 16;
    to_head(q, k, v, o, L);

    zero_padding<T, DP>(ks, vs, 2 * BLOCK_N, d);  // both stages
    uint32_t qa[DP / 16][4];
    load_queries<T, DP>(qa, q, row0, n, d, L.q.row, g, t);

    float acc[DP / 8][4], row_max[2], row_sum[2];
    start_rows<DP>(acc, row_max, row_sum);

    const int chunks = d / 8;
    const int tiles = (m + BLOCK_N - 1) / BLOCK_N;
    auto prefetch = [&](int tile) {
        const int key0 = tile * BLOCK_N;
        T *kd = ks + (tile & 1) * TILE;
        T *vd = vs + (tile & 1) * TILE;
        for (int i = threadIdx.x; i < BLOCK_N * chunks; i += blockDim.x) {
            int r = i / chunks, c = (i % chunks) * 8;
            bool inside = key0 + r < m;
            long long key = inside ? key0 + r : 0;  // a valid address either way
            copy16_async(kd + r * STRIDE + c, k + key * L.k.row + c, inside ? 16 : 0);
            copy16_async(vd + r * STRIDE + c, v + key * L.v.row + c, inside ? 16 : 0);
        }
        cp_async_commit();
    };
    prefetch(0);
    for (int tile = 0; tile < tiles; ++tile) {
        if (tile + 1 < tiles) {
            // The stage it fills was last read by tile − 1, which every warp has finished
            // (the barrier at the end of the previous iteration).
            prefetch(tile + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this tile's copies (every thread's) are visible
        attend_tile<T, DP>(ks + (tile & 1) * TILE, vs + (tile & 1) * TILE, qa, acc, row_max, row_sum,
                           tile * BLOCK_N, m, scale_log2, lane);
        __syncthreads();  // this stage is free for tile + 2
    }
    store_output<T, DP>(o, acc, row_sum, row0, n, d, L.o.row, g, t);
}

// The FlashAttention-2 arrangement, candidate for the models: 128 queries per block, each warp
// owning 32 rows (two m16 tiles), so every k and v fragment read from shared memory feeds two
// mma instead of one; q staged in shared memory and read with ldmatrix per 16-column step (two
// m16 tiles of q fragments would not fit in registers beside the accumulators); k read with
// ldmatrix too. Loads overlap compute as in FlashAttention-2: the next tile's k is copied
// (cp.async) while p·v runs, the current tile's v while the scores and softmax run.
// Dynamic shared memory: (WIDE_M + 2 N) rows of DP + 8 elements; N = 64 keys per tile, 32 from
// head size 160 (registers).
#define WIDE_M 128

template <typename T, int STRIDE>
__device__ __forceinline__ void copy_rows_async(T *shared, const T *global, int row0, int rows,
                                                int total, int d, long long row_stride) {
    const int chunks = d / 8;
    for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
        int r = i / chunks, c = (i % chunks) * 8;
        bool inside = row0 + r < total;
        long long from = (inside ? row0 + r : 0) * row_stride + c;  // a valid address either way
        copy16_async(shared + r * STRIDE + c, global + from, inside ? 16 : 0);
    }
    cp_async_commit();
}

template <typename T, int DP, int N>
__device__ void flash_attention_wide(const T *__restrict__ q, const T *__restrict__ k,
                                     const T *__restrict__ v, T *__restrict__ o, int n, int m,
                                     int d, Layouts L, float scale_log2) {
    constexpr int STRIDE = DP + 8;
    constexpr int MT = 2;  // m16 tiles per warp
    DYNAMIC_SHARED(shared_bytes);
    T *qs = reinterpret_cast<T *>(shared_bytes);  // WIDE_M rows, then N of k, then N of v
    T *ks = qs + WIDE_M * STRIDE;
    T *vs = ks + N * STRIDE;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * WIDE_M;
    to_head(q, k, v, o, L);

    // Padding columns of q, k and v (contiguous rows) are zero; the copies never write them.
    for (int i = threadIdx.x; i < (WIDE_M + 2 * N) * (STRIDE - d); i += blockDim.x) {
        int r = i / (STRIDE - d), c = d + i % (STRIDE - d);
        qs[r * STRIDE + c] = T(0.0f);
    }
    copy_rows_async<T, STRIDE>(qs, q, q0, WIDE_M, n, d, L.q.row);  // group: q
    copy_rows_async<T, STRIDE>(ks, k, 0, N, m, d, L.k.row);        // group: k of tile 0
    copy_rows_async<T, STRIDE>(vs, v, 0, N, m, d, L.v.row);        // group: v of tile 0

    float acc[MT][DP / 8][4];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        start_rows<DP>(acc[mt], row_max[mt], row_sum[mt]);
    // ldmatrix addresses of this lane. q (A operand, row-major): rows lane % 16, column half
    // lane / 16. k (B operand, its rows are the keys): keys (lane / 16) · 8 + lane % 8, column
    // half (lane / 8) % 2 — registers 0, 1 for key tile j and 2, 3 for tile j + 1. v (B operand
    // through .trans): keys (lane / 8) % 2 · 8 + lane % 8, column block lane / 16.
    const T *q_lane = qs + (warp * 16 * MT + (lane & 15)) * STRIDE + (lane >> 4) * 8;
    const T *k_lane = ks + ((lane >> 4) * 8 + (lane & 7)) * STRIDE + ((lane >> 3) & 1) * 8;
    const T *v_lane = vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * STRIDE + (lane >> 4) * 8;

    const int tiles = (m + N - 1) / N;
    for (int tile = 0; tile < tiles; ++tile) {
        const int key0 = tile * N;
        cp_async_wait<1>();  // q and this tile's k (v may be in flight)
        __syncthreads();
        float s[MT][N / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < N / 8; ++j)
                s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
        for (int st = 0; st < DP / 16; ++st) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(qa[mt], q_lane + mt * 16 * STRIDE + st * 16);
#pragma unroll
            for (int j = 0; j < N / 8; j += 2) {
                uint32_t kb[4];
                ldmatrix_x4(kb, k_lane + j * 8 * STRIDE + st * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Ops<T>::mma(s[mt][j], qa[mt], kb);
                    Ops<T>::mma(s[mt][j + 1], qa[mt], kb + 2);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            softmax_update<DP, N>(s[mt], acc[mt], row_max[mt], row_sum[mt], key0, m, scale_log2, t);

        cp_async_wait<0>();  // this tile's v
        __syncthreads();  // ... visible to all, and every warp is done with this tile's k
        if (tile + 1 < tiles)
            copy_rows_async<T, STRIDE>(ks, k, key0 + N, N, m, d, L.k.row);
#pragma unroll
        for (int st = 0; st < N / 16; ++st) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = Ops<T>::pack(s[mt][2 * st][0], s[mt][2 * st][1]);
                pa[mt][1] = Ops<T>::pack(s[mt][2 * st][2], s[mt][2 * st][3]);
                pa[mt][2] = Ops<T>::pack(s[mt][2 * st + 1][0], s[mt][2 * st + 1][1]);
                pa[mt][3] = Ops<T>::pack(s[mt][2 * st + 1][2], s[mt][2 * st + 1][3]);
            }
#pragma unroll
            for (int j = 0; j < DP / 8; j += 2) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, v_lane + st * 16 * STRIDE + j * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Ops<T>::mma(acc[mt][j], pa[mt], vb);
                    Ops<T>::mma(acc[mt][j + 1], pa[mt], vb + 2);
                }
            }
        }
        __syncthreads();  // every warp is done with this tile's v
        if (tile + 1 < tiles)
            copy_rows_async<T, STRIDE>(vs, v, key0 + N, N, m, d, L.v.row);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        store_output<T, DP>(o, acc[mt], row_sum[mt], q0 + warp * 16 * MT + mt * 16, n, d, L.o.row, g, t);
}

#define FLASH_WIDE(NAME, T, DP)                                                                \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                   \
        NAME(const T *q, const T *k, const T *v, T *o, int n, int m, int d, Layouts L,           \
             float scale_log2) {                                                               \
        flash_attention_wide<T, DP, (DP <= 128 ? 64 : 32)>(q, k, v, o, n, m, d, L, scale_log2); \
    }

#define FLASH_PIPELINED(NAME, T, DP)                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                   \
        NAME(const T *q, const T *k, const T *v, T *o, int n, int m, int d, Layouts L,           \
             float scale_log2) {                                                               \
        flash_attention_pipelined<T, DP>(q, k, v, o, n, m, d, L, scale_log2);                  \
    }


#define FLASH(NAME, T, DP)                                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                   \
        NAME(const T *q, const T *k, const T *v, T *o, int n, int m, int d, Layouts L,           \
             float scale_log2) {                                                               \
        flash_attention<T, DP>(q, k, v, o, n, m, d, L, scale_log2);                            \
    }

// Every head size (padded to 16) for f16 and bf16: flash_attention_{f16,bf16}_DP,
// flash_attention_pipelined_{f16,bf16}_DP and flash_attention_wide_{f16,bf16}_DP.
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
EACH_HEAD_SIZE(FLASH_WIDE, flash_attention_wide_, f16, __half)
EACH_HEAD_SIZE(FLASH_WIDE, flash_attention_wide_, bf16, __nv_bfloat16)
