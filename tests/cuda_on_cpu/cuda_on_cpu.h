// Runs CUDA C kernels on the CPU, for the tests of a machine without a GPU.
//
// The kernel source is compiled by g++ as C++ after this header (module.py does that; it rewrites each
// `extern __shared__ T name[];` into a pointer to the block's dynamic shared memory and each static
// __shared__ declaration in a function into a reference to the block's own copy, both full of garbage at the
// block's start, and turns inline PTX into a recorded call). A launch runs the grid in a random block order,
// a few blocks at a time (`in_flight`); every thread of the blocks in flight is a coroutine (ucontext) on one
// OS thread, so that __syncthreads and the warp shuffles are real rendezvous points: a thread waits there
// until every thread of its block (or warp) that has not exited arrives. Threads switch only at those points
// and before every atomic, and the next thread, of any block in flight, is drawn at random (seeded), so a
// test meets many interleavings: a missing __syncthreads or a lost atomicCAS race, within a block or between
// blocks, changes a result under some seed. A block whose threads all wait and can never be released (a
// __syncthreads that not every thread reaches) ends the launch with an error instead of hanging, and so does
// an access that faults (SIGSEGV or SIGBUS: an address far outside every buffer; one just past a buffer reads
// or writes the host heap unnoticed, so the tests fill unwritten memory with garbage, put guard bytes after
// device arrays (module.DeviceHeap) and after the dynamic shared memory, and compare whole results).
//
// What this does not model: the memory model (every write is seen at once, and plain loads and stores are
// never interleaved with another thread's: only atomics and barriers are switch points, so a spin loop on a
// plain load never ends), timing, occupancy, register and shared-memory limits other than the dynamic size
// asked for, and what inline PTX does: an `asm` statement with inputs only is recorded, with its template,
// the thread and its input values, in a log that the tests read (e.g. which addresses a prefetch kernel
// touched); one with outputs is refused at compile time.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <random>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

namespace cuda_on_cpu {

enum State { RUNNABLE, WAITING, DONE };

struct Barrier {
    int expected = 0, arrived = 0;
    std::vector<int> waiting;  // thread slots
};

struct Block;

struct Thread {
    ucontext_t ctx;
    dim3 idx;
    int linear = 0;  // within its block
    Block* blk = nullptr;
    State state = DONE;
};

// A block in flight: its barriers, shuffle exchange, dynamic and static shared memory.
struct Block {
    dim3 idx;
    int first = 0;  // its first thread slot
    int running = 0;  // threads not yet exited
    Barrier barrier;
    std::vector<Barrier> warps;
    std::vector<unsigned long long> exchange;  // one word per thread, for the warp shuffles
    std::vector<unsigned char> dynamic_smem;
    std::map<std::string, std::vector<unsigned char>> shared;  // static __shared__ variables, by declaration
};

struct Launch {
    dim3 grid, block;
    int nthreads = 0;  // per block
    std::vector<Thread> threads;  // slots: block slot j holds threads [j * nthreads, (j + 1) * nthreads)
    std::vector<Block> blocks;  // blocks in flight, by slot
    std::function<void()> body;
    ucontext_t scheduler;
    std::mt19937_64 rng;
    int current = 0;  // thread slot
    std::string error;
};

inline Launch* L = nullptr;  // the launch in progress (one at a time)
inline sigjmp_buf fault_exit;  // where a faulting access goes back to (launch)
inline volatile sig_atomic_t fault_signal = 0;
constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t SMEM_GUARD = 4096;  // bytes after the dynamic shared memory, checked after each block
constexpr unsigned char SMEM_GUARD_BYTE = 0xA5;
inline std::vector<char*> stacks;  // reused across launches

inline Thread& me() { return L->threads[L->current]; }
inline Block& my_block() { return *me().blk; }

struct PtxRecord {
    const char* instruction;  // the asm template (a string literal)
    dim3 block, thread;
    std::vector<unsigned long long> inputs;
};
inline std::vector<PtxRecord> ptx_log;  // the last launch's inline PTX, in execution order

inline void ptx(const char* instruction, std::initializer_list<unsigned long long> inputs) {
    ptx_log.push_back(PtxRecord{instruction, my_block().idx, me().idx, std::vector<unsigned long long>(inputs)});
}

// Back to the scheduler; the caller set its own state first.
inline void switch_out() { swapcontext(&me().ctx, &L->scheduler); }

inline void yield_point() { switch_out(); }

inline void release(Barrier& b) {
    for (int t : b.waiting) L->threads[t].state = RUNNABLE;
    b.waiting.clear();
    b.arrived = 0;
}

inline void arrive_and_wait(Barrier& b) {
    if (++b.arrived == b.expected) {
        release(b);
        switch_out();  // let another thread run first: the order after a barrier is random too
        return;
    }
    b.waiting.push_back(L->current);
    me().state = WAITING;
    switch_out();
}

inline void drop(Barrier& b) {  // an exited thread no longer takes part
    --b.expected;
    if (b.arrived > 0 && b.arrived == b.expected) release(b);
}

inline int warp_of(int linear) { return linear / 32; }

inline void entry() {
    L->body();
    Thread& t = me();
    t.state = DONE;
    drop(t.blk->barrier);
    drop(t.blk->warps[warp_of(t.linear)]);
    --t.blk->running;
    switch_out();
}

// A static __shared__ variable of the current block (module.py rewrites each declaration into a reference
// to this): made, full of garbage, by the block's first thread to reach the declaration.
inline void* block_shared(const char* key, size_t n) {
    auto& mem = my_block().shared[key];
    if (mem.empty()) mem.assign(n ? n : 1, 0xEE);
    return mem.data();  // 16-byte aligned (operator new)
}

inline unsigned char* dynamic_shared_memory() { return my_block().dynamic_smem.data(); }

// Block slot j takes block number b (x fastest) with fresh threads, barriers and shared memory.
inline void start_block(int j, unsigned long long b, unsigned long long smem) {
    Block& blk = L->blocks[j];
    const int n = L->nthreads;
    const dim3 g = L->grid;
    blk.idx = dim3{(unsigned)(b % g.x), (unsigned)((b / g.x) % g.y), (unsigned)(b / ((unsigned long long)g.x * g.y))};
    blk.first = j * n;
    blk.running = n;
    blk.barrier = Barrier{n, 0, {}};
    blk.warps.assign((n + 31) / 32, Barrier());
    for (size_t w = 0; w < blk.warps.size(); ++w) blk.warps[w].expected = std::min(32, n - 32 * (int)w);
    blk.exchange.assign(n, 0);
    // garbage: a read before a write shows up; then a guard that a write past the end changes
    blk.dynamic_smem.assign(smem + SMEM_GUARD, 0xEE);
    std::memset(blk.dynamic_smem.data() + smem, SMEM_GUARD_BYTE, SMEM_GUARD);
    blk.shared.clear();
    for (int t = 0; t < n; ++t) {
        Thread& th = L->threads[blk.first + t];
        th.linear = t;
        th.blk = &blk;
        th.state = RUNNABLE;
        th.idx.x = t % L->block.x;
        th.idx.y = (t / L->block.x) % L->block.y;
        th.idx.z = t / (L->block.x * L->block.y);
        getcontext(&th.ctx);
        th.ctx.uc_stack.ss_sp = stacks[blk.first + t];
        th.ctx.uc_stack.ss_size = STACK_BYTES;
        th.ctx.uc_link = nullptr;
        makecontext(&th.ctx, entry, 0);
    }
}

inline bool smem_guard_intact(const Block& blk, unsigned long long smem) {
    for (size_t i = smem; i < smem + SMEM_GUARD; ++i) {
        if (blk.dynamic_smem[i] != SMEM_GUARD_BYTE) {
            char msg[256];
            std::snprintf(msg, sizeof msg,
                          "block (%u,%u,%u) wrote dynamic shared memory at byte %zu, past the %llu bytes the "
                          "launch asked for",
                          blk.idx.x, blk.idx.y, blk.idx.z, i, smem);
            L->error = msg;
            return false;
        }
    }
    return true;
}

// The grid, in a random block order, `in_flight` blocks at a time: every thread of every block in flight is
// a coroutine, and a random runnable one runs next. A block slot that finishes takes the next block.
inline bool run_grid(unsigned long long smem, int in_flight) {
    const unsigned long long nblocks = (unsigned long long)L->grid.x * L->grid.y * L->grid.z;
    std::vector<unsigned long long> order(nblocks);
    for (unsigned long long b = 0; b < nblocks; ++b) order[b] = b;
    std::shuffle(order.begin(), order.end(), L->rng);
    const int slots = (int)std::min<unsigned long long>(nblocks, (unsigned long long)std::max(in_flight, 1));
    const int total = slots * L->nthreads;
    while ((int)stacks.size() < total) stacks.push_back(static_cast<char*>(std::malloc(STACK_BYTES)));
    L->threads.assign(total, Thread());
    L->blocks.clear();
    L->blocks.resize(slots);  // never resized again: threads point into it
    unsigned long long next = 0;
    std::vector<bool> busy(slots, false);
    for (int j = 0; j < slots; ++j, ++next) {
        start_block(j, order[next], smem);
        busy[j] = true;
    }
    std::vector<int> runnable;
    runnable.reserve(total);
    while (true) {
        for (int j = 0; j < slots; ++j) {
            if (!busy[j] || L->blocks[j].running > 0) continue;
            if (!smem_guard_intact(L->blocks[j], smem)) return false;
            busy[j] = next < nblocks;
            if (busy[j]) start_block(j, order[next++], smem);
        }
        runnable.clear();
        for (int t = 0; t < total; ++t)
            if (L->threads[t].state == RUNNABLE) runnable.push_back(t);
        if (runnable.empty()) {
            for (int j = 0; j < slots; ++j) {
                if (!busy[j]) continue;
                const Block& blk = L->blocks[j];
                int waiting = 0;
                for (int t = 0; t < L->nthreads; ++t) waiting += L->threads[blk.first + t].state == WAITING;
                const int at_barrier = (int)blk.barrier.waiting.size();
                char msg[256];
                std::snprintf(msg, sizeof msg,
                              "deadlock in block (%u,%u,%u): %d of %d threads wait at __syncthreads, %d at a warp "
                              "shuffle, the rest exited",
                              blk.idx.x, blk.idx.y, blk.idx.z, at_barrier, L->nthreads, waiting - at_barrier);
                L->error = msg;
                return false;
            }
            return true;  // every block done
        }
        L->current = runnable[L->rng() % runnable.size()];
        swapcontext(&L->scheduler, &L->threads[L->current].ctx);
    }
}

template <typename T>
constexpr int param_kind() {  // 0 pointer, 1 signed integer, 2 unsigned integer, 3 floating point
    return std::is_pointer_v<T> ? 0 : std::is_floating_point_v<T> ? 3 : std::is_signed_v<T> ? 1 : 2;
}

template <typename... A>
int params(void (*)(A...), int* sizes, int* kinds, int max) {
    constexpr int n = sizeof...(A);
    if (n <= max) {
        int i = 0;
        ((sizes[i] = (int)sizeof(std::decay_t<A>), kinds[i] = param_kind<std::decay_t<A>>(), ++i), ...);
    }
    return n;
}

template <typename... A, size_t... I>
std::tuple<std::decay_t<A>...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<std::decay_t<A>...>(*static_cast<std::decay_t<A>*>(args[I])...);
}

template <typename... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, unsigned long long smem, void** args,
           unsigned long long seed, int in_flight, char* err, int errlen) {
    Launch launch;
    launch.grid = dim3{grid[0], grid[1], grid[2]};
    launch.block = dim3{block[0], block[1], block[2]};
    launch.nthreads = (int)(block[0] * block[1] * block[2]);
    launch.rng.seed(seed);
    auto values = unpack<A...>(args, std::index_sequence_for<A...>{});
    ptx_log.clear();
    launch.body = [&]() { std::apply(kernel, values); };
    L = &launch;
    static char alt_stack[64 * 1024];
    stack_t alt{}, old_alt{};
    alt.ss_sp = alt_stack;
    alt.ss_size = sizeof alt_stack;
    sigaltstack(&alt, &old_alt);
    struct sigaction sa{}, old_segv{}, old_bus{};
    sa.sa_handler = [](int sig) {
        fault_signal = sig;
        siglongjmp(fault_exit, 1);
    };
    sa.sa_flags = SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    bool ok;
    fault_signal = 0;
    if (sigsetjmp(fault_exit, 1) == 0) {
        ok = run_grid(smem, in_flight);
    } else {
        ok = false;
        const Thread& t = launch.threads[launch.current];
        const dim3 b = t.blk->idx;
        char msg[256];
        std::snprintf(msg, sizeof msg, "illegal memory access (%s) in block (%u,%u,%u) thread (%u,%u,%u)",
                      fault_signal == SIGBUS ? "SIGBUS" : "SIGSEGV", b.x, b.y, b.z, t.idx.x, t.idx.y, t.idx.z);
        launch.error = msg;
    }
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
    L = nullptr;
    if (!ok) std::snprintf(err, errlen, "%s", launch.error.c_str());
    return ok ? 0 : 1;
}

template <typename T>
T atomic_op(T* a, T v, int op) {
    yield_point();  // another thread may act between this thread's last read and its atomic
    T old = *a;
    switch (op) {
        case 0: *a = old + v; break;
        case 1: *a = old - v; break;
        case 2: *a = v; break;
        case 3: *a = v < old ? v : old; break;
        case 4: *a = v > old ? v : old; break;
    }
    return old;
}

template <typename T>
T atomic_cas(T* a, T compare, T v) {
    yield_point();
    T old = *a;
    if (old == compare) *a = v;
    return old;
}

template <typename T>
T shuffle(T v, int src_lane, bool keep_own) {  // every lane of the warp must call it (full mask)
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    Thread& t = me();
    Block& blk = *t.blk;
    const int w = warp_of(t.linear);
    unsigned long long raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    blk.exchange[t.linear] = raw;
    arrive_and_wait(blk.warps[w]);
    T out = v;
    const int src = 32 * w + src_lane;
    if (!keep_own && src_lane >= 0 && src_lane < 32 && src < L->nthreads) {
        raw = blk.exchange[src];
        std::memcpy(&out, &raw, sizeof(T));
    }
    arrive_and_wait(blk.warps[w]);  // nobody overwrites the exchange before every lane has read it
    return out;
}

// The lanes of this thread's warp, in ``mask``, that have not exited and whose exchanged word satisfies
// ``pick(word)``, as a lane mask (a warp vote: every lane that has not exited must call it).
template <typename Pick>
unsigned warp_vote(unsigned long long raw, unsigned mask, Pick pick) {
    Thread& t = me();
    Block& blk = *t.blk;
    const int w = warp_of(t.linear);
    blk.exchange[t.linear] = raw;
    arrive_and_wait(blk.warps[w]);
    unsigned out = 0;
    for (int lane = 0; lane < 32; ++lane) {
        const int src = 32 * w + lane;
        if (src < L->nthreads && ((mask >> lane) & 1u) && L->threads[blk.first + src].state != DONE &&
            pick(blk.exchange[src]))
            out |= 1u << lane;
    }
    arrive_and_wait(blk.warps[w]);  // nobody overwrites the exchange before every lane has read it
    return out;
}

}  // namespace cuda_on_cpu

// ---- the CUDA C names

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define warpSize 32

#define threadIdx (cuda_on_cpu::me().idx)
#define blockIdx (cuda_on_cpu::my_block().idx)
#define blockDim (cuda_on_cpu::L->block)
#define gridDim (cuda_on_cpu::L->grid)

inline void __syncthreads() { cuda_on_cpu::arrive_and_wait(cuda_on_cpu::my_block().barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    cuda_on_cpu::arrive_and_wait(cuda_on_cpu::my_block().warps[cuda_on_cpu::warp_of(cuda_on_cpu::me().linear)]);
}

// `width` (a power of two <= 32) splits the warp into segments, as on the GPU: lanes read within their own.
template <typename T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
    const int lane = cuda_on_cpu::me().linear % 32, seg = lane & ~(width - 1);
    return cuda_on_cpu::shuffle(v, seg + (src & (width - 1)), false);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
    const int lane = cuda_on_cpu::me().linear % 32;
    return cuda_on_cpu::shuffle(v, lane - (int)d, (lane & (width - 1)) < (int)d);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
    const int lane = cuda_on_cpu::me().linear % 32;
    return cuda_on_cpu::shuffle(v, lane + (int)d, (lane & (width - 1)) + (int)d >= width);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m, int width = 32) {
    const int lane = cuda_on_cpu::me().linear % 32, src = lane ^ m;
    return cuda_on_cpu::shuffle(v, src, (src & ~(width - 1)) != (lane & ~(width - 1)));
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    return cuda_on_cpu::warp_vote(pred != 0, mask, [](unsigned long long w) { return w != 0; });
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {  // the lanes holding the same 32- or 64-bit value as this one
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync of a 32- or 64-bit value");
    unsigned long long raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    return cuda_on_cpu::warp_vote(raw, mask, [raw](unsigned long long w) { return w == raw; });
}

#define CUDA_ON_CPU_ATOMICS(T)                                                          \
    inline T atomicAdd(T* a, T v) { return cuda_on_cpu::atomic_op<T>(a, v, 0); }        \
    inline T atomicSub(T* a, T v) { return cuda_on_cpu::atomic_op<T>(a, v, 1); }        \
    inline T atomicExch(T* a, T v) { return cuda_on_cpu::atomic_op<T>(a, v, 2); }       \
    inline T atomicMin(T* a, T v) { return cuda_on_cpu::atomic_op<T>(a, v, 3); }        \
    inline T atomicMax(T* a, T v) { return cuda_on_cpu::atomic_op<T>(a, v, 4); }        \
    inline T atomicCAS(T* a, T c, T v) { return cuda_on_cpu::atomic_cas<T>(a, c, v); }
CUDA_ON_CPU_ATOMICS(int)
CUDA_ON_CPU_ATOMICS(unsigned int)
CUDA_ON_CPU_ATOMICS(unsigned long long)
inline float atomicAdd(float* a, float v) { return cuda_on_cpu::atomic_op<float>(a, v, 0); }
inline double atomicAdd(double* a, double v) { return cuda_on_cpu::atomic_op<double>(a, v, 0); }

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
struct __attribute__((aligned(16))) longlong2 {  // CUDA's vector type (read whole by __ldg)
    long long x, y;
};
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
inline int __ffs(int v) { return __builtin_ffs(v); }
