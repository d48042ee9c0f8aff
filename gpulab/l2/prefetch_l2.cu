// L2 prefetch kernels for gpulab l2: bring a byte range of weights into the L2 without
// moving it into SM registers or shared memory. Launched on a side stream while the previous
// layer computes. Compiled at run time with NVRTC (gpulab/l2/cuda_l2.py) for the device's
// architecture, and with nvcc -cubin for sm_80 and sm_90 in tests/l2/test_cuda_source.py.
//
// prefetch_l2            : one `prefetch.global.L2` per 128-byte line (sm_70+), grid-stride.
// prefetch_l2_evict_last : the same with the `L2::evict_last` priority hint (sm_80+), so that the
//                          prefetched lines are the last candidates for eviction.
// prefetch_l2_bulk       : `cp.async.bulk.prefetch.L2.global` (sm_90+, the TMA unit), one
//                          instruction per chunk of up to 64 KiB; start and size 16-byte aligned.

#define LINE 128ull

extern "C" __global__ void prefetch_l2(const char* __restrict__ base, unsigned long long nbytes) {
    const unsigned long long lines = (nbytes + LINE - 1) / LINE;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < lines; i += stride) {
        const char* p = base + i * LINE;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p) : "memory");
    }
}

extern "C" __global__ void prefetch_l2_evict_last(const char* __restrict__ base, unsigned long long nbytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    const unsigned long long lines = (nbytes + LINE - 1) / LINE;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < lines; i += stride) {
        const char* p = base + i * LINE;
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p) : "memory");
    }
#endif
}

#define BULK_CHUNK 65536ull

extern "C" __global__ void prefetch_l2_bulk(const char* __restrict__ base, unsigned long long nbytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    // base must be 16-byte aligned; the tail below 16 bytes is covered by rounding the size up
    // (callers pass ranges inside a 256-byte aligned arena whose size is a multiple of 256).
    const unsigned long long total = (nbytes + 15ull) & ~15ull;
    const unsigned long long chunks = (total + BULK_CHUNK - 1) / BULK_CHUNK;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < chunks; i += stride) {
        const unsigned long long off = i * BULK_CHUNK;
        const unsigned long long left = total - off;
        const unsigned int size = (unsigned int)(left < BULK_CHUNK ? left : BULK_CHUNK);
        const char* p = base + off;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(size) : "memory");
    }
#endif
}
