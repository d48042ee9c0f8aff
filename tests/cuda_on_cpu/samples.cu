// Small kernels that exercise the CPU emulation (test_emulator.py): each uses one CUDA feature whose
// emulation could be wrong, and two are wrong on purpose (a missing __syncthreads, a deadlock).

#define N_WARPS_MAX 32

// Block-wide inclusive prefix sum through warp shuffles and shared memory, plus one atomicAdd per block
// for the block's base in a global running total: out[i] = base + inclusive sum within the block.
extern "C" __global__ void block_scan(const unsigned* in, unsigned long long* out, unsigned n,
                                      unsigned long long* total) {
    __shared__ unsigned long long warp_sums[N_WARPS_MAX];
    __shared__ unsigned long long base;
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    unsigned long long v = i < n ? in[i] : 0ull;
    for (int d = 1; d < 32; d <<= 1) {
        unsigned long long up = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += up;
    }
    if (lane == 31) warp_sums[wid] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long run = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
            unsigned long long s = warp_sums[w];
            warp_sums[w] = run;
            run += s;
        }
        base = atomicAdd(total, run);
    }
    __syncthreads();
    if (i < n) out[i] = base + warp_sums[wid] + v;
}

// Reverses each block's slice through dynamic shared memory; `sync` = 0 leaves out the __syncthreads
// between the writes and the reads (a race the emulation must be able to show).
extern "C" __global__ void reverse_tiles(const int* in, int* out, int sync) {
    extern __shared__ __align__(16) int tile[];
    const unsigned t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    tile[t] = in[i];
    if (sync) __syncthreads();
    out[i] = tile[blockDim.x - 1 - t];
}

// Inserts keys into a linear-probing table with atomicCAS (0 marks an empty slot; keys are > 0); every thread
// inserts one key, many of them equal, so that threads race for the same slots.
extern "C" __global__ void cas_insert(const int* keys, int n, int* table, unsigned cap, int* hits) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int k = keys[i];
    unsigned s = (unsigned)k % cap;
    while (true) {
        int prev = atomicCAS(&table[s], 0, k);
        if (prev == 0 || prev == k) break;
        s = (s + 1) % cap;
    }
    atomicAdd(&hits[s], 1);
}

// Half of a warp waits at __syncthreads while the other half waits at a shuffle: neither can go on.
extern "C" __global__ void deadlock(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_sync(0xffffffffu, v, 0);
    out[threadIdx.x] = v;
}

// Threads that exit early do not hold the others at a later __syncthreads (as on Volta and later GPUs).
extern "C" __global__ void early_exit(int* out, int keep) {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    if ((int)threadIdx.x >= keep) return;
    atomicAdd(&count, 1);
    __syncthreads();
    out[threadIdx.x] = count;
}

// The x/y/z thread and block coordinates: out[linear global index] = an encoding of all six.
extern "C" __global__ void coordinates(unsigned* out) {
    const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
    out[b * per_block + t] = (blockIdx.x << 25) | (blockIdx.y << 20) | (blockIdx.z << 15) | (threadIdx.x << 10)
                             | (threadIdx.y << 5) | threadIdx.z;
}

// Thread `bad` writes far outside its buffer (an index off by 2^40 elements): the launch must end with an error.
extern "C" __global__ void wild_write(int* out, int bad) {
    long long i = threadIdx.x;
    if ((int)threadIdx.x == bad) i += 1ll << 40;
    out[i] = 1;
}

// Reads a static shared word before any thread writes it: garbage on a GPU, and in the emulation (not zero).
extern "C" __global__ void read_unwritten_shared(unsigned* out) {
    __shared__ unsigned word;
    __shared__ __align__(16) unsigned words[2][4];
    out[blockIdx.x * 2] = word;
    out[blockIdx.x * 2 + 1] = words[1][3];
    __syncthreads();
    if (threadIdx.x == 0) { word = 7u; words[1][3] = 9u; }
}

// Every shuffle form, at width 32 and 8: out[k * 32 + lane] for k = sync, up, down, xor (values lane * 10).
extern "C" __global__ void shuffles(int* out, int width) {
    const int lane = threadIdx.x, v = lane * 10;
    out[lane] = __shfl_sync(0xffffffffu, v, 3, width);
    out[32 + lane] = __shfl_up_sync(0xffffffffu, v, 2, width);
    out[64 + lane] = __shfl_down_sync(0xffffffffu, v, 2, width);
    out[96 + lane] = __shfl_xor_sync(0xffffffffu, v, 5, width);
}

// Warp votes over 64 threads (two warps), the lanes >= `keep` of the second warp exited first:
// out[t] = __ballot_sync(full, t % 3 == 0); out[64 + t] = __match_any_sync(full, key) with key = (t % 4) << 40
// (a 64-bit value), and out[128 + t] the same over 32-bit keys t % 5.
extern "C" __global__ void votes(unsigned* out, int keep) {
    const int t = threadIdx.x;
    if (t >= 32 + keep) return;
    out[t] = __ballot_sync(0xffffffffu, t % 3 == 0);
    out[64 + t] = __match_any_sync(0xffffffffu, (unsigned long long)(t % 4) << 40);
    out[128 + t] = __match_any_sync(0xffffffffu, (unsigned)(t % 5));
}

// Thread 0 of each block takes the next ticket: out[block] = the position of the block in the run order.
extern "C" __global__ void ticket(int* out, int* next) {
    if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(next, 1);
}

// Thread 0 of each block increments a global counter without an atomic, with a __syncthreads between its
// read and its write: with several blocks in flight, another block may read in between (a lost update).
extern "C" __global__ void racy_count(int* counter) {
    int v = 0;
    if (threadIdx.x == 0) v = *counter;
    __syncthreads();
    if (threadIdx.x == 0) *counter = v + 1;
}
