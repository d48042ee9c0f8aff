"""The cupy driver of the CUDA C bitonic kernels (``bitonic.cu``): compile once, walk the schedule.

``BitonicCuda().sort(x, variant, order, kv)`` takes a 1-D cupy array of a supported dtype and
returns ``(sorted keys, permutation or None)`` as cupy arrays (the permutation as int64, equal to
the stable argsort). Launches go to cupy's current stream. Needs cupy and a CUDA GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpulab.core.errors import DeviceError, InputError
from gpulab.sort import keys as K
from gpulab.sort.schedule import TILE_CONFIGS, Variant, get_variant, global_groups, next_pow2_log, schedule

SOURCE = Path(__file__).with_name("bitonic.cu")
TRANSFORM_BLOCK = 256


def kernel_names() -> list[str]:
    """Every extern "C" kernel of bitonic.cu (the nvcc test checks they are all in the cubin)."""
    names = [f"bitonic_{d}_key_{b}" for d in ("to", "from") for b in (32, 64)]
    for b in (32, 64):
        for kv in (0, 1):
            names += [f"bitonic_pass_k{b}_kv{kv}_f{f}" for f in (1, 2, 3, 4)]
            names += [f"bitonic_tile_k{b}_kv{kv}_t{t}_f{f}" for t, f in TILE_CONFIGS]
    return names


def tile_smem_bytes(tile_log: int, key_bytes: int, kv: bool) -> int:
    tile = 1 << tile_log
    padded = tile + (tile >> 5)
    return padded * key_bytes + (padded * 4 if kv else 0)


class BitonicCuda:
    """Compiled bitonic.cu (one cupy.RawModule per process)."""

    _module = None

    def __init__(self) -> None:
        try:
            import cupy as cp
        except ImportError:
            raise DeviceError("the CUDA bitonic sorts need cupy (pip install 'gpulab[cuda13]')") from None
        try:
            if cp.cuda.runtime.getDeviceCount() < 1:
                raise DeviceError("the CUDA bitonic sorts need a CUDA GPU, and none is visible")
        except cp.cuda.runtime.CUDARuntimeError:
            raise DeviceError("the CUDA bitonic sorts need a CUDA GPU, and none is visible") from None
        self.cp = cp
        if BitonicCuda._module is None:
            BitonicCuda._module = cp.RawModule(code=SOURCE.read_text(), options=("--std=c++17",))
        self.mod = BitonicCuda._module
        attr = getattr(cp.cuda.runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97)
        self.max_smem = int(cp.cuda.runtime.deviceGetAttribute(attr, cp.cuda.Device().id))
        self._fns: dict[str, object] = {}

    def fn(self, name: str, smem: int = 0):
        f = self._fns.get(name)
        if f is None:
            f = self.mod.get_function(name)
            self._fns[name] = f
        if smem > 48 * 1024 and getattr(f, "max_dynamic_shared_size_bytes", 0) < smem:
            f.max_dynamic_shared_size_bytes = smem
        return f

    def effective_variant(self, variant: Variant, key_bytes: int, kv: bool) -> Variant:
        """The variant with the largest instantiated tile that fits this device's shared memory."""
        if variant.tile_log is None:
            return variant
        options = [t for t, f in TILE_CONFIGS if f == variant.tile_fuse and t <= variant.tile_log]
        for t in sorted(options, reverse=True):
            if tile_smem_bytes(t, key_bytes, kv) <= self.max_smem:
                return Variant(variant.name, t, variant.tile_fuse, variant.global_fuse, variant.block)
        raise DeviceError(f"{variant.name}: no tile fits in {self.max_smem} bytes of shared memory")

    def sort(self, x, variant: str | Variant = "bitonic-fused", order: str = "asc", kv: bool = False):
        cp = self.cp
        v = get_variant(variant) if isinstance(variant, str) else variant
        desc = K.check_order(order)
        if not isinstance(x, cp.ndarray):
            raise InputError(f"expected a cupy array on the GPU, got {type(x).__name__}")
        K.check_array(x)
        name = K.dtype_name(x)
        code = K.DTYPE_CODE[name]
        kdt = K.KEY_DTYPE[name]
        bits = 64 if kdt == np.uint64 else 32
        n = int(x.shape[0])
        if n == 0:
            return x.copy(), (cp.zeros(0, dtype=cp.int64) if kv else None)
        x = cp.ascontiguousarray(x)
        keys = cp.empty(n, dtype=kdt)
        vals = cp.empty(n if kv else 1, dtype=cp.uint32)
        u32n = np.uint32(n)
        grid = (min((n + TRANSFORM_BLOCK - 1) // TRANSFORM_BLOCK, 65535 * 8),)
        self.fn(f"bitonic_to_key_{bits}")(grid, (TRANSFORM_BLOCK,), (x.view(kdt), keys, vals, u32n, np.int32(code),
                                                                    np.int32(desc), np.int32(kv)))
        v = self.effective_variant(v, 8 if bits == 64 else 4, kv)
        smem = tile_smem_bytes(v.tile_log, bits // 8, kv) if v.tile_log else 0
        for launch in schedule(n, v):
            if launch.kind == "global":
                groups = global_groups(n, launch.p_hi, launch.fp)
                f = self.fn(f"bitonic_pass_k{bits}_kv{int(kv)}_f{launch.fp}")
                f(((groups + v.block - 1) // v.block,), (v.block,),
                  (keys, vals, u32n, np.int32(launch.p_hi), np.int32(launch.flip)))
            else:
                f = self.fn(f"bitonic_tile_k{bits}_kv{int(kv)}_t{v.tile_log}_f{v.tile_fuse}", smem)
                tiles = (n + (1 << v.tile_log) - 1) >> v.tile_log
                mode = 0 if launch.kind == "tile_sort" else 1
                f((tiles,), (v.tile_threads,), (keys, vals, u32n, np.int32(mode), np.int32(launch.stage)),
                  shared_mem=smem)
        out = cp.empty(n, dtype=x.dtype)
        self.fn(f"bitonic_from_key_{bits}")(grid, (TRANSFORM_BLOCK,), (keys, out.view(kdt), u32n, np.int32(code),
                                                                      np.int32(desc)))
        return out, (vals.astype(cp.int64) if kv else None)


def launches(n: int, variant: str) -> int:
    """Kernel launches of one sort (schedule + the two key transforms)."""
    return len(schedule(n, variant)) + (2 if n > 0 else 0)


__all__ = ["BitonicCuda", "kernel_names", "launches", "tile_smem_bytes", "next_pow2_log"]
