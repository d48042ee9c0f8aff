"""The join-aggregate as a CUDA hash aggregate (the ``ha_*`` kernels of hash_join.cu, through cupy); GPU only.

The baseline a database would run for ``SELECT key, COUNT(*), SUM(l.payload), SUM(r.payload) FROM l JOIN r
USING (key) GROUP BY key`` (see :mod:`gpulab.dbjoin.aggregate`): one open-addressing table on the smaller
side's keys holds each key's row count and payload sum on both sides (build rows claim and count, probe rows
only count keys that are there), and one pass over the slots writes the keys counted on both sides with
``count = cb * cp`` and the two sums times the other side's count. No pair is ever formed. One memset empties
the table and the group counter; the only host synchronisation is reading the group count.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from gpulab.core.errors import InputError
from gpulab.dbjoin.aggregate import AggResult, _check_mode, check_int32_payload
from gpulab.dbjoin.hash_join_cuda import BLOCK, _as_cupy, _grid, _module, _prepare_keys, table_capacity

AGG_SLOT_BYTES = 32  # AggSlot {key, cnt_b, cnt_p, sum_b, sum_p}
KERNELS = ("build", "probe", "emit")  # ha_<name>_i32 / ha_<name>_i64
KERNEL_REGEX = "ha_"


def table_words(cap: int) -> int:
    """uint64 words of the one allocation: cap + 1 slots (the last for the empty-marker key), then the counter."""
    return (cap + 1) * AGG_SLOT_BYTES // 8 + 1


# argument tuples in the order of the extern "C" signatures (scalars with their exact numpy types)
def _args_count(keys, pay, n, table, cap, sums):
    return (keys, pay, np.int32(n), table, np.uint32(cap), np.int32(sums))


def _args_emit(table, cap, out_key, out_count, out_sum_b, out_sum_p, capacity, counter):
    return (table, np.uint32(cap), out_key, out_count, out_sum_b, out_sum_p, np.uint64(capacity), counter)


@lru_cache(maxsize=4)
def _kernels(suffix: str) -> dict[str, Any]:
    mod = _module()
    return {name: mod.get_function(f"ha_{name}_{suffix}") for name in KERNELS}


class CudaHashAggregate:
    """``aggregate(lk, lp, rk, rp)`` -> :class:`AggResult` of cupy arrays (groups in slot order)."""

    def __init__(self, load_factor: float = 0.5, mode: str = "sum"):
        _check_mode(mode)
        self.load_factor, self.mode = load_factor, mode

    def aggregate(self, lk: Any, lp: Any, rk: Any, rp: Any) -> AggResult:
        _module()  # a DeviceError without cupy or a GPU
        import cupy as cp

        if len(lp) != len(lk) or len(rp) != len(rk):
            raise InputError(f"key and payload lengths differ: left {len(lk)} vs {len(lp)}, right {len(rk)} vs "
                             f"{len(rp)}")
        suffix, swap, bk, pk = _prepare_keys(lk, rk)  # the join's: one key dtype, the build side the smaller
        lp, rp = _as_cupy(lp), _as_cupy(rp)
        check_int32_payload(lp, "left")
        check_int32_payload(rp, "right")
        lp, rp = lp.astype(cp.int32, copy=False), rp.astype(cp.int32, copy=False)
        bp, pp = (lp, rp) if swap else (rp, lp)
        nb, npr = len(bk), len(pk)
        if nb == 0 or npr == 0:
            e = cp.empty(0, cp.int64)
            return AggResult(cp.empty(0, bk.dtype), e) if self.mode == "count" else AggResult(
                cp.empty(0, bk.dtype), e, e, e)
        k = _kernels(suffix)
        cap = table_capacity(nb, self.load_factor)
        table = cp.empty(table_words(cap), cp.uint64)
        counter = table[-1:]
        sums = int(self.mode == "sum")
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memsetAsync(table.data.ptr, 0, table.nbytes, stream.ptr)
        k["build"](_grid(nb), (BLOCK,), _args_count(bk, bp, nb, table, cap, sums))
        k["probe"](_grid(npr), (BLOCK,), _args_count(pk, pp, npr, table, cap, sums))
        capacity = nb  # groups <= distinct build keys <= build rows
        out_key = cp.empty(capacity, bk.dtype)
        out_count, out_b, out_p = (cp.empty(capacity, cp.int64) for _ in range(3))
        k["emit"](_grid(cap + 1), (BLOCK,), _args_emit(table, cap, out_key, out_count, out_b, out_p, capacity,
                                                        counter))
        groups = int(counter.get()[0])
        key, count = out_key[:groups], out_count[:groups]
        if self.mode == "count":
            return AggResult(key, count)
        sum_b, sum_p = out_b[:groups], out_p[:groups]
        return AggResult(key, count, sum_b, sum_p) if swap else AggResult(key, count, sum_p, sum_b)

