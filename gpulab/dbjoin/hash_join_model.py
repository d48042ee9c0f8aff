"""A CPU model of hash_join.cu, kernel by kernel, compiled with numba (``hash-cpu`` in the bench).

Each ``_k_*`` function is one CUDA kernel with its thread loop written out; atomics become plain
read-modify-writes because the threads run one after another. It runs the same table layout
(capacity, fastrange home slot, linear probing, murmur3 finalizers, keys stored XOR the empty marker so
that an all-zero table (the host's one memset) is empty, the extra slot for keys equal to the empty
marker, the duplicated-key counter that lets the grouping kernels return at once for unique build keys,
grouped runs for duplicate build keys, block-aggregated output reservation with a checked capacity and
re-run), so tests on this machine exercise the algorithm and its corner cases; the CUDA source itself
is compiled by nvcc in the tests and run against pandas on a GPU.
"""
from __future__ import annotations

import numpy as np

from gpulab.dbjoin.hash_join_cuda import BLOCK, table_capacity
from gpulab.dbjoin.reference import JoinResult

EMPTY_I32 = np.int64(np.iinfo(np.int32).min)
EMPTY_I64 = np.int64(np.iinfo(np.int64).min)

_kernels = None


def _compile():
    global _kernels
    if _kernels is not None:
        return _kernels
    from numba import njit

    M32 = np.uint64(0xFFFFFFFF)

    @njit(inline="always")
    def hash32(k):  # murmur3 fmix32 on the low 32 bits
        h = np.uint64(k) & M32
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & M32
        h ^= h >> np.uint64(13)
        h = (h * np.uint64(0xC2B2AE35)) & M32
        h ^= h >> np.uint64(16)
        return h

    @njit(inline="always")
    def hash64(k):  # murmur3 fmix64, high half
        h = np.uint64(k)
        h ^= h >> np.uint64(33)
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
        return h >> np.uint64(32)

    @njit(inline="always")
    def home(k, is64, cap):
        h = hash64(k) if is64 else hash32(k)
        return np.int64((h * np.uint64(cap)) >> np.uint64(32))

    @njit(cache=False)
    def k_insert(keys, t_key, t_count, t_row, cap, empty, is64, build_slot, counters):
        for i in range(keys.shape[0]):  # thread i
            k = keys[i]
            if k == empty:
                s = cap
            else:
                ek = k ^ empty  # hj_enc: the stored form, 0 only for the empty marker
                s = home(k, is64, cap)
                while True:
                    cur = t_key[s]
                    if cur == ek:
                        break
                    if cur == 0:  # atomicCAS(&key, 0, ek) succeeds
                        t_key[s] = ek
                        break
                    s = 0 if s + 1 == cap else s + 1
            c = t_count[s]  # atomicAdd(&count, 1)
            t_count[s] = c + 1
            if c == 0:
                t_row[s] = i
            elif c == 1:
                counters[2] += 1  # a second build row of this key: grouping needed
            build_slot[i] = s

    @njit(cache=False)
    def k_group_alloc(build_slot, t_count, t_row, slot_off, counters):
        if counters[2] == 0:  # unique build keys: the kernel returns at once
            return
        for i in range(build_slot.shape[0]):
            s = build_slot[i]
            c = t_count[s]
            if c > 1 and t_row[s] == i:
                slot_off[s] = counters[0]  # atomicAdd(&counters[0], c)
                counters[0] += c

    @njit(cache=False)
    def k_group_scatter(build_slot, t_count, slot_off, grouped, counters):
        if counters[2] == 0:
            return
        for i in range(build_slot.shape[0]):
            s = build_slot[i]
            if t_count[s] > 1:
                grouped[slot_off[s]] = i  # atomicAdd(&slot_off[s], 1)
                slot_off[s] += 1

    @njit(cache=False)
    def k_probe(keys, t_key, t_count, t_row, cap, empty, is64, slot_off, grouped, out_probe, out_build,
                capacity, counter, count_only, block):
        n = keys.shape[0]
        nblocks = max((n + block - 1) // block, 1)
        cs = np.zeros(block, np.int64)
        ss = np.zeros(block, np.int64)
        for b in range(nblocks):  # thread blocks run one after another
            for t in range(block):  # phase 1: every thread finds its slot and match count
                i = b * block + t
                c = 0
                s = 0
                if i < n:
                    k = keys[i]
                    if k == empty:
                        s = cap
                        c = t_count[cap]
                    else:
                        ek = k ^ empty
                        s = home(k, is64, cap)
                        while True:
                            cur = t_key[s]
                            if cur == ek:
                                c = t_count[s]
                                break
                            if cur == 0:
                                break
                            s = 0 if s + 1 == cap else s + 1
                cs[t] = c
                ss[t] = s
            total = 0  # hj_block_reserve: exclusive prefix and one atomicAdd per block
            for t in range(block):
                total += cs[t]
            base = counter[0]
            counter[0] += total
            if count_only:
                continue
            pos = base
            for t in range(block):  # phase 2: write the pairs that fit in capacity
                c = cs[t]
                i = b * block + t
                s = ss[t]
                if c == 1:
                    if pos < capacity:
                        out_probe[pos] = i
                        out_build[pos] = t_row[s]
                elif c > 1:
                    start = slot_off[s] - c
                    for j in range(c):
                        if pos + j >= capacity:
                            break
                        out_probe[pos + j] = i
                        out_build[pos + j] = grouped[start + j]
                pos += c

    _kernels = (k_insert, k_group_alloc, k_group_scatter, k_probe)
    return _kernels


class ModelHashJoin:
    """The hash join of hash_join.cu on the CPU (numba); ``join`` mirrors :class:`CudaHashJoin.join`."""

    def __init__(self, load_factor: float = 0.5, initial_capacity: int | None = None):
        self.load_factor = load_factor
        self.initial_capacity = initial_capacity  # tests force a short first guess to exercise the re-run
        self.retries = 0
        self.last_dup_keys = 0  # counters[2] of the last build: build keys with more than one row

    def join(self, left_key: np.ndarray, right_key: np.ndarray, count_only: bool = False) -> JoinResult:
        k_insert, k_group_alloc, k_group_scatter, k_probe = _compile()
        lk, rk = np.asarray(left_key), np.asarray(right_key)
        is64 = not (lk.dtype == np.int32 and rk.dtype == np.int32)
        empty = EMPTY_I64 if is64 else EMPTY_I32
        lk, rk = lk.astype(np.int64), rk.astype(np.int64)
        swap = len(rk) > len(lk)
        build, probe = (lk, rk) if swap else (rk, lk)
        nb, npr = len(build), len(probe)
        if nb == 0 or npr == 0:
            e = np.empty(0, np.int32)
            return JoinResult(0) if count_only else JoinResult(0, e, e)
        cap = table_capacity(nb, self.load_factor)
        # the one memset of the table and its counters: all zero is an empty table
        t_key = np.zeros(cap + 1, np.int64)
        t_count = np.zeros(cap + 1, np.int32)
        t_row = np.zeros(cap + 1, np.int32)
        counters = np.zeros(3, np.int64)  # [0] grouped rows, [1] unused here (run_probe), [2] duplicated keys
        build_slot = np.empty(nb, np.int64)
        k_insert(build, t_key, t_count, t_row, cap, empty, is64, build_slot, counters)
        slot_off = np.zeros(cap + 1, np.int64)  # not reset on the GPU: only slots with count > 1 are read
        grouped = np.empty(nb, np.int32)
        k_group_alloc(build_slot, t_count, t_row, slot_off, counters)
        k_group_scatter(build_slot, t_count, slot_off, grouped, counters)
        self.last_dup_keys = int(counters[2])

        def run_probe(capacity: int, count_flag: bool):
            out_p, out_b = np.empty(capacity, np.int32), np.empty(capacity, np.int32)
            counter = np.zeros(1, np.int64)
            k_probe(probe, t_key, t_count, t_row, cap, empty, is64, slot_off, grouped, out_p, out_b,
                    capacity, counter, count_flag, BLOCK)
            return int(counter[0]), out_p, out_b

        if count_only:
            return JoinResult(run_probe(0, True)[0])
        capacity = npr if self.initial_capacity is None else self.initial_capacity
        total, out_p, out_b = run_probe(capacity, False)
        if total > capacity:
            self.retries += 1
            total, out_p, out_b = run_probe(total, False)
        out_p, out_b = out_p[:total], out_b[:total]
        return JoinResult(total, out_b, out_p) if swap else JoinResult(total, out_p, out_b)
