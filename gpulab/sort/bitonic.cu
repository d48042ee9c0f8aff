// Bitonic sorts of unsigned keys (uint32 / uint64), optionally with uint32 values (the input
// index: argsort), for any n: positions >= n are virtual padding with the maximal key (and the
// value PAD_BIT | position: above every index, n < 2^31, also where a chunk's indices start at an
// offset).
//
// The network (see schedule.py): stage m merges sorted runs of 2^(m-1) keys; its first step
// pairs i with i ^ (2^m - 1) (the "flip"), the rest pair i with i ^ 2^b; every comparator puts
// the smaller (key, value) at the lower index, so padding never moves and is never stored.
// A step fuses fp strides: a thread loads the 2^fp keys of one group into registers, runs the
// fp strides there (`network`) and stores them back.
//
// Kernels (extern "C", instantiated at the bottom; the host walks schedule.schedule()):
//   bitonic_to_key_{32,64}    input bits -> order-preserving unsigned keys (+ values = base + index)
//   bitonic_from_key_{32,64}  keys -> output bits (in place)
//   bitonic_widen_values      uint32 values -> the int64 permutation (SortPlan's graphs)
//   bitonic_pass_k{32,64}_kv{0,1}_f{F}        one fused step over global memory
//   bitonic_tile_k{32,64}_kv{0,1}_t{T}_f{F}[_c] mode 0: sort a 2^T-key tile in shared memory
//                                              (stages 1..arg); mode 1: strides < 2^T of a merge.
//                                              io bit 1: load input bits from `src` through to_key
//                                              (values base + index); io bit 2: store output bits
//                                              to `dst` through from_key (a sort's first and last
//                                              launch: the key transforms cost no pass of their own)
// The pipelined host sort (schedule.split_schedule) also runs them on aligned chunks: pointers into
// the arrays with the chunk's own n, the values starting at the chunk's offset (`base`).
// Compiled by NVRTC through cupy.RawModule on the GPU, by nvcc -cubin in the tests.

typedef unsigned int u32;
typedef unsigned long long u64;

#define PAD_BIT 0x80000000u  // set in the value of a padding key (schedule.PAD_BIT)

__device__ __forceinline__ u32 key_max(u32) { return 0xFFFFFFFFu; }
__device__ __forceinline__ u64 key_max(u64) { return 0xFFFFFFFFFFFFFFFFull; }

// dtype codes: 0 uint32, 1 int32, 2 float32, 3 int64 (keys.DTYPE_CODE)
__device__ __forceinline__ u32 to_key(u32 b, int code, int desc) {
    u32 k = b;
    if (code == 1) {
        k = b ^ 0x80000000u;
    } else if (code == 2) {
        if ((b & 0x7FFFFFFFu) > 0x7F800000u) k = 0xFFFFFFFFu;        // NaN last
        else if (b == 0x80000000u) k = 0x80000000u;                   // -0.0 == +0.0
        else k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    }
    return desc ? ~k : k;
}
__device__ __forceinline__ u64 to_key(u64 b, int code, int desc) {
    u64 k = (code == 3) ? (b ^ 0x8000000000000000ull) : b;
    return desc ? ~k : k;
}
__device__ __forceinline__ u32 from_key(u32 k, int code, int desc) {
    if (desc) k = ~k;
    if (code == 1) return k ^ 0x80000000u;
    if (code == 2) return (k & 0x80000000u) ? (k ^ 0x80000000u) : ~k;
    return k;
}
__device__ __forceinline__ u64 from_key(u64 k, int code, int desc) {
    if (desc) k = ~k;
    return (code == 3) ? (k ^ 0x8000000000000000ull) : k;
}

template <typename K, bool KV>
__device__ __forceinline__ void cmpswap(K& ka, u32& va, K& kb, u32& vb) {
    if (KV) {
        const bool sw = (kb < ka) || (kb == ka && vb < va);
        const K k0 = sw ? kb : ka, k1 = sw ? ka : kb;
        const u32 v0 = sw ? vb : va, v1 = sw ? va : vb;
        ka = k0; kb = k1; va = v0; vb = v1;
    } else {
        const K lo = min(ka, kb), hi = max(ka, kb);
        ka = lo; kb = hi;
    }
}

// Index of key h (0 <= h < 2^fp) of group `rest`: the fp bits p_lo.. hold h; in a flip step the
// upper half of the group has its bits below p_lo complemented.
__device__ __forceinline__ u32 group_index(u32 rest, u32 h, int p_lo, int fp, bool flip) {
    const u32 low = (1u << p_lo) - 1u;
    u32 i = ((rest >> p_lo) << (p_lo + fp)) | (h << p_lo) | (rest & low);
    if (flip && ((h >> (fp - 1)) & 1u)) i ^= low;
    return i;
}

// The fp strides of one step on 2^F registers (2^(F-fp) independent groups of 2^fp keys).
template <typename K, bool KV, int F>
__device__ __forceinline__ void network(K (&k)[1 << F], u32 (&v)[1 << F], int fp, bool flip) {
#pragma unroll
    for (int b = F - 1; b >= 0; --b) {
        if (b >= fp) continue;
        const bool fl = flip && (b == fp - 1);
#pragma unroll
        for (int e = 0; e < (1 << F); ++e) {
            if (e & (1 << b)) continue;
            if (fl) {
                const int p = e ^ ((2 << b) - 1);
                cmpswap<K, KV>(k[e], v[e], k[p], v[p]);
            } else {
                const int p = e | (1 << b);
                cmpswap<K, KV>(k[e], v[e], k[p], v[p]);
            }
        }
    }
}

template <typename In, typename K>
__device__ __forceinline__ void to_key_body(const In* in, K* keys, u32* vals, u32 n, int code, int desc, int kv,
                                            u32 base) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        keys[i] = to_key((K)in[i], code, desc);
        if (kv) vals[i] = base + i;
    }
}
template <typename K>
__device__ __forceinline__ void from_key_body(const K* keys, K* out, u32 n, int code, int desc) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = from_key(keys[i], code, desc);
}

// One fused step (strides 2^p_hi .. 2^(p_hi-F+1)) over global memory; thread = group.
template <typename K, bool KV, int F>
__device__ __forceinline__ void pass_body(K* __restrict__ keys, u32* __restrict__ vals, u32 n, int p_hi, int flip) {
    constexpr int R = 1 << F;
    const int p_lo = p_hi - F + 1;
    const u32 rest = blockIdx.x * blockDim.x + threadIdx.x;
    if (group_index(rest, 0, p_lo, F, false) >= n) return;  // the group's lowest index
    K k[R];
    u32 v[R];
    u32 idx[R];
#pragma unroll
    for (int e = 0; e < R; ++e) {
        idx[e] = group_index(rest, (u32)e, p_lo, F, flip != 0);
        const bool in = idx[e] < n;
        k[e] = in ? keys[idx[e]] : key_max(K(0));
        if (KV) v[e] = in ? vals[idx[e]] : (idx[e] | PAD_BIT);
    }
    network<K, KV, F>(k, v, F, flip != 0);
#pragma unroll
    for (int e = 0; e < R; ++e) {
        if (idx[e] < n) {
            keys[idx[e]] = k[e];
            if (KV) vals[idx[e]] = v[e];
        }
    }
}

// Shared-memory index with one pad word per 32 (breaks bank conflicts of strided groups).
__device__ __forceinline__ u32 spad(u32 i) { return i + (i >> 5); }

// Tile threads: 2^(T-F) slots of 2^F keys, at most MAX_THREADS a block; a thread runs SLOTS = SLOT_COUNT /
// THREADS slots one after the other (t15f4: 2048 slots on 1024 threads, each thread's registers those of one
// slot). MAX_THREADS is 1024, but 512 where a slot holds 128 bytes or more (16 keys with values, or 16 64-bit
// keys: 32 registers of data): at 1024 threads a thread has 64 registers, too few for them, and ptxas spilled
// (t14f4 on sm_90: 72 bytes with 32-bit keys and values, 1.5 KB with 64-bit ones); 512 threads of two slots
// each have 128 (schedule.Variant.tile_threads). A kernel may cap it lower (W: the "_w" kernels).
template <int T, int F, bool KV, int KEY_BYTES = 4, int W = 1024>
struct TileShape {
    static constexpr u32 SLOT_COUNT = (1u << T) >> F;
    static constexpr u32 BY_SLOT = ((KEY_BYTES + (KV ? 4 : 0)) << F) >= 128 ? 512u : 1024u;
    static constexpr u32 MAX_THREADS = (u32)W < BY_SLOT ? (u32)W : BY_SLOT;
    static constexpr u32 THREADS = SLOT_COUNT < MAX_THREADS ? SLOT_COUNT : MAX_THREADS;
    static constexpr u32 SLOTS = SLOT_COUNT / THREADS;
};

// One step (fp strides from 2^p_hi down, a flip first if asked) over a tile: each thread loads the 2^F keys of
// its slot(s) from shared memory, or, FROM_G, from the tile's place in global memory (padding past n), runs the
// network in registers, stores them to shared memory and waits at a barrier. A merge's first step loads from
// global memory (const_steps): its keys pass through shared memory once fewer than if the tile were copied in
// first. (Merges never load input bits: a sort's first launch is a tile sort, schedule.transforms_fused.)
template <typename K, bool KV, int T, int F, int W, bool FROM_G>
__device__ __forceinline__ void tile_chunk_io(K* sk, u32* sv, int p_hi, int fp, bool flip, const K* keys,
                                              const u32* vals, u32 base, u32 n) {
    constexpr int R = 1 << F;
    const int p_lo = p_hi - fp + 1;
#pragma unroll 1
    for (u32 slot = 0; slot < TileShape<T, F, KV, sizeof(K), W>::SLOTS; ++slot) {
        const u32 me = threadIdx.x + slot * TileShape<T, F, KV, sizeof(K), W>::THREADS;
        K k[R];
        u32 v[R];
        // the tile index of register e (recomputed at the store: an array of R indices would cost R registers)
        auto at = [&](int e) {
            const u32 h = (u32)e & ((1u << fp) - 1u);
            const u32 rest = (me << (F - fp)) | ((u32)e >> fp);
            return group_index(rest, h, p_lo, fp, flip);
        };
#pragma unroll
        for (int e = 0; e < R; ++e) {
            const u32 i = at(e);
            if (FROM_G) {
                const u32 g = base + i;
                k[e] = g < n ? keys[g] : key_max(K(0));
                if (KV) v[e] = g < n ? vals[g] : (g | PAD_BIT);
            } else {
                k[e] = sk[spad(i)];
                if (KV) v[e] = sv[spad(i)];
            }
        }
        network<K, KV, F>(k, v, fp, flip);
#pragma unroll
        for (int e = 0; e < R; ++e) {
            const u32 i = spad(at(e));
            sk[i] = k[e];
            if (KV) sv[i] = v[e];
        }
    }
    __syncthreads();
}

// A step between shared memory and shared memory.
template <typename K, bool KV, int T, int F, int W>
__device__ __forceinline__ void tile_chunk(K* sk, u32* sv, int p_hi, int fp, bool flip) {
    tile_chunk_io<K, KV, T, F, W, false>(sk, sv, p_hi, fp, flip, nullptr, nullptr, 0u, 0u);
}

// A tile sort's load (mode 0): TILE / THREADS keys a thread, in batches of up to 8: all loads of a batch are issued
// before any transform or shared-memory store (a loop `i += THREADS` was unrolled by 4 with remainder code, and
// the input transform's branches kept the first launch's loads one at a time), so one round trip to memory serves
// eight keys where a block is alone on its SM (four 64-bit keys with values: eight spilled at 64 registers).
template <typename K, bool KV, int T, int THREADS>
__device__ __forceinline__ void tile_load(K* sk, u32* sv, const K* keys, const u32* vals, const K* src, u32 base,
                                          u32 n, bool load_input, int code, int desc, u32 vbase) {
    constexpr u32 PER_THREAD = (1u << T) / THREADS;
    constexpr u32 BATCH_MAX = (sizeof(K) == 8 && KV) ? 4u : 8u;
    constexpr u32 BATCH = PER_THREAD < BATCH_MAX ? PER_THREAD : BATCH_MAX;
#pragma unroll 1
    for (u32 r0 = 0; r0 < PER_THREAD; r0 += BATCH) {
        K kb[BATCH];
        u32 vb[BATCH];
#pragma unroll
        for (u32 j = 0; j < BATCH; ++j) {
            const u32 g = base + threadIdx.x + (r0 + j) * THREADS;
            const bool in = g < n;
            if (load_input) {
                kb[j] = in ? src[g] : K(0);
                if (KV) vb[j] = in ? vbase + g : (g | PAD_BIT);
            } else {
                kb[j] = in ? keys[g] : key_max(K(0));
                if (KV) vb[j] = in ? vals[g] : (g | PAD_BIT);
            }
        }
#pragma unroll
        for (u32 j = 0; j < BATCH; ++j) {
            const u32 i = threadIdx.x + (r0 + j) * THREADS;
            if (load_input) kb[j] = base + i < n ? to_key(kb[j], code, desc) : key_max(K(0));
            sk[spad(i)] = kb[j];
            if (KV) sv[spad(i)] = vb[j];
        }
    }
}

// Steps known at compile time, each one out-of-line function with its stride, shape and flip constant, so that
// its key indices come from folded shifts and masks (sm_90 SASS of a t14f4 step: 176 instructions, 64 of them its
// compare-exchanges; 216 for tile_step_p below, whose p_hi is a runtime value; 1,128 for tile_chunk with all
// three at run time; scripts/sass_counts.py --sort). Out of line: the whole schedule inlined built 5x slower
// and spilled registers. They serve every kernel's merges (mode 1: the strides 2^(T-1) .. 1, no flip, the first
// step loading the tile from global memory: its groups span the tile, but a warp's lanes read consecutive keys;
// the last step stays in shared memory, where its lanes would store 2^F keys apart, each sector in 2^F partial
// writes, and tile_body's store phase writes them coalesced) and the "_c" kernels' tile sorts (a `c` after a
// configuration: schedule.Variant.const_steps).
template <typename K, bool KV, int T, int F, int W, int P, int FP, bool FLIP, bool FROM_G>
__device__ __noinline__ void const_step(K* sk, u32* sv, const K* keys, const u32* vals, u32 base, u32 n) {
    tile_chunk_io<K, KV, T, F, W, FROM_G>(sk, sv, P, FP, FLIP, keys, vals, base, n);
}
// the strides 2^P .. 1 in steps of at most F (schedule.chunks(P, 0, F, FLIP)), the first one a flip if FLIP and
// loading from global memory if FROM_G
template <typename K, bool KV, int T, int F, int W, int P, bool FLIP, bool FROM_G>
__device__ __forceinline__ void const_steps(K* sk, u32* sv, const K* keys, const u32* vals, u32 base, u32 n) {
    if constexpr (P >= 0) {
        constexpr int FP = F < P + 1 ? F : P + 1;
        const_step<K, KV, T, F, W, P, FP, FLIP, FROM_G>(sk, sv, keys, vals, base, n);
        const_steps<K, KV, T, F, W, P - FP, false, false>(sk, sv, keys, vals, base, n);
    }
}
// stages M..min(arg, T) of a tile sort
template <typename K, bool KV, int T, int F, int W, int M>
__device__ __forceinline__ void sort_stages_c(K* sk, u32* sv, int arg) {
    if constexpr (M <= T) {
        if (M > arg) return;
        const_steps<K, KV, T, F, W, M - 1, true, false>(sk, sv, nullptr, nullptr, 0u, 0u);
        sort_stages_c<K, KV, T, F, W, M + 1>(sk, sv, arg);
    }
}

// Runtime steps with their fused-stride count and flip as compile-time constants: one out-of-line function per
// (FP, FLIP), only p_hi at run time, so the register network and the index arithmetic of a step are those of
// its own shape (tile_chunk with all three at run time compiled every shape's compare-exchanges into one step).
template <typename K, bool KV, int T, int F, int W, int FP, bool FLIP>
__device__ __noinline__ void tile_step_p(K* sk, u32* sv, int p_hi) {
    tile_chunk<K, KV, T, F, W>(sk, sv, p_hi, FP, FLIP);
}
template <typename K, bool KV, int T, int F, int W, int FP = F>
__device__ __forceinline__ void tile_step(K* sk, u32* sv, int p_hi, int fp, bool flip) {
    if constexpr (FP >= 1) {
        if (fp == FP) {
            if (flip) tile_step_p<K, KV, T, F, W, FP, true>(sk, sv, p_hi);
            else tile_step_p<K, KV, T, F, W, FP, false>(sk, sv, p_hi);
        } else {
            tile_step<K, KV, T, F, W, FP - 1>(sk, sv, p_hi, fp, flip);
        }
    }
}

// mode 0: stages 1..arg of a tile sort (CS: constant steps); mode 1: the strides 2^(T-1)..1 of a merge stage > T
// (const_steps: constant steps in every kernel).
template <typename K, bool KV, int T, int F, bool CS = false, int W = 1024>
__device__ __forceinline__ void tile_body(K* __restrict__ keys, u32* __restrict__ vals, const K* __restrict__ src,
                                          K* __restrict__ dst, u32 n, int mode, int arg, int io, int code, int desc,
                                          u32 vbase) {
    constexpr u32 TILE = 1u << T;
    constexpr u32 THREADS = TileShape<T, F, KV, sizeof(K), W>::THREADS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    K* sk = reinterpret_cast<K*>(smem_raw);
    u32* sv = reinterpret_cast<u32*>(sk + TILE + (TILE >> 5));
    const u32 base = blockIdx.x * TILE;
    const bool load_input = (io & 1) != 0, store_output = (io & 2) != 0;
    constexpr u32 PER_THREAD = TILE / THREADS;
    if (mode == 1) {  // a merge: its first step loads the tile from global memory
        const_steps<K, KV, T, F, W, T - 1, false, true>(sk, sv, keys, vals, base, n);
    } else {
        tile_load<K, KV, T, THREADS>(sk, sv, keys, vals, src, base, n, load_input, code, desc, vbase);
        __syncthreads();
        if constexpr (CS) {
            sort_stages_c<K, KV, T, F, W, 1>(sk, sv, arg);
        } else {
            for (int m = 1; m <= arg; ++m) {       // schedule.tile_steps: chunks(m-1, 0, F, flip first)
                int p = m - 1;
                bool first = true;
                while (p >= 0) {
                    const int fp = min(F, p + 1);
                    tile_step<K, KV, T, F, W>(sk, sv, p, fp, first);
                    p -= fp;
                    first = false;
                }
            }
        }
    }
#pragma unroll 8
    for (u32 r = 0; r < PER_THREAD; ++r) {
        const u32 i = threadIdx.x + r * THREADS;
        const u32 g = base + i;
        if (g < n) {
            if (store_output) dst[g] = from_key(sk[spad(i)], code, desc);
            else keys[g] = sk[spad(i)];
            if (KV) vals[g] = sv[spad(i)];
        }
    }
}

extern "C" {
__global__ void bitonic_to_key_32(const u32* in, u32* keys, u32* vals, u32 n, int code, int desc, int kv,
                                  u32 base) {
    to_key_body<u32, u32>(in, keys, vals, n, code, desc, kv, base);
}
__global__ void bitonic_to_key_64(const u64* in, u64* keys, u32* vals, u32 n, int code, int desc, int kv,
                                  u32 base) {
    to_key_body<u64, u64>(in, keys, vals, n, code, desc, kv, base);
}
__global__ void bitonic_from_key_32(const u32* keys, u32* out, u32 n, int code, int desc) {
    from_key_body<u32>(keys, out, n, code, desc);
}
__global__ void bitonic_from_key_64(const u64* keys, u64* out, u32 n, int code, int desc) {
    from_key_body<u64>(keys, out, n, code, desc);
}
// the values (row indices) as the int64 permutation the sorts return: a kernel of its own, so that a captured
// sort (sort_plan.SortPlan) widens into a buffer it owns instead of allocating one
__global__ void bitonic_widen_values(const u32* vals, long long* out, u32 n) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = (long long)vals[i];
}

#define BITONIC_PASS(BITS, K, KV, F)                                                                  \
    __global__ void __launch_bounds__(256) bitonic_pass_k##BITS##_kv##KV##_f##F(                      \
        K* keys, u32* vals, u32 n, int p_hi, int flip) {                                              \
        pass_body<K, KV, F>(keys, vals, n, p_hi, flip);                                               \
    }
#define BITONIC_PASSES(BITS, K, KV) \
    BITONIC_PASS(BITS, K, KV, 1) BITONIC_PASS(BITS, K, KV, 2) BITONIC_PASS(BITS, K, KV, 3) BITONIC_PASS(BITS, K, KV, 4) \
    BITONIC_PASS(BITS, K, KV, 5)
BITONIC_PASSES(32, u32, 0)
BITONIC_PASSES(32, u32, 1)
BITONIC_PASSES(64, u64, 0)
BITONIC_PASSES(64, u64, 1)

#define BITONIC_TILE(BITS, K, KV, T, F)                                                               \
    __global__ void __launch_bounds__(TileShape<T, F, KV, sizeof(K)>::THREADS) bitonic_tile_k##BITS##_kv##KV##_t##T##_f##F( \
        K* keys, u32* vals, const K* src, K* dst, u32 n, int mode, int arg, int io, int code, int desc,  \
        u32 vbase) {                                                                                  \
        tile_body<K, KV, T, F>(keys, vals, src, dst, n, mode, arg, io, code, desc, vbase);            \
    }
// schedule.TILE_CONFIGS
#define BITONIC_TILES(BITS, K, KV) \
    BITONIC_TILE(BITS, K, KV, 11, 1) BITONIC_TILE(BITS, K, KV, 12, 3) BITONIC_TILE(BITS, K, KV, 13, 3) \
    BITONIC_TILE(BITS, K, KV, 13, 4) BITONIC_TILE(BITS, K, KV, 14, 4)
BITONIC_TILES(32, u32, 0)
BITONIC_TILES(32, u32, 1)
BITONIC_TILES(64, u64, 0)
BITONIC_TILES(64, u64, 1)
// schedule.TILE_CONFIGS_K32_ONLY: a 2^15-key tile (132 KB of shared memory) fits only 32-bit keys without values
BITONIC_TILE(32, u32, 0, 15, 4)
// schedule.CONST_STEP_TILES: constant steps, for 32-bit keys without values (what `sort bench --tune` times)
#define BITONIC_TILE_C(BITS, K, KV, T, F)                                                             \
    __global__ void __launch_bounds__(TileShape<T, F, KV, sizeof(K)>::THREADS) bitonic_tile_k##BITS##_kv##KV##_t##T##_f##F##_c( \
        K* keys, u32* vals, const K* src, K* dst, u32 n, int mode, int arg, int io, int code, int desc,  \
        u32 vbase) {                                                                                  \
        tile_body<K, KV, T, F, true>(keys, vals, src, dst, n, mode, arg, io, code, desc, vbase);      \
    }
BITONIC_TILE_C(32, u32, 0, 13, 3)
BITONIC_TILE_C(32, u32, 0, 13, 4)
BITONIC_TILE_C(32, u32, 0, 14, 4)
BITONIC_TILE_C(32, u32, 0, 15, 4)
// schedule.TILE_THREAD_CAPS: the same tile with at most W threads a block (each running several slots), for 32-bit
// keys without values: two 512-thread blocks an SM where one 1024-thread block is alone (what `sort bench --tune`
// times as t14f4g5w512: whether two blocks, one loading while the other sorts, beat one)
#define BITONIC_TILE_W(BITS, K, KV, T, F, W)                                                          \
    __global__ void __launch_bounds__(TileShape<T, F, KV, sizeof(K), W>::THREADS)                      \
    bitonic_tile_k##BITS##_kv##KV##_t##T##_f##F##_w##W(                                                \
        K* keys, u32* vals, const K* src, K* dst, u32 n, int mode, int arg, int io, int code, int desc,  \
        u32 vbase) {                                                                                  \
        tile_body<K, KV, T, F, false, W>(keys, vals, src, dst, n, mode, arg, io, code, desc, vbase);  \
    }
BITONIC_TILE_W(32, u32, 0, 14, 4, 512)
}
