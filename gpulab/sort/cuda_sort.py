"""The cupy driver of the CUDA C bitonic kernels (``bitonic.cu``): compile once, walk the schedule.

``BitonicCuda().sort(x, variant, order, kv)`` takes a 1-D cupy array of a supported dtype and
returns ``(sorted keys, permutation or None)`` as cupy arrays (the permutation as int64, equal to
the stable argsort). Launches go to cupy's current stream. Needs cupy and a CUDA GPU.

``sort_host(host_in, host_out, variant, order, chunks, perm_out)`` sorts a host array into a host
array with the copies overlapped: in aligned chunks (``schedule.split_schedule``), each on its own
stream (at most MAX_STREAMS, taken in turn), chunk i's H2D copy, key transform and head run while
chunk i+1 is still being copied; the middle runs over the whole array once every head is done;
then each chunk's tail, inverse transform and D2H copy run while the next chunk's tail computes.
Copies overlap only with pinned host memory; pageable memory gives the same result with less
overlap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpulab.core.errors import DeviceError, InputError
from gpulab.sort import keys as K
from gpulab.sort.schedule import (CONST_STEP_TILES, GLOBAL_FUSES, TILE_CONFIGS, TILE_THREAD_CAPS, Launch, Variant,
                                   chunk_log_for, get_variant, global_groups, next_pow2_log, schedule, split_schedule,
                                   tile_instantiated, transforms_fused)

SOURCE = Path(__file__).with_name("bitonic.cu")
TRANSFORM_BLOCK = 256
MAX_STREAMS = 8  # of the pipelined sort; chunk i runs on stream i % 8 (CUDA's default of 8 hardware queues)


def tile_kernel_name(bits: int, kv: bool, tile_log: int, tile_fuse: int, const_steps: bool = False,
                     threads_max: int = 1024) -> str:
    """bitonic.cu's tile kernel for these keys (and values), tile, constant steps and thread cap."""
    return (f"bitonic_tile_k{bits}_kv{int(kv)}_t{tile_log}_f{tile_fuse}" + ("_c" if const_steps else "")
            + (f"_w{threads_max}" if threads_max < 1024 else ""))


def kernel_names() -> list[str]:
    """Every extern "C" kernel of bitonic.cu (the nvcc test checks they are all in the cubin)."""
    names = [f"bitonic_{d}_key_{b}" for d in ("to", "from") for b in (32, 64)] + ["bitonic_widen_values"]
    for b in (32, 64):
        for kv in (False, True):
            names += [f"bitonic_pass_k{b}_kv{int(kv)}_f{f}" for f in GLOBAL_FUSES]
            names += [tile_kernel_name(b, kv, t, f) for t, f in TILE_CONFIGS if tile_instantiated(t, f, b // 8, kv)]
            names += [tile_kernel_name(b, kv, t, f, const_steps=True) for t, f in CONST_STEP_TILES
                      if tile_instantiated(t, f, b // 8, kv, const_steps=True)]
            names += [tile_kernel_name(b, kv, t, f, threads_max=w) for (t, f), ws in TILE_THREAD_CAPS.items()
                      for w in ws if tile_instantiated(t, f, b // 8, kv, threads_max=w)]
    return names


def transform_grid(n: int) -> tuple[int]:
    """Blocks of the key transforms (grid-stride loops) for n keys."""
    return (min((n + TRANSFORM_BLOCK - 1) // TRANSFORM_BLOCK, 65535 * 8),)


def host_array(x, what: str) -> np.ndarray:
    """A C-contiguous 1-D numpy view of a host array (numpy or a CPU torch tensor), or a one-line InputError."""
    if not isinstance(x, np.ndarray) and hasattr(x, "numpy") and hasattr(x, "is_cuda") and not x.is_cuda:
        x = x.numpy()
    if not isinstance(x, np.ndarray):
        raise InputError(f"{what}: expected a host numpy array or CPU torch tensor, got {type(x).__name__}")
    if x.ndim != 1 or not x.flags.c_contiguous:
        raise InputError(f"{what}: expected a contiguous 1-D array, got shape {tuple(x.shape)}")
    return x


def check_host_args(host_in, host_out, perm_out, chunks: int):
    """(input, output, permutation or None) numpy views of sort_host's host arrays, or a one-line InputError."""
    x = K.check_array(host_array(host_in, "host_in"))
    out = host_array(host_out, "host_out")
    if out.shape != x.shape or out.dtype != x.dtype or not out.flags.writeable:
        raise InputError(f"host_out must be a writable {x.dtype} array of {x.shape[0]}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    perm = None if perm_out is None else host_array(perm_out, "perm_out")
    if perm is not None and (perm.shape != x.shape or perm.dtype != np.uint32 or not perm.flags.writeable):
        raise InputError(f"perm_out must be a writable uint32 array of {x.shape[0]}, got {perm.dtype} "
                         f"{tuple(perm.shape)}")
    if chunks < 1 or chunks & (chunks - 1):
        raise InputError(f"chunks must be a power of two >= 1, got {chunks}")
    return x, out, perm


def tile_smem_bytes(tile_log: int, key_bytes: int, kv: bool) -> int:
    tile = 1 << tile_log
    padded = tile + (tile >> 5)
    return padded * key_bytes + (padded * 4 if kv else 0)


def fit_variant(variant: Variant, key_bytes: int, kv: bool, max_smem: int) -> Variant:
    """The variant itself if bitonic.cu has its tile for these keys (and values) and the tile fits ``max_smem``
    bytes of shared memory, else the largest such tile no larger than its own (its own tile fuse preferred).
    Constant steps and a thread cap stay where that tile has them for these keys, else the same steps run from
    runtime strides, with the tile's own thread count (the same schedule, so the same result)."""
    if variant.tile_log is None:
        return variant
    options = sorted((t for t in TILE_CONFIGS if t[0] <= variant.tile_log and tile_instantiated(*t, key_bytes, kv)),
                     key=lambda t: (t[0], t[1] == variant.tile_fuse, t[1]), reverse=True)
    for t, f in options:
        if tile_smem_bytes(t, key_bytes, kv) <= max_smem:
            const = variant.const_steps and tile_instantiated(t, f, key_bytes, kv, const_steps=True)
            w = variant.tile_threads_max
            w = w if w < 1024 and tile_instantiated(t, f, key_bytes, kv, threads_max=w) else 1024
            return Variant(variant.name, t, f, variant.global_fuse, variant.block, const, w)
    raise DeviceError(f"{variant.name}: no tile fits in {max_smem} bytes of shared memory")


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
        self._streams: list = []

    def fn(self, name: str, smem: int = 0):
        f = self._fns.get(name)
        if f is None:
            f = self.mod.get_function(name)
            self._fns[name] = f
        if smem > 48 * 1024 and getattr(f, "max_dynamic_shared_size_bytes", 0) < smem:
            f.max_dynamic_shared_size_bytes = smem
        return f

    def effective_variant(self, variant: Variant, key_bytes: int, kv: bool) -> Variant:
        """:func:`fit_variant` for this device's opt-in shared memory per block."""
        return fit_variant(variant, key_bytes, kv, self.max_smem)

    def to_key(self, x, keys, vals, code: int, desc: bool, kv: bool, base: int = 0) -> None:
        """Input bits -> unsigned keys (and values = base + index) on the current stream."""
        bits = keys.dtype.itemsize * 8
        n = int(keys.shape[0])
        self.fn(f"bitonic_to_key_{bits}")(transform_grid(n), (TRANSFORM_BLOCK,),
                                          (x.view(keys.dtype), keys, vals, np.uint32(n), np.int32(code),
                                           np.int32(desc), np.int32(kv), np.uint32(base)))

    def from_key(self, keys, out, code: int, desc: bool) -> None:
        """Unsigned keys -> output bits of ``out``'s dtype on the current stream."""
        bits = keys.dtype.itemsize * 8
        n = int(keys.shape[0])
        self.fn(f"bitonic_from_key_{bits}")(transform_grid(n), (TRANSFORM_BLOCK,),
                                            (keys, out.view(keys.dtype), np.uint32(n), np.int32(code), np.int32(desc)))

    def widen(self, vals, out) -> None:
        """uint32 values -> ``out``, the int64 permutation (as many as ``out`` holds), on the current stream."""
        n = int(out.shape[0])
        self.fn("bitonic_widen_values")(transform_grid(n), (TRANSFORM_BLOCK,), (vals, out, np.uint32(n)))

    def launch_all(self, launches: list[Launch], keys, vals, v: Variant, kv: bool, code: int = 0, desc: bool = False,
                   src=None, dst=None, base: int = 0, mark=None) -> None:
        """Run launches on keys (and vals) of their own n: a whole array or one chunk; current stream.

        With ``src`` (input bits, same length) the keys come from it through the key transform (values
        base + index), with ``dst`` the output bits go to it: inside the first / last launch where it is
        a tile launch (schedule.transforms_fused), else by the transform kernels. ``mark(kind)``, if given,
        is called after each launch (kinds: to_key, tile_sort, tile_merge, global_f<F>, from_key).
        """
        mark = mark or (lambda kind: None)
        bits = keys.dtype.itemsize * 8
        n = int(keys.shape[0])
        u32n = np.uint32(n)
        smem = tile_smem_bytes(v.tile_log, bits // 8, kv) if v.tile_log else 0
        fuse_in, fuse_out = transforms_fused(launches)
        if src is not None and not fuse_in:
            self.to_key(src, keys, vals, code, desc, kv, base)
            mark("to_key")
        last = len(launches) - 1
        for i, launch in enumerate(launches):
            if launch.kind == "global":
                groups = global_groups(n, launch.p_hi, launch.fp)
                f = self.fn(f"bitonic_pass_k{bits}_kv{int(kv)}_f{launch.fp}")
                f(((groups + v.block - 1) // v.block,), (v.block,),
                  (keys, vals, u32n, np.int32(launch.p_hi), np.int32(launch.flip)))
                mark(f"global_f{launch.fp}")
            else:
                io = (1 if src is not None and fuse_in and i == 0 else 0) | (2 if dst is not None and i == last else 0)
                f = self.fn(tile_kernel_name(bits, kv, v.tile_log, v.tile_fuse, v.const_steps, v.tile_threads_max),
                            smem)
                tiles = (n + (1 << v.tile_log) - 1) >> v.tile_log
                mode = 0 if launch.kind == "tile_sort" else 1
                f((tiles,), (v.tile_threads(kv, bits // 8),),
                  (keys, vals, (src if io & 1 else keys).view(keys.dtype), (dst if io & 2 else keys).view(keys.dtype),
                   u32n, np.int32(mode), np.int32(launch.stage), np.int32(io), np.int32(code), np.int32(desc),
                   np.uint32(base)), shared_mem=smem)
                mark(launch.kind)
        if dst is not None and not fuse_out:
            self.from_key(keys, dst, code, desc)
            mark("from_key")

    def pass_times(self, x, variant: str | Variant = "bitonic-fused", order: str = "asc", kv: bool = False,
                   reps: int = 5) -> dict[str, dict[str, float]]:
        """Where one device sort of ``x`` spends its time: per launch kind (see :meth:`launch_all`), the
        launches of one sort and their summed GPU time (median over ``reps`` sorts after one untimed), from a
        CUDA event after every launch on the current stream. A launch's time includes the gap before it.
        {} for an empty ``x`` or reps < 1."""
        cp = self.cp
        if int(x.shape[0]) == 0 or reps < 1:
            return {}
        from gpulab.core.timing import marked_times

        stream = cp.cuda.get_current_stream()
        return marked_times(lambda mark: self.sort(x, variant, order, kv, mark=mark), stream.record,
                            cp.cuda.get_elapsed_time, stream.synchronize, reps)

    def sort(self, x, variant: str | Variant = "bitonic-fused", order: str = "asc", kv: bool = False, mark=None):
        cp = self.cp
        v = get_variant(variant) if isinstance(variant, str) else variant
        desc = K.check_order(order)
        if not isinstance(x, cp.ndarray):
            raise InputError(f"expected a cupy array on the GPU, got {type(x).__name__}")
        K.check_array(x)
        name = K.dtype_name(x)
        code = K.DTYPE_CODE[name]
        kdt = K.KEY_DTYPE[name]
        n = int(x.shape[0])
        if n == 0:
            return x.copy(), (cp.zeros(0, dtype=cp.int64) if kv else None)
        x = cp.ascontiguousarray(x)
        keys = cp.empty(n, dtype=kdt)
        vals = cp.empty(n if kv else 1, dtype=cp.uint32)
        v = self.effective_variant(v, keys.dtype.itemsize, kv)
        out = cp.empty(n, dtype=x.dtype)
        self.launch_all(schedule(n, v), keys, vals, v, kv, code, desc, src=x, dst=out, mark=mark)
        return out, (vals.astype(cp.int64) if kv else None)

    def streams(self, k: int) -> list:
        """k non-blocking streams of this driver (created once, reused by every pipelined sort)."""
        while len(self._streams) < k:
            self._streams.append(self.cp.cuda.Stream(non_blocking=True))
        return self._streams[:k]

    def copy_async(self, dst: int, src: int, nbytes: int, to_device: bool, stream) -> None:
        rt = self.cp.cuda.runtime
        kind = rt.memcpyHostToDevice if to_device else rt.memcpyDeviceToHost
        rt.memcpyAsync(dst, src, nbytes, kind, stream.ptr)

    def sort_host(self, host_in, host_out, variant: str | Variant = "bitonic-fused", order: str = "asc",
                  chunks: int = 8, perm_out=None) -> None:
        """Sort host_in into host_out (host arrays) with the transfers overlapped, in ``chunks`` aligned chunks.

        ``perm_out`` (a host uint32 array of n) also receives the stable argsort. Returns when
        host_out (and perm_out) hold the result.
        """
        cp = self.cp
        x, out, perm = check_host_args(host_in, host_out, perm_out, chunks)
        kv = perm is not None
        desc = K.check_order(order)
        name = K.dtype_name(x)
        code, kdt = K.DTYPE_CODE[name], K.KEY_DTYPE[name]
        n = int(x.shape[0])
        if n == 0:
            return
        v = get_variant(variant) if isinstance(variant, str) else variant
        v = self.effective_variant(v, np.dtype(kdt).itemsize, kv)
        sp = split_schedule(n, v, chunk_log_for(n, chunks))
        dx = cp.empty(n, dtype=x.dtype)  # the input, then the output bits
        keys = cp.empty(n, dtype=kdt)
        vals = cp.empty(n if kv else 1, dtype=cp.uint32)
        pool = self.streams(min(len(sp.bounds), MAX_STREAMS))
        streams = [pool[i % len(pool)] for i in range(len(sp.bounds))]  # chunk i's stream
        start = cp.cuda.get_current_stream().record()
        isz = x.dtype.itemsize

        def part(a: int, b: int):
            return keys[a:b], (vals[a:b] if kv else vals)

        heads = []
        for s, (a, b), head in zip(streams, sp.bounds, sp.head):
            s.wait_event(start)
            self.copy_async(dx.data.ptr + a * isz, x.ctypes.data + a * isz, (b - a) * isz, True, s)
            ck, cv = part(a, b)
            with s:
                self.launch_all(head, ck, cv, v, kv, code, desc, src=dx[a:b], base=a)
            heads.append(s.record())
        main = streams[0]
        for e in heads[1:]:
            main.wait_event(e)
        with main:
            self.launch_all(sp.middle, keys, vals, v, kv)
        middle_done = main.record()
        for s, (a, b) in zip(streams, sp.bounds):
            s.wait_event(middle_done)
            with s:
                self.launch_all(sp.tail, *part(a, b), v, kv, code, desc, dst=dx[a:b])
        for s, (a, b) in zip(streams, sp.bounds):  # after every tail: a pageable copy blocks the host
            self.copy_async(out.ctypes.data + a * isz, dx.data.ptr + a * isz, (b - a) * isz, False, s)
            if kv:
                self.copy_async(perm.ctypes.data + a * 4, vals.data.ptr + a * 4, (b - a) * 4, False, s)
        for s in pool:
            s.synchronize()


__all__ = ["BitonicCuda", "check_host_args", "fit_variant", "kernel_names", "tile_smem_bytes", "next_pow2_log"]
