"""Parallel CPU baseline: a sample sort on the order-preserving unsigned keys (keys.py).

Keys are transformed in parallel (numba), split by >= ``4 * threads`` (a power of two) splitters taken from a sorted
sample, scattered into buckets in parallel (numba: per-chunk histograms + prefix sums), each
bucket sorted in place by numpy's ``ndarray.sort`` on a thread pool (it releases the GIL; numba's
own quicksort is many times slower than numpy's SIMD sort), and transformed back. Ties with a splitter all land in one
bucket, so few-unique inputs balance worse (all-equal inputs degenerate to one serial sort of
equal keys). Thread count: ``numba.get_num_threads()``, recorded by the bench.

Key-value (:func:`argsort`, a stable argsort like the bench's ``--kv``): 32-bit keys are packed with their row
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

    @njit(parallel=True, cache=True)
    def buckets(k, nthreads):
        """Bucket of each key (by splitters from a sorted sample), each chunk's write offsets and bucket starts."""
        n = k.shape[0]
        nb = 4
        while nb < 4 * nthreads:
            nb *= 2
        step = max(1, n // (nb * 64))
        sample = np.sort(k[::step])
        splitters = np.empty(nb - 1, dtype=k.dtype)
        for j in range(nb - 1):
            splitters[j] = sample[(j + 1) * sample.shape[0] // nb]
        nchunks = 4 * nthreads
        counts = np.zeros((nchunks, nb), dtype=np.int64)
        bucket = np.empty(n, dtype=np.int32)
        for c in prange(nchunks):
            lo, hi = c * n // nchunks, (c + 1) * n // nchunks
            for i in range(lo, hi):
                key = k[i]
                b = 0  # branchless binary search: b = number of splitters <= key
                half = nb >> 1
                while half > 0:
                    if splitters[b + half - 1] <= key:
                        b += half
                    half >>= 1
                bucket[i] = b
                counts[c, b] += 1
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
    def partition(k, nthreads):  # keys scattered into their buckets
        n = k.shape[0]
        bucket, offsets, starts = buckets(k, nthreads)
        nchunks = offsets.shape[0]
        out = np.empty_like(k)
        for c in prange(nchunks):
            lo, hi = c * n // nchunks, (c + 1) * n // nchunks
            off = offsets[c].copy()
            for i in range(lo, hi):
                b = bucket[i]
                out[off[b]] = k[i]
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


def sample_sort(k: np.ndarray, nthreads: int) -> np.ndarray:
    """Sorted copy of unsigned keys: numba partition, then numpy sorts of the buckets in threads."""
    if k.shape[0] < 65536 or nthreads < 2:
        return np.sort(k)
    from concurrent.futures import ThreadPoolExecutor

    out, starts = _jit["partition"](k, nthreads)
    with ThreadPoolExecutor(max_workers=nthreads) as pool:
        list(pool.map(lambda b: out[starts[b]:starts[b + 1]].sort(), range(starts.shape[0] - 1)))
    return out


def _ordered_keys(x: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray, bool, int | None]:
    """(contiguous x, its order-preserving unsigned keys, desc, 32-bit dtype code or None for int64)."""
    K.check_array(x)
    desc = K.check_order(order)
    name = K.dtype_name(x)
    if not _jit:
        _build()
    x = np.ascontiguousarray(x)
    if name == "int64":
        return x, _jit["key64"](x.view(np.uint64), desc), desc, None
    code = K.DTYPE_CODE[name]
    return x, _jit["to_key32"](x.view(np.uint32), code, desc), desc, code


def sort(x: np.ndarray, order: str = "asc") -> np.ndarray:
    """Sorted copy of ``x`` (numpy semantics, see reference.py) using all numba threads."""
    x, k, desc, code = _ordered_keys(x, order)
    if code is None:
        return _jit["key64"](sample_sort(k, threads()), desc).view(np.int64)
    return _jit["from_key32"](sample_sort(k, threads()), code, desc).view(x.dtype)


def argsort(x: np.ndarray, order: str = "asc") -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, stable argsort as int64 rows) of ``x`` (reference.argsort semantics), on all numba threads."""
    from gpulab.sort import reference as ref

    K.check_array(x)  # first: a list has no .ndim (an AttributeError, not the one-line InputError)
    K.check_order(order)
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
