"""Parallel CPU baseline: a sample sort.

Keys (in their own dtype) are split by >= ``4 * threads`` (a power of two) splitters taken from a sorted sample,
scattered into buckets in parallel (numba: a branch-free search of the splitters, per-chunk histograms + prefix
sums), and each bucket is sorted in place by numpy's ``ndarray.sort`` on a thread pool (it releases the GIL;
numba's own quicksort is many times slower than numpy's SIMD sort). A descending sort scatters into mirrored
positions and sorts each bucket through a reversed view. Ties with a splitter all land in one bucket, so
few-unique inputs balance worse (all-equal inputs degenerate to one serial sort of equal keys). Thread count:
``numba.get_num_threads()``, recorded by the bench.

Key-value (:func:`argsort`, a stable argsort like the bench's ``--kv``) sorts order-preserving unsigned keys
(keys.py, transformed in parallel by numba): 32-bit keys are packed with their row
index into one uint64 (``key << 32 | row``), so the same sample sort orders by key and then by row (stable, in
both orders since descending flips the key, not the row); int64 keys carry their rows through the partition and
each bucket is argsorted stably by numpy.
"""
from __future__ import annotations

import numpy as np

from gpulab.sort import keys as K

_jit = {}


def _build():
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def to_key32(x, code, desc):
        n = x.shape[0]
        out = np.empty(n, dtype=np.uint32)
        for i in prange(n):
            b = x[i]
            if code == 1:
                k = b ^ np.uint32(0x80000000)
            elif code == 2:
                if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    k = np.uint32(0xFFFFFFFF)
                elif b == np.uint32(0x80000000):
                    k = np.uint32(0x80000000)
                elif b & np.uint32(0x80000000):
                    k = ~b
                else:
                    k = b | np.uint32(0x80000000)
            else:
                k = b
            out[i] = ~k if desc else k
        return out

    @njit(parallel=True, cache=True)
    def from_key32(k, code, desc):
        n = k.shape[0]
        out = np.empty(n, dtype=np.uint32)
        for i in prange(n):
            b = ~k[i] if desc else k[i]
            if code == 1:
                b = b ^ np.uint32(0x80000000)
            elif code == 2:
                b = (b ^ np.uint32(0x80000000)) if (b & np.uint32(0x80000000)) else ~b
            out[i] = b
        return out

    @njit(parallel=True, cache=True)
    def key64(x, desc):  # int64 <-> uint64 (its own inverse)
        n = x.shape[0]
        out = np.empty(n, dtype=np.uint64)
        for i in prange(n):
            k = x[i] ^ np.uint64(0x8000000000000000)
            out[i] = ~k if desc else k
        return out

    @njit(cache=True)
    def splitter_tree(k, nthreads):
        """(tree, levels): nb - 1 = 2^levels - 1 splitters (nb >= 4 * nthreads buckets) from a sorted sample of
        about 64 keys a bucket, in Eytzinger order (tree[1] the median, the children of j at 2j and 2j + 1)."""
        n = k.shape[0]
        nb, levels = 4, 2
        while nb < 4 * nthreads:
            nb *= 2
            levels += 1
        sample = np.sort(k[::max(1, n // (nb * 64))])
        tree = np.empty(nb, dtype=k.dtype)  # tree[0] unused
        for j in range(1, nb):
            d = 0
            while (j >> (d + 1)) > 0:
                d += 1
            rank = (2 * (j - (1 << d)) + 1) * (1 << (levels - 1 - d)) - 1  # in-order rank of node j
            tree[j] = sample[(rank + 1) * sample.shape[0] // nb]
        return tree, levels

    @njit(parallel=True, cache=True)
    def buckets(k, nthreads):
        """Bucket of each key (the number of splitters <= key; NaN keys in the last bucket, where numpy orders
        them), each chunk's write offsets and the bucket starts. The search walks the Eytzinger tree with an
        index update and no branch (a branching binary search mispredicts about once a level: it took 6 ns a key,
        this one 1.5 ns at 8 buckets on the development machine)."""
        n = k.shape[0]
        tree, levels = splitter_tree(k, nthreads)
        nb = tree.shape[0]
        nchunks = 4 * nthreads
        counts = np.zeros((nchunks, nb), dtype=np.int64)
        bucket = np.empty(n, dtype=np.uint16)  # nb <= 2^16: up to 16,384 threads
        for c in prange(nchunks):
            lo, hi = c * n // nchunks, (c + 1) * n // nchunks
            cnt = np.zeros(nb, dtype=np.int64)
            for i in range(lo, hi):
                key = k[i]
                j = 1
                for _ in range(levels):
                    j = 2 * j + np.int64(tree[j] <= key)
                b = j - nb
                if key != key:  # NaN (never true for integer keys)
                    b = nb - 1
                bucket[i] = b
                cnt[b] += 1
            counts[c, :] = cnt
        offsets = np.zeros((nchunks, nb), dtype=np.int64)
        starts = np.zeros(nb + 1, dtype=np.int64)
        pos = 0
        for b in range(nb):
            starts[b] = pos
            for c in range(nchunks):
                offsets[c, b] = pos
                pos += counts[c, b]
        starts[nb] = pos
        return bucket, offsets, starts

    @njit(parallel=True, cache=True)
    def partition(k, nthreads, mirror):
        """Keys scattered into their buckets, bucket b at [starts[b], starts[b + 1]); with ``mirror`` each
        position p is written at n - 1 - p instead (bucket b at [n - starts[b + 1], n - starts[b]): a
        descending sort's layout)."""
        n = k.shape[0]
        bucket, offsets, starts = buckets(k, nthreads)
        nchunks = offsets.shape[0]
        out = np.empty_like(k)
        for c in prange(nchunks):
            lo, hi = c * n // nchunks, (c + 1) * n // nchunks
            off = offsets[c].copy()
            for i in range(lo, hi):
                b = bucket[i]
                out[n - 1 - off[b] if mirror else off[b]] = k[i]
                off[b] += 1
        return out, starts

    @njit(parallel=True, cache=True)
    def gather_rows(k, nthreads):  # row indices in bucket order (input order within a bucket)
        n = k.shape[0]
        bucket, offsets, starts = buckets(k, nthreads)
        nchunks = offsets.shape[0]
        rows = np.empty(n, dtype=np.int64)
        for c in prange(nchunks):
            lo, hi = c * n // nchunks, (c + 1) * n // nchunks
            off = offsets[c].copy()
            for i in range(lo, hi):
                b = bucket[i]
                rows[off[b]] = i
                off[b] += 1
        return rows, starts

    @njit(parallel=True, cache=True)
    def pack_rows(k):  # uint32 keys -> (key << 32) | row
        n = k.shape[0]
        out = np.empty(n, dtype=np.uint64)
        for i in prange(n):
            out[i] = (np.uint64(k[i]) << np.uint64(32)) | np.uint64(i)
        return out

    @njit(parallel=True, cache=True)
    def unpack_rows(p):
        n = p.shape[0]
        keys = np.empty(n, dtype=np.uint32)
        rows = np.empty(n, dtype=np.int64)
        for i in prange(n):
            keys[i] = np.uint32(p[i] >> np.uint64(32))
            rows[i] = np.int64(p[i] & np.uint64(0xFFFFFFFF))
        return keys, rows

    _jit.update(to_key32=to_key32, from_key32=from_key32, key64=key64, partition=partition,
                pack_rows=pack_rows, unpack_rows=unpack_rows, gather_rows=gather_rows,
                get_num_threads=numba.get_num_threads)


def threads() -> int:
    if not _jit:
        _build()
    return int(_jit["get_num_threads"]())


def sample_sort(k: np.ndarray, nthreads: int, desc: bool = False) -> np.ndarray:
    """Sorted copy of ``k`` (ascending; with ``desc`` its reverse): numba partition, then numpy sorts of the
    buckets in threads (a descending bucket sorts through a reversed view of its mirrored region)."""
    n = k.shape[0]
    if n < 65536 or nthreads < 2:
        s = np.sort(k)
        return s[::-1].copy() if desc else s
    from concurrent.futures import ThreadPoolExecutor

    out, starts = _jit["partition"](k, nthreads, desc)

    def sort_bucket(b: int) -> None:
        lo, hi = int(starts[b]), int(starts[b + 1])
        if desc:
            out[n - hi:n - lo][::-1].sort()
        else:
            out[lo:hi].sort()

    with ThreadPoolExecutor(max_workers=nthreads) as pool:
        list(pool.map(sort_bucket, range(starts.shape[0] - 1)))
    return out


def _ordered_keys(x: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray, bool, int | None]:
    """(contiguous x, its order-preserving unsigned keys, desc, 32-bit dtype code or None for int64)."""
    K.check_array(x)
    desc = K.check_order(order)
    name = K.dtype_name(x)
    if not _jit:
        _build()
    x = np.ascontiguousarray(x)  # check_array refused byte-swapped arrays: numba reads native ones only
    if name == "int64":
        return x, _jit["key64"](x.view(np.uint64), desc), desc, None
    code = K.DTYPE_CODE[name]
    return x, _jit["to_key32"](x.view(np.uint32), code, desc), desc, code


def sort(x: np.ndarray, order: str = "asc") -> np.ndarray:
    """Sorted copy of ``x`` (numpy semantics, see reference.py) using all numba threads. Keys are partitioned
    in their own dtype (numba compares them as numpy does; NaN goes to the last bucket), so no key transform
    pass is needed."""
    K.check_array(x)
    desc = K.check_order(order)
    if not _jit:
        _build()
    return sample_sort(np.ascontiguousarray(x), threads(), desc)


def argsort(x: np.ndarray, order: str = "asc") -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, stable argsort as int64 rows) of ``x`` (reference.argsort semantics), on all numba threads."""
    from gpulab.sort import reference as ref

    K.check_array(x)  # first: a list has no .ndim (an AttributeError, not the one-line InputError)
    K.check_order(order)
    x = np.ascontiguousarray(x)
    nthreads = threads()
    if x.shape[0] < 65536 or nthreads < 2:
        p = ref.argsort(x, order)
        return x[p], p
    x, k, desc, code = _ordered_keys(x, order)
    if code is None:
        rows, starts = _jit["gather_rows"](k, nthreads)

        def bucket(b: int) -> None:
            r = rows[starts[b]:starts[b + 1]]
            r[:] = r[np.argsort(k[r], kind="stable")]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            list(pool.map(bucket, range(starts.shape[0] - 1)))
        return x[rows], rows
    if x.shape[0] >= 2**32:
        raise ValueError("cpu-parallel key-value sort packs row indices into 32 bits: n must be < 2^32")
    keys, rows = _jit["unpack_rows"](sample_sort(_jit["pack_rows"](k), nthreads))
    return _jit["from_key32"](keys, code, desc).view(x.dtype), rows
