// gpulab join: a CUDA hash join (open addressing, linear probing), many-to-many, exact output size.
//
// Memory: one allocation holds the table (cap + 1 slots of 16 bytes) followed by HJ_COUNTERS 64-bit
// counters: [0] grouped rows reserved, [1] output pairs, [2] build keys with more than one row,
// [3] unused. The host empties all of it with ONE cudaMemsetAsync(0): a slot stores the key XOR the
// empty marker (hj_enc), so an empty slot is all zero bytes (encoded key 0, count 0; `row` is only read
// in slots with count >= 1, where the first inserter wrote it).
//
// Slots: a unique build key costs ONE atomic, not two (claim, then count):
//   SlotI32 {kc, row, pad} with kc = encoded key << 32 | count in one 64-bit word: an int32 build row claims
//           its slot and counts itself with one atomicCAS (0 -> key|1); a repeated key adds 1 to kc (the
//           count, the low half).
//   SlotI64 {key, extra, row}: a 64-bit key and a count do not fit one CAS, so the claim counts its row
//           implicitly: a claimed slot holds 1 + extra rows (hj_count), and `extra` takes atomicAdds only
//           for a key's further rows. The marker slot `cap` is never claimed (its key field stays 0), so
//           there `extra` is the whole count.
//
// Build (on the smaller table):
//   hj_insert_*        one thread per build row: claim the key's slot with atomicCAS (or find it), count += 1;
//                      the rows of a warp with one key do it together (__match_any_sync: one atomic for all);
//                      the row that takes count 0 -> 1 stores itself in the slot (the common, unique case);
//                      the row that takes count 1 -> 2 adds one to counters[2] (a duplicated build key).
//   hj_group_alloc_*   for keys with count > 1, the owning row reserves a run of `count` entries
//   hj_group_scatter   every row of such a key takes the next entry of that run with atomicAdd on its
//                      offset (so slot_off ends one past the run: the run is grouped[off - count, off))
//                      Both group kernels are grid-stride loops that return at once when counters[2] == 0
//                      (unique build keys: then neither would do anything), so the host may launch them
//                      with a small fixed grid, and inside a CUDA graph they cost about one launch each.
// Probe:
//   hj_probe_*         one thread per probe row finds its slot (each slot visited is read whole, key, count and
//                      first row, by one 16-byte load); a block-wide prefix sum of the match
//                      counts and one atomicAdd per block reserve the output positions; pairs are written
//                      while they fit in `capacity`. The counter always ends at the exact output size, so
//                      the host re-runs with that capacity when the first guess was short.
//
// The empty-slot marker is the key type's minimum value. A key equal to it is never stored in the
// table: all such rows share one extra slot at index `cap` (its key field is unused), so that key
// joins like any other. Slots are found with "fastrange" (hash * cap >> 32), so cap need not be a
// power of two; cap < 2^31 - 1 (build_slot and slot_off hold slot indices, cap included, as int).
//
// Compiled by NVRTC through cupy.RawModule at run time, and by nvcc in the CPU tests (no headers).
// The Python launch arguments (hash_join_cuda.LAUNCH_ARGS) are checked against the extern "C"
// signatures below by a CPU test.

#define HJ_EMPTY_I32 (-2147483647 - 1)
#define HJ_EMPTY_I64 (-9223372036854775807LL - 1LL)
#define HJ_COUNTERS 4

struct __align__(16) SlotI32 { unsigned long long kc; int row; int pad; };  // read whole by hj_find
struct __align__(16) SlotI64 { long long key; int extra; int row; };  // read whole by hj_find

__device__ __forceinline__ unsigned int hj_hash(int key) {
    unsigned int h = (unsigned int)key;  // murmur3 fmix32
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h;
}

__device__ __forceinline__ unsigned int hj_hash(long long key) {
    unsigned long long h = (unsigned long long)key;  // murmur3 fmix64, high half
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull; h ^= h >> 33;
    return (unsigned int)(h >> 32);
}

// The stored form of a key: key XOR empty marker (a bijection; the marker itself encodes to 0 = empty slot).
__device__ __forceinline__ int hj_enc(int key) { return (int)((unsigned int)key ^ 0x80000000u); }
__device__ __forceinline__ long long hj_enc(long long key) {
    return (long long)((unsigned long long)key ^ 0x8000000000000000ull);
}

__device__ __forceinline__ unsigned int hj_home(unsigned int h, unsigned int cap) {
    return (unsigned int)(((unsigned long long)h * cap) >> 32);
}

#define HJ_LOW32 0xFFFFFFFFull

// The encoded key of a slot (0: empty) and its build-row count.
__device__ __forceinline__ int hj_slot_key(unsigned long long kc) { return (int)(unsigned int)(kc >> 32); }
__device__ __forceinline__ int hj_count(const SlotI32& slot) { return (int)(slot.kc & HJ_LOW32); }
// A claimed slot counts its claiming row implicitly (the key field is nonzero); the marker slot's key is 0.
__device__ __forceinline__ int hj_count(const SlotI64& slot) { return slot.extra + (slot.key != 0ll ? 1 : 0); }
__device__ __forceinline__ int hj_count_add(SlotI32* slot, int c) {
    return (int)(atomicAdd(&slot->kc, (unsigned long long)c) & HJ_LOW32);
}
__device__ __forceinline__ int hj_count_add(SlotI64* slot, int c) { return atomicAdd(&slot->extra, c); }

// Find or claim encoded key ek's slot from s on (linear probing) and count c build rows there. Returns the
// rows of this key counted before the group's second row, so that its row of rank j >= 1 is the key's
// (returned + j)-th; `claimed` says whether the group's first row (rank 0) claimed the slot, which makes it
// the key's row 0, and otherwise it is row (returned + 0). Each slot visited costs one atomicCAS and no read
// before it: the CAS returns the slot's word either way, so a read first would add a dependent round trip
// to L2 on every visit (the common case, a unique key meeting an empty slot, would pay two instead of one).
__device__ __forceinline__ int hj_claim(SlotI32* table, unsigned int cap, unsigned int& s, int ek, int c,
                                        bool& claimed) {
    const unsigned long long mine = (unsigned long long)(unsigned int)ek << 32;
    while (true) {
        const unsigned long long cur = atomicCAS(&table[s].kc, 0ull, mine | (unsigned long long)c);
        claimed = cur == 0ull;
        if (claimed) return 0;  // claimed, and all c rows counted
        if (hj_slot_key(cur) == ek) return hj_count_add(&table[s], c);
        s = (s + 1 == cap) ? 0u : s + 1;
    }
}

// SlotI64: the claiming CAS counts its own row (hj_count), so a unique key costs one atomic; the group's
// other c - 1 rows, or all c rows of a group that found the key, go to `extra` by one atomicAdd. The key's
// rows are numbered 0 (the claimer), then 1 + (extra before each add) onwards: exactly 0 .. count - 1.
__device__ __forceinline__ int hj_claim(SlotI64* table, unsigned int cap, unsigned int& s, long long ek, int c,
                                        bool& claimed) {
    while (true) {
        const unsigned long long cur = atomicCAS((unsigned long long*)&table[s].key, 0ull, (unsigned long long)ek);
        claimed = cur == 0ull;
        if (claimed) return c > 1 ? hj_count_add(&table[s], c - 1) : 0;  // rank j >= 1: row 1 + extra + j - 1
        if (cur == (unsigned long long)ek) return 1 + hj_count_add(&table[s], c);
        s = (s + 1 == cap) ? 0u : s + 1;
    }
}

// The slot holding encoded key ek from s on, its count (0 when the key is not in the table) and, with a count,
// its first build row. Each visited slot is read whole (16 bytes) by ONE load through the read-only path.
__device__ __forceinline__ int hj_find(const SlotI32* table, unsigned int cap, unsigned int& s, int ek,
                                       int& row) {
    while (true) {
        const longlong2 v = __ldg(reinterpret_cast<const longlong2*>(table + s));
        const unsigned long long cur = (unsigned long long)v.x;  // kc: encoded key << 32 | count
        if (cur == 0ull) return 0;
        if (hj_slot_key(cur) == ek) {
            row = (int)((unsigned long long)v.y & HJ_LOW32);  // row: bytes 8-11 of the slot
            return (int)(cur & HJ_LOW32);
        }
        s = (s + 1 == cap) ? 0u : s + 1;
    }
}

// SlotI64 likewise: key, extra and row in one 16-byte load (not the key and then the count: two trips to L2
// for one slot, one after the other).
__device__ __forceinline__ int hj_find(const SlotI64* table, unsigned int cap, unsigned int& s, long long ek,
                                       int& row) {
    while (true) {
        const longlong2 v = __ldg(reinterpret_cast<const longlong2*>(table + s));
        if (v.x == 0) return 0;
        if (v.x == ek) {  // extra: bytes 8-11 of the slot, row: 12-15 (little-endian); the claim's row is 1
            row = (int)((unsigned long long)v.y >> 32);
            return 1 + (int)((unsigned long long)v.y & HJ_LOW32);
        }
        s = (s + 1 == cap) ? 0u : s + 1;
    }
}

// The rows of one warp that carry the same key are counted into its slot together: the lowest of them (the
// leader) claims or finds the slot and adds their number with one atomic, the others take the counts after
// its, in lane order. A hot key's N rows then cost about N / 32 atomics on its slot's word instead of N
// (unique keys: every lane leads itself, as before). Every lane of the warp, those past n too, takes part in
// the votes and shuffles (blockDim.x a multiple of 32).
template <typename K, typename Slot>
__device__ __forceinline__ void hj_insert(const K* __restrict__ keys, int n, Slot* table, unsigned int cap,
                                          K empty, int* __restrict__ build_slot, unsigned long long* counters) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    const bool valid = i < n;
    const K k = valid ? keys[i] : K(0);
    const bool marker = valid && k == empty;  // the empty-marker key: its rows share slot `cap`
    // the group of a row: its encoded key, never 0 for other keys; 0 for the marker key and the lanes past n
    const unsigned long long group = (valid && !marker) ? (unsigned long long)hj_enc(k) : 0ull;
    const unsigned valid_lanes = __ballot_sync(0xffffffffu, valid);
    unsigned peers = __match_any_sync(0xffffffffu, group);
    if (group == 0ull) peers &= valid_lanes;  // the marker key's rows, without the lanes past n
    const int leader = __ffs((int)peers) - 1;  // -1 for a lane past n (its shuffles below read any lane)
    unsigned int s = 0;
    int c0 = 0;
    bool claimed = false;
    if (valid && lane == leader) {
        const int rows = __popc(peers);
        if (marker) {
            s = cap;
            c0 = hj_count_add(&table[cap], rows);
        } else {
            s = hj_home(hj_hash(k), cap);
            c0 = hj_claim(table, cap, s, hj_enc(k), rows, claimed);  // hj_enc(k) != 0, since k != empty
        }
    }
    s = __shfl_sync(0xffffffffu, s, leader & 31);
    c0 = __shfl_sync(0xffffffffu, c0, leader & 31);
    if (!valid) return;
    // the rows of this key counted before this one (0 .. count - 1, each once)
    const int c = claimed ? 0 : c0 + __popc(peers & ((1u << lane) - 1u));
    if (c == 0) table[s].row = i;
    else if (c == 1) atomicAdd(&counters[2], 1ull);  // this key has a second build row: grouping needed
    build_slot[i] = (int)s;
}

template <typename Slot>
__device__ __forceinline__ void hj_group_alloc(int n, const int* __restrict__ build_slot, const Slot* table,
                                               int* __restrict__ slot_off, unsigned long long* counters) {
    if (counters[2] == 0ull) return;  // unique build keys: nothing to group
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int s = build_slot[i];
        int c = hj_count(table[s]);
        if (c > 1 && table[s].row == (int)i) slot_off[s] = (int)atomicAdd(&counters[0], (unsigned long long)c);
    }
}

template <typename Slot>
__device__ __forceinline__ void hj_group_scatter(int n, const int* __restrict__ build_slot, const Slot* table,
                                                 int* slot_off, int* __restrict__ grouped,
                                                 const unsigned long long* counters) {
    if (counters[2] == 0ull) return;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int s = build_slot[i];
        if (hj_count(table[s]) > 1) grouped[atomicAdd(&slot_off[s], 1)] = (int)i;
    }
}

__device__ __forceinline__ unsigned long long hj_warp_inclusive(unsigned long long v) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        unsigned long long up = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += up;
    }
    return v;
}

// Block-wide exclusive prefix of `c` plus this block's base in the global output (one atomicAdd per block).
// Every thread of the block must call it (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ unsigned long long hj_block_reserve(unsigned long long c, unsigned long long* counter) {
    __shared__ unsigned long long warp_excl[32];
    __shared__ unsigned long long base;
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    unsigned long long incl = hj_warp_inclusive(c);
    if (lane == 31) warp_excl[wid] = incl;
    __syncthreads();
    if (wid == 0) {
        unsigned long long v = lane < nwarps ? warp_excl[lane] : 0ull;
        unsigned long long vi = hj_warp_inclusive(v);
        if (lane < nwarps) warp_excl[lane] = vi - v;
        if (lane == 31) base = vi ? atomicAdd(counter, vi) : 0ull;
    }
    __syncthreads();
    return base + warp_excl[wid] + (incl - c);
}

template <typename K, typename Slot>
__device__ __forceinline__ void hj_probe(const K* __restrict__ keys, int n, const Slot* __restrict__ table,
                                         unsigned int cap, K empty, const int* __restrict__ slot_off,
                                         const int* __restrict__ grouped, int* __restrict__ out_probe,
                                         int* __restrict__ out_build, unsigned long long capacity,
                                         unsigned long long* counter, int count_only) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int c = 0, row = 0;
    unsigned int s = 0;
    if (i < n) {
        K k = keys[i];
        if (k == empty) {
            s = cap;
            c = hj_count(table[cap]);
            if (c) row = table[cap].row;
        } else {
            s = hj_home(hj_hash(k), cap);
            c = hj_find(table, cap, s, hj_enc(k), row);
        }
    }
    unsigned long long pos = hj_block_reserve((unsigned long long)c, counter);
    if (count_only || c == 0) return;
    if (c == 1) {
        if (pos < capacity) { out_probe[pos] = i; out_build[pos] = row; }
        return;
    }
    const int* rows = grouped + (slot_off[s] - c);  // the scatter left slot_off one past the run
    for (int j = 0; j < c && pos + j < capacity; ++j) {
        out_probe[pos + j] = i;
        out_build[pos + j] = rows[j];
    }
}

#define HJ_DEFINE(SUFFIX, K, SLOT, EMPTY)                                                                         \
extern "C" __global__ void hj_insert_##SUFFIX(const K* __restrict__ keys, int n, SLOT* table, unsigned int cap,  \
                                              int* __restrict__ build_slot, unsigned long long* counters) {      \
    hj_insert<K, SLOT>(keys, n, table, cap, EMPTY, build_slot, counters);                                         \
}                                                                                                                 \
extern "C" __global__ void hj_group_alloc_##SUFFIX(int n, const int* __restrict__ build_slot, const SLOT* table, \
                                                   int* __restrict__ slot_off, unsigned long long* counters) {    \
    hj_group_alloc<SLOT>(n, build_slot, table, slot_off, counters);                                               \
}                                                                                                                 \
extern "C" __global__ void hj_group_scatter_##SUFFIX(int n, const int* __restrict__ build_slot,                  \
                                                     const SLOT* table, int* slot_off,                           \
                                                     int* __restrict__ grouped,                                  \
                                                     const unsigned long long* counters) {                       \
    hj_group_scatter<SLOT>(n, build_slot, table, slot_off, grouped, counters);                                    \
}                                                                                                                 \
extern "C" __global__ void hj_probe_##SUFFIX(const K* __restrict__ keys, int n, const SLOT* __restrict__ table,  \
                                             unsigned int cap, const int* __restrict__ slot_off,                  \
                                             const int* __restrict__ grouped, int* __restrict__ out_probe,        \
                                             int* __restrict__ out_build, unsigned long long capacity,            \
                                             unsigned long long* counter, int count_only) {                       \
    hj_probe<K, SLOT>(keys, n, table, cap, EMPTY, slot_off, grouped, out_probe, out_build, capacity, counter,    \
                      count_only);                                                                                \
}

HJ_DEFINE(i32, int, SlotI32, HJ_EMPTY_I32)
HJ_DEFINE(i64, long long, SlotI64, HJ_EMPTY_I64)

// ---- join-aggregate, hash form (hash_aggregate_cuda.py): per key present on both sides, the row count and
// payload sum of each side, from which the host-visible aggregates follow (count = cb * cp, sum of the build
// side's payloads over the join = sb * cp, of the probe side's = sp * cb; all modulo 2^64).
//   ha_build_*   one thread per build row: find or claim the key's slot (atomicCAS on the encoded key, as
//                hj_insert; the empty-marker key in slot `cap`), then atomicAdd its count (and payload sum)
//   ha_probe_*   one thread per probe row: find the key's slot (no claim: a key only on this side has no
//                group), atomicAdd its count (and payload sum)
//   ha_emit_*    one thread per slot: slots counted on both sides reserve output rows by the block scan
//                (hj_block_reserve) and write key, count, and the two products
// Memory: cap + 1 AggSlots of 32 bytes, then one 64-bit group counter: one memset empties both.

struct AggSlot { unsigned long long key; unsigned int cnt_b; unsigned int cnt_p; unsigned long long sum_b;
                 unsigned long long sum_p; };

__device__ __forceinline__ unsigned long long ha_enc(int key) { return (unsigned long long)(unsigned int)hj_enc(key); }
__device__ __forceinline__ unsigned long long ha_enc(long long key) { return (unsigned long long)hj_enc(key); }
__device__ __forceinline__ int ha_dec(unsigned long long ek, int) { return hj_enc((int)(unsigned int)ek); }
__device__ __forceinline__ long long ha_dec(unsigned long long ek, long long) { return hj_enc((long long)ek); }

// Linear probing over AggSlots: moves s to the slot holding encoded key ek and returns true; an empty slot on
// the way ends a search (false), or, with `claim`, is taken by atomicCAS (a lost race to the same key takes
// that slot too). A claim reads the key first (volatile: other threads are claiming meanwhile) and tries the
// CAS only on an empty slot, so that the many rows of a hot key (GROUP BY) pay no atomic for finding their
// slot, only for counting in it (the join's insert, mostly unique keys, claims with the CAS first instead).
__device__ __forceinline__ bool ha_locate(AggSlot* table, unsigned int cap, unsigned int& s, unsigned long long ek,
                                          bool claim) {
    while (true) {
        unsigned long long* key = &table[s].key;
        unsigned long long cur = claim ? *(volatile unsigned long long*)key : *key;
        if (cur == 0ull) {
            if (!claim) return false;  // a search met an empty slot
            cur = atomicCAS(key, 0ull, ek);
            if (cur == 0ull) return true;  // claimed
        }
        if (cur == ek) return true;
        s = (s + 1 == cap) ? 0u : s + 1;
    }
}

// The slot of key k (found or, on the build side, claimed); 0xFFFFFFFF for a probe key not on the build side.
template <typename K>
__device__ __forceinline__ unsigned int ha_slot(AggSlot* table, unsigned int cap, K k, K empty, bool claim) {
    if (k == empty) return cap;
    unsigned int s = hj_home(hj_hash(k), cap);
    // ha_enc(k) != 0, since k != empty
    return ha_locate(table, cap, s, ha_enc(k), claim) ? s : 0xFFFFFFFFu;
}

template <typename K>
__device__ __forceinline__ void ha_count(const K* __restrict__ keys, const int* __restrict__ pay, int n,
                                         AggSlot* table, unsigned int cap, K empty, int sums, bool build) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned int s = ha_slot(table, cap, keys[i], empty, build);
    if (s == 0xFFFFFFFFu) return;
    atomicAdd(build ? &table[s].cnt_b : &table[s].cnt_p, 1u);
    if (sums) atomicAdd(build ? &table[s].sum_b : &table[s].sum_p, (unsigned long long)(long long)pay[i]);
}

template <typename K>
__device__ __forceinline__ void ha_emit(const AggSlot* __restrict__ table, unsigned int cap, K empty,
                                        K* __restrict__ out_key, long long* __restrict__ out_count,
                                        long long* __restrict__ out_sum_b, long long* __restrict__ out_sum_p,
                                        unsigned long long capacity, unsigned long long* counter) {
    const unsigned int s = blockIdx.x * blockDim.x + threadIdx.x;
    AggSlot slot{};
    if (s <= cap) slot = table[s];
    const bool both = slot.cnt_b > 0u && slot.cnt_p > 0u;
    const unsigned long long pos = hj_block_reserve(both ? 1ull : 0ull, counter);
    if (!both || pos >= capacity) return;
    const unsigned long long cb = slot.cnt_b, cp = slot.cnt_p;
    out_key[pos] = s == cap ? empty : ha_dec(slot.key, empty);
    out_count[pos] = (long long)(cb * cp);
    out_sum_b[pos] = (long long)(slot.sum_b * cp);
    out_sum_p[pos] = (long long)(slot.sum_p * cb);
}

#define HA_DEFINE(SUFFIX, K, EMPTY)                                                                               \
extern "C" __global__ void ha_build_##SUFFIX(const K* __restrict__ keys, const int* __restrict__ pay, int n,     \
                                             AggSlot* table, unsigned int cap, int sums) {                       \
    ha_count<K>(keys, pay, n, table, cap, EMPTY, sums, true);                                                     \
}                                                                                                                 \
extern "C" __global__ void ha_probe_##SUFFIX(const K* __restrict__ keys, const int* __restrict__ pay, int n,     \
                                             AggSlot* table, unsigned int cap, int sums) {                       \
    ha_count<K>(keys, pay, n, table, cap, EMPTY, sums, false);                                                    \
}                                                                                                                 \
extern "C" __global__ void ha_emit_##SUFFIX(const AggSlot* __restrict__ table, unsigned int cap,                  \
                                            K* __restrict__ out_key, long long* __restrict__ out_count,          \
                                            long long* __restrict__ out_sum_b, long long* __restrict__ out_sum_p,\
                                            unsigned long long capacity, unsigned long long* counter) {          \
    ha_emit<K>(table, cap, EMPTY, out_key, out_count, out_sum_b, out_sum_p, capacity, counter);                   \
}

HA_DEFINE(i32, int, HJ_EMPTY_I32)
HA_DEFINE(i64, long long, HJ_EMPTY_I64)
