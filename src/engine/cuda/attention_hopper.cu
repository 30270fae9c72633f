// Fused attention for Hopper (compute capability 9.0: H100, H200), the same computation and
// interface as attention.cu's kernels — softmax(q kᵀ · scale) v, f16/bf16 operands, f32
// accumulation, strided q/k/v, token-major output — with the two matrix products on the
// warpgroup tensor-core instructions (wgmma.mma_async) that Hopper runs at about twice the rate of
// mma.sync. Built for compute_90a only (build.rs); the engine picks it for head sizes 64 and 128.
//
// One warpgroup (4 warps, 128 threads) = 64 queries; a block has GROUPS of them (1 or 2) sharing
// the k/v tiles. Warp w owns query rows 16w..16w+15 of the block for the whole key loop, its q
// fragments in registers (wgmma's register A operand has the per-warp layout of mma.m16n8k16's A).
// Per tile of KEYS keys (64 for head size 128, 128 for 64: 16 KiB of k and 16 KiB of v):
//   s = q kᵀ    wgmma m64nKEYSk16, A = q from registers, B = k from shared memory (K-major),
//   online softmax on s in registers (attention_common.cuh, as the other kernels),
//   o += p v    wgmma m64nDk16, A = p from registers (the accumulator layout of s is the A layout),
//               B = v from shared memory read N-major (the instruction transposes it).
// k and v tiles are copied with cp.async into stages (the next tile lands while this one is
// computed) in the 128-byte-swizzled layout wgmma reads: a tile is D/64 column blocks of KEYS
// rows × 128 bytes, the 16-byte chunk c of row r stored at chunk c ^ (r % 8), every block on a
// 1024-byte boundary (the swizzle pattern's period: descriptor base offset 0).
//
// Two arrangements, both candidates until a GPU has timed them:
//   hopper      one warpgroup per block, each product waited for; two stages (65 KiB), 2-3 blocks
//               per SM (170 registers at head size 128, 168 at 64): while one block runs its
//               softmax the tensor cores serve another's products.
//   hopper128   two warpgroups per block (half the k/v traffic from L2 per query), one block per
//               SM (170 registers), and FlashAttention-3's intra-warpgroup pipelining: the
//               softmax of tile j runs while p·v of tile j − 1 is in flight; three stages (97 KiB).
// ptxas reports "wgmma ... serialized due to insufficient register resources" (C7512) when
// registers are short (tried: three blocks per SM at head size 128): check `-Xptxas -v` for it
// after any change.
//
// Device-only primitives sit in `#ifndef CANDELA_EMULATE`: tests/cuda_emulator/emulate.h computes
// wgmma lane by lane from the PTX ISA's fragment and canonical shared-memory layouts, so CI runs
// this kernel on the CPU too.
#include "attention_common.cuh"

#define HOPPER_QUERIES 64  // per warpgroup

#ifndef CANDELA_EMULATE
// The async proxy (wgmma's shared-memory reads) sees what the generic proxy (cp.async) wrote.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Orders this thread's register accesses before the wgmma that follow (required before a wgmma
// reads registers written by ordinary instructions).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of an asynchronous wgmma's accumulator across the
// points where it is issued and waited for.
__device__ __forceinline__ void pin(float &x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pin(uint32_t &x) { asm volatile("" : "+r"(x)::"memory"); }

__device__ __forceinline__ uint32_t shared_address(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

#define WGMMA_M64N64K16(f, a, b, accumulate, PTX_TYPE, TRANS_B)                                                            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %36, 0;\n"                                                              \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " {"                                  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                       \
                 "{%32, %33, %34, %35}, %37, p, 1, 1, " TRANS_B ";\n}\n"                                                   \
                 : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3]), "+f"(f[4]), "+f"(f[5]), "+f"(f[6]), "+f"(f[7]),         \
                   "+f"(f[8]), "+f"(f[9]), "+f"(f[10]), "+f"(f[11]), "+f"(f[12]), "+f"(f[13]), "+f"(f[14]), "+f"(f[15]),   \
                   "+f"(f[16]), "+f"(f[17]), "+f"(f[18]), "+f"(f[19]), "+f"(f[20]), "+f"(f[21]), "+f"(f[22]), "+f"(f[23]), \
                   "+f"(f[24]), "+f"(f[25]), "+f"(f[26]), "+f"(f[27]), "+f"(f[28]), "+f"(f[29]), "+f"(f[30]), "+f"(f[31])  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(accumulate), "l"(b))

#define WGMMA_M64N128K16(f, a, b, accumulate, PTX_TYPE, TRANS_B)                                                           \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %68, 0;\n"                                                              \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {"                                 \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                       \
                 "{%64, %65, %66, %67}, %69, p, 1, 1, " TRANS_B ";\n}\n"                                                   \
                 : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3]), "+f"(f[4]), "+f"(f[5]), "+f"(f[6]), "+f"(f[7]),         \
                   "+f"(f[8]), "+f"(f[9]), "+f"(f[10]), "+f"(f[11]), "+f"(f[12]), "+f"(f[13]), "+f"(f[14]), "+f"(f[15]),   \
                   "+f"(f[16]), "+f"(f[17]), "+f"(f[18]), "+f"(f[19]), "+f"(f[20]), "+f"(f[21]), "+f"(f[22]), "+f"(f[23]), \
                   "+f"(f[24]), "+f"(f[25]), "+f"(f[26]), "+f"(f[27]), "+f"(f[28]), "+f"(f[29]), "+f"(f[30]), "+f"(f[31]), \
                   "+f"(f[32]), "+f"(f[33]), "+f"(f[34]), "+f"(f[35]), "+f"(f[36]), "+f"(f[37]), "+f"(f[38]), "+f"(f[39]), \
                   "+f"(f[40]), "+f"(f[41]), "+f"(f[42]), "+f"(f[43]), "+f"(f[44]), "+f"(f[45]), "+f"(f[46]), "+f"(f[47]), \
                   "+f"(f[48]), "+f"(f[49]), "+f"(f[50]), "+f"(f[51]), "+f"(f[52]), "+f"(f[53]), "+f"(f[54]), "+f"(f[55]), \
                   "+f"(f[56]), "+f"(f[57]), "+f"(f[58]), "+f"(f[59]), "+f"(f[60]), "+f"(f[61]), "+f"(f[62]), "+f"(f[63])  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(accumulate), "l"(b))

// d (the warpgroup's 64 × N f32 accumulator; this thread's N/2 values as N/8 fragments of four)
// += a · b, or = a · b when `accumulate` is 0; a = this warp's 16 rows × 16 of k in registers,
// b = 16 × N in shared memory through a matrix descriptor, K-major (TRANS_B 0) or N-major (1).
template <typename T> struct Wgmma;
#define WGMMA_OPS(T, PTX_TYPE)                                                                     \
    template <> struct Wgmma<T> {                                                                  \
        template <int N, int TRANS_B>                                                              \
        static __device__ __forceinline__ void mma(float (&d)[N / 8][4], const uint32_t (&a)[4],  \
                                                   uint64_t b, int accumulate) {                   \
            float *f = &d[0][0];                                                                   \
            static_assert(N == 64 || N == 128, "wgmma shapes n64 and n128");                       \
            if constexpr (N == 64) {                                                               \
                if constexpr (TRANS_B) WGMMA_M64N64K16(f, a, b, accumulate, PTX_TYPE, "1");        \
                else WGMMA_M64N64K16(f, a, b, accumulate, PTX_TYPE, "0");                          \
            } else {                                                                               \
                if constexpr (TRANS_B) WGMMA_M64N128K16(f, a, b, accumulate, PTX_TYPE, "1");       \
                else WGMMA_M64N128K16(f, a, b, accumulate, PTX_TYPE, "0");                         \
            }                                                                                      \
        }                                                                                          \
    };
WGMMA_OPS(__half, "f16")
WGMMA_OPS(__nv_bfloat16, "bf16")
#endif  // CANDELA_EMULATE

// Pins a fragment array: accumulators in flight, or A operands (p) a wgmma in flight reads.
template <typename R, int N>
__device__ __forceinline__ void pin_all(R (&d)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            pin(d[j][e]);
}

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format") of a 128-byte-swizzled
// operand at shared address `start`: the leading and stride byte offsets of its canonical layout,
// each encoded >> 4; swizzle mode 1 (128 bytes) in bits 62-63; base offset 0.
__device__ __forceinline__ uint64_t descriptor(uint32_t start, uint32_t leading, uint32_t stride) {
    return (uint64_t)((start & 0x3FFFF) >> 4) | (uint64_t)((leading & 0x3FFFF) >> 4) << 16 |
           (uint64_t)((stride & 0x3FFFF) >> 4) << 32 | 1ull << 62;
}

// Keys per tile: 16 KiB of k and 16 of v.
template <int D>
struct HopperTile {
    static constexpr int KEYS = 8192 / D;
};

// Issues s = q kᵀ for one tile (k at shared address `k_tile`): one k16 step per 16 columns of
// the head, 32 bytes further into the 128-byte rows, the next 64-column block after four.
template <typename T, int D, int KEYS>
__device__ __forceinline__ void issue_scores(float (&s)[KEYS / 8][4], const uint32_t (&qa)[D / 16][4],
                                             uint32_t k_tile) {
#pragma unroll
    for (int st = 0; st < D / 16; ++st) {
        const uint64_t b = descriptor(k_tile + (st / 4) * KEYS * 128 + (st % 4) * 32, 16, 1024);
        Wgmma<T>::template mma<KEYS, 0>(s, qa[st], b, st > 0);
    }
}

// Issues acc += p v for one tile (v at shared address `v_tile`): one k16 step per 16 keys (two
// groups of 8 rows of 128 bytes); the head's 64-column blocks are the leading-dimension steps.
template <typename T, int D, int KEYS>
__device__ __forceinline__ void issue_values(float (&acc)[D / 8][4], const uint32_t (&pa)[KEYS / 16][4],
                                             uint32_t v_tile) {
#pragma unroll
    for (int st = 0; st < KEYS / 16; ++st)
        Wgmma<T>::template mma<D, 1>(acc, pa[st], descriptor(v_tile + st * 2048, KEYS * 128, 1024), 1);
}

// The probabilities as A fragments of p·v: the accumulator layout of two n8 column groups is the
// A layout of one k16 step.
template <typename T, int KEYS>
__device__ __forceinline__ void pack_probabilities(uint32_t (&pa)[KEYS / 16][4], const float (&s)[KEYS / 8][4]) {
#pragma unroll
    for (int st = 0; st < KEYS / 16; ++st) {
        pa[st][0] = Ops<T>::pack(s[2 * st][0], s[2 * st][1]);
        pa[st][1] = Ops<T>::pack(s[2 * st][2], s[2 * st][3]);
        pa[st][2] = Ops<T>::pack(s[2 * st + 1][0], s[2 * st + 1][1]);
        pa[st][3] = Ops<T>::pack(s[2 * st + 1][2], s[2 * st + 1][3]);
    }
}

// GROUPS warpgroups per block. OVERLAP: FlashAttention-3's intra-warpgroup pipelining — the
// scores of tile j and p·v of tile j − 1 are issued together, the softmax of tile j runs while
// p·v is in flight, and the output is rescaled once it lands; three stages of tiles then (v of
// j − 1, k and v of j, and j + 1 arriving). Otherwise each product is waited for in turn, two
// stages.
template <typename T, int D, int KEYS, int GROUPS, bool OVERLAP>
__device__ void flash_attention_hopper(const T *__restrict__ q, const T *__restrict__ k,
                                       const T *__restrict__ v, T *__restrict__ o, int n, int m,
                                       int d, Layouts L, float scale_log2) {
    static_assert(KEYS == 64 || KEYS == 128, "wgmma n64 or n128 score tiles");
    constexpr int TILE_BYTES = KEYS * D * 2;
    constexpr int CHUNKS = D / 8;  // 16-byte pieces per row
    constexpr int STAGES = OVERLAP ? 3 : 2;
    DYNAMIC_SHARED(shared_bytes);
    // Tiles on 1024-byte boundaries (the launch adds 1 KiB for this): stage s holds k at
    // 2 s TILE_BYTES and v right after it.
    const uint32_t raw = shared_address(shared_bytes);
    const uint32_t pad = (1024 - (raw & 1023)) & 1023;
    unsigned char *tiles = shared_bytes + pad;
    const uint32_t tiles_address = raw + pad;
    auto k_tile = [&](int tile) { return tiles_address + (tile % STAGES) * 2 * TILE_BYTES; };
    auto v_tile = [&](int tile) { return k_tile(tile) + TILE_BYTES; };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * HOPPER_QUERIES * GROUPS + warp * 16;
    to_head(q, k, v, o, L);

    uint32_t qa[D / 16][4];
    load_queries<T, D>(qa, q, row0, n, d, L.q.row, g, t);
    float acc[D / 8][4], row_max[2], row_sum[2];
    start_rows<D>(acc, row_max, row_sum);

    const int tiles_count = (m + KEYS - 1) / KEYS;
    // Copies a tile into its stage (chunk c of row r at chunk c ^ r % 8 of the row's 128 bytes).
    auto prefetch = [&](int tile) {
        unsigned char *ks = tiles + (tile % STAGES) * 2 * TILE_BYTES;
        unsigned char *vs = ks + TILE_BYTES;
        const int key0 = tile * KEYS;
        for (int i = threadIdx.x; i < KEYS * CHUNKS; i += blockDim.x) {
            const int r = i / CHUNKS, c = i % CHUNKS;
            const bool inside = key0 + r < m;
            const long long key = inside ? key0 + r : 0;  // a valid address either way
            const int at = (c / 8) * KEYS * 128 + r * 128 + ((c % 8) ^ (r % 8)) * 16;
            copy16_async(ks + at, k + key * L.k.row + c * 8, inside ? 16 : 0);
            copy16_async(vs + at, v + key * L.v.row + c * 8, inside ? 16 : 0);
        }
        cp_async_commit();
    };
    // Waits for `tile`'s copies, after starting the next tile's (into a stage every warp is done
    // with: the barrier ending the previous iteration).
    auto arrive = [&](int tile) {
        if (tile + 1 < tiles_count) {
            prefetch(tile + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_async_shared();
        __syncthreads();  // the tile's copies (every thread's) are visible to wgmma
    };

    float s[KEYS / 8][4];
    uint32_t pa[KEYS / 16][4];
    prefetch(0);
    if constexpr (!OVERLAP) {
        for (int tile = 0; tile < tiles_count; ++tile) {
            arrive(tile);
            wgmma_fence();
            issue_scores<T, D, KEYS>(s, qa, k_tile(tile));
            wgmma_commit();
            wgmma_wait<0>();
            pin_all(s);
            softmax_update<D, KEYS, true>(s, acc, row_max, row_sum, tile * KEYS, m, scale_log2, t);
            pack_probabilities<T, KEYS>(pa, s);
            pin_all(acc);
            wgmma_fence();
            issue_values<T, D, KEYS>(acc, pa, v_tile(tile));
            wgmma_commit();
            wgmma_wait<0>();
            pin_all(acc);
            pin_all(pa);
            __syncthreads();  // every warp is done with this stage
        }
    } else {
        arrive(0);
        wgmma_fence();
        issue_scores<T, D, KEYS>(s, qa, k_tile(0));
        wgmma_commit();
        wgmma_wait<0>();
        pin_all(s);
        softmax_update<D, KEYS, true>(s, acc, row_max, row_sum, 0, m, scale_log2, t);
        pack_probabilities<T, KEYS>(pa, s);
        for (int tile = 1; tile < tiles_count; ++tile) {
            // The stage tile + 1 fills held tile − 2, whose v the previous iteration finished.
            arrive(tile);
            pin_all(acc);
            wgmma_fence();
            issue_scores<T, D, KEYS>(s, qa, k_tile(tile));
            wgmma_commit();
            issue_values<T, D, KEYS>(acc, pa, v_tile(tile - 1));
            wgmma_commit();
            wgmma_wait<1>();  // the scores; p·v of tile − 1 still in flight
            pin_all(s);
            float rescale[2];
            softmax_scores<KEYS, true>(s, row_max, row_sum, rescale, tile * KEYS, m, scale_log2, t);
            wgmma_wait<0>();
            pin_all(acc);
            pin_all(pa);  // read by p·v until now
            rescale_output<D>(acc, rescale);
            pack_probabilities<T, KEYS>(pa, s);
            __syncthreads();  // every warp is done with tile − 1's stage
        }
        pin_all(acc);
        wgmma_fence();
        issue_values<T, D, KEYS>(acc, pa, v_tile(tiles_count - 1));
        wgmma_commit();
        wgmma_wait<0>();
        pin_all(acc);
        pin_all(pa);
    }
    store_output<T, D>(o, acc, row_sum, row0, n, d, L.o.row, g, t);
}

#define FLASH_HOPPER(NAME, T, D, KEYS, GROUPS, OVERLAP)                                        \
    extern "C" __global__ void __launch_bounds__(128 * GROUPS, GROUPS == 1 && D == 64 && !OVERLAP ? 3 : 1) \
        NAME(const T *q, const T *k, const T *v, T *o, int n, int m, int d, Layouts L,           \
             float scale_log2) {                                                               \
        flash_attention_hopper<T, D, KEYS, GROUPS, OVERLAP>(q, k, v, o, n, m, d, L, scale_log2); \
    }

// flash_attention_hopper_{f16,bf16}_{64,128}: one warpgroup per block, each product waited for;
// flash_attention_hopper128_{f16,bf16}_{64,128}: two warpgroups, softmax overlapping p·v.
// Both with 16 KiB tiles (128 keys at head size 64, 64 at 128).
#define HOPPER_KEYS(D) HopperTile<D>::KEYS
FLASH_HOPPER(flash_attention_hopper_f16_64, __half, 64, HOPPER_KEYS(64), 1, false)
FLASH_HOPPER(flash_attention_hopper_f16_128, __half, 128, HOPPER_KEYS(128), 1, false)
FLASH_HOPPER(flash_attention_hopper_bf16_64, __nv_bfloat16, 64, HOPPER_KEYS(64), 1, false)
FLASH_HOPPER(flash_attention_hopper_bf16_128, __nv_bfloat16, 128, HOPPER_KEYS(128), 1, false)
FLASH_HOPPER(flash_attention_hopper128_f16_64, __half, 64, HOPPER_KEYS(64), 2, true)
FLASH_HOPPER(flash_attention_hopper128_f16_128, __half, 128, HOPPER_KEYS(128), 2, true)
FLASH_HOPPER(flash_attention_hopper128_bf16_64, __nv_bfloat16, 64, HOPPER_KEYS(64), 2, true)
FLASH_HOPPER(flash_attention_hopper128_bf16_128, __nv_bfloat16, 128, HOPPER_KEYS(128), 2, true)
// Candidates after session 25's H200 traces (cuDNN's FLUX attention, 2.2× faster than `hopper`
// at head size 128, runs 64 queries × 128 keys per warpgroup; ours 64 × 64 there): 128-key
// tiles at both head sizes (32 KiB of k and 32 of v at 128), softmax overlapping p·v, three
// stages (193 KiB at 128: one block per SM).
// flash_attention_hopperk_*: one warpgroup per block; flash_attention_hopper128k_*: two.
FLASH_HOPPER(flash_attention_hopperk_f16_64, __half, 64, 128, 1, true)
FLASH_HOPPER(flash_attention_hopperk_f16_128, __half, 128, 128, 1, true)
FLASH_HOPPER(flash_attention_hopperk_bf16_64, __nv_bfloat16, 64, 128, 1, true)
FLASH_HOPPER(flash_attention_hopperk_bf16_128, __nv_bfloat16, 128, 128, 1, true)
FLASH_HOPPER(flash_attention_hopper128k_f16_64, __half, 64, 128, 2, true)
FLASH_HOPPER(flash_attention_hopper128k_f16_128, __half, 128, 128, 2, true)
FLASH_HOPPER(flash_attention_hopper128k_bf16_64, __nv_bfloat16, 64, 128, 2, true)
FLASH_HOPPER(flash_attention_hopper128k_bf16_128, __nv_bfloat16, 128, 128, 2, true)
