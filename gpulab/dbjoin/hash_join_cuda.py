"""The CUDA C hash join (hash_join.cu) launched through cupy.RawModule; GPU only.

:class:`CudaHashJoin` builds on the smaller table and probes with the other; see hash_join.cu for
the kernels. Inputs are torch or cupy device arrays of int32/int64 keys; the result holds cupy int32
row-index arrays (or only the count). The only host synchronisation is reading the output size.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from gpulab.core.errors import DeviceError, InputError
from gpulab.dbjoin.reference import JoinResult

SOURCE_PATH = Path(__file__).with_name("hash_join.cu")
BLOCK = 256
SLOT_BYTES = 16  # SlotI32 {key, count, row, pad} and SlotI64 {key, count, row}
KERNEL_REGEX = "hj_"


def source() -> str:
    return SOURCE_PATH.read_text()


def table_capacity(n_build: int, load_factor: float) -> int:
    """Slots of the table (without the extra slot for the empty-marker key); < 2^32."""
    if not 0.05 <= load_factor <= 0.95:
        raise InputError(f"--load-factor must be within [0.05, 0.95], got {load_factor}")
    cap = max(int(math.ceil(n_build / load_factor)), 1)
    if cap >= 2**32 - 1:
        raise InputError(f"a hash table of {cap} slots exceeds the 32-bit slot index")
    return cap


@lru_cache(maxsize=1)
def _module():
    try:
        import cupy as cp
    except ImportError:
        raise DeviceError("the CUDA hash join needs cupy (pip install 'gpulab[cuda13]')") from None
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise DeviceError("the CUDA hash join needs a CUDA GPU, and none is visible")
    except cp.cuda.runtime.CUDARuntimeError:
        raise DeviceError("the CUDA hash join needs a CUDA GPU, and none is visible") from None
    return cp.RawModule(code=source(), options=("--std=c++17",))


def _as_cupy(a: Any):
    import cupy as cp

    if isinstance(a, cp.ndarray):
        return a
    if hasattr(a, "__dlpack__") and hasattr(a, "is_cuda"):
        if not a.is_cuda:
            raise InputError("the CUDA hash join needs device arrays (got a CPU tensor)")
        return cp.from_dlpack(a.contiguous())
    return cp.asarray(np.ascontiguousarray(a))


def _grid(n: int) -> tuple[int]:
    return (max((n + BLOCK - 1) // BLOCK, 1),)


class CudaHashJoin:
    """Open-addressing hash join; ``join(left_keys, right_keys)`` -> :class:`JoinResult` of cupy arrays."""

    def __init__(self, load_factor: float = 0.5):
        self.load_factor = load_factor
        self.retries = 0  # probes re-run because the first output capacity was short

    def join(self, left_key: Any, right_key: Any, count_only: bool = False) -> JoinResult:
        mod = _module()  # a DeviceError without cupy or a GPU
        import cupy as cp

        lk, rk = _as_cupy(left_key), _as_cupy(right_key)
        if lk.dtype != rk.dtype:
            lk, rk = lk.astype(cp.int64), rk.astype(cp.int64)
        if lk.dtype not in (cp.int32, cp.int64):
            raise InputError(f"keys must be int32 or int64, got {lk.dtype}")
        suffix = "i32" if lk.dtype == cp.int32 else "i64"
        swap = len(rk) > len(lk)  # build on the smaller side
        build, probe = (lk, rk) if swap else (rk, lk)
        nb, npr = len(build), len(probe)
        if nb == 0 or npr == 0:
            empty = cp.empty(0, cp.int32)
            return JoinResult(0) if count_only else JoinResult(0, empty, empty)
        cap = table_capacity(nb, self.load_factor)
        table = cp.empty((cap + 1) * SLOT_BYTES, dtype=cp.uint8)
        build_slot = cp.empty(nb, cp.int32)
        slot_off = cp.empty(cap + 1, cp.int32)
        grouped = cp.empty(nb, cp.int32)
        counters = cp.zeros(2, cp.uint64)  # [0] grouped rows reserved, [1] output pairs
        ucap = np.uint32(cap)
        mod.get_function(f"hj_fill_{suffix}")(_grid(cap + 1), (BLOCK,), (table, ucap))
        mod.get_function(f"hj_insert_{suffix}")(_grid(nb), (BLOCK,), (build, np.int32(nb), table, ucap, build_slot))
        mod.get_function(f"hj_group_alloc_{suffix}")(_grid(nb), (BLOCK,),
                                                     (np.int32(nb), build_slot, table, slot_off, counters))
        mod.get_function(f"hj_group_scatter_{suffix}")(_grid(nb), (BLOCK,),
                                                       (np.int32(nb), build_slot, table, slot_off, grouped))
        probe_fn = mod.get_function(f"hj_probe_{suffix}")
        counter = counters[1:]

        def run_probe(capacity: int, out_p, out_b, count_flag: int) -> int:
            counter.fill(0)
            probe_fn(_grid(npr), (BLOCK,), (probe, np.int32(npr), table, ucap, slot_off, grouped, out_p, out_b,
                                             np.uint64(capacity), counter, np.int32(count_flag)))
            return int(counter.get()[0])

        if count_only:
            dummy = cp.empty(1, cp.int32)
            return JoinResult(run_probe(0, dummy, dummy, 1))
        capacity = npr  # exact whenever the build keys are unique; otherwise the counter says how many
        out_p, out_b = cp.empty(capacity, cp.int32), cp.empty(capacity, cp.int32)
        total = run_probe(capacity, out_p, out_b, 0)
        if total > capacity:
            check_output_size(total)
            self.retries += 1
            capacity = total
            out_p, out_b = cp.empty(capacity, cp.int32), cp.empty(capacity, cp.int32)
            total = run_probe(capacity, out_p, out_b, 0)
        out_p, out_b = out_p[:total], out_b[:total]
        return JoinResult(total, out_b, out_p) if swap else JoinResult(total, out_p, out_b)


def check_output_size(total: int, limit_bytes: int | None = None) -> None:
    """A one-line error when the pairs (8 bytes each) cannot be materialized."""
    nbytes = total * 8
    if limit_bytes is None:
        try:
            import cupy as cp

            limit_bytes = int(cp.cuda.runtime.memGetInfo()[0] * 0.8)
        except Exception:
            limit_bytes = 1 << 34
    if nbytes > limit_bytes:
        raise InputError(f"the join output has {total} pairs ({nbytes / 2**30:.1f} GiB), more than fits; "
                         "use --count-only")
