"""Fixtures of the join tests: ``fake`` (cupy replaced by fake_cupy: host memory, recorded stream capture, the
numba model's kernels) and ``cuda_c`` (the same, with hash_join.cu's own kernels run by tests/cuda_on_cpu)."""
import sys
import types

import numpy as np
import pytest

from gpulab.dbjoin import hash_aggregate_cuda as hac
from gpulab.dbjoin import hash_join_cuda as hjc
from gpulab.dbjoin.hash_join_cuda import SOURCE_PATH

from ..cuda_on_cpu.module import CpuModule, DeviceHeap
from . import fake_cupy

_CACHES = (hjc._module, hjc._kernels, hjc._wave_blocks, hac._kernels)  # built from the cupy module of their time


@pytest.fixture
def fake(monkeypatch):
    fake_cupy.reset()
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = fake_cupy.empty_pinned
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    for f in _CACHES:
        f.cache_clear()
    yield fake_cupy
    for f in _CACHES:
        f.cache_clear()
    fake_cupy.reset()


@pytest.fixture
def cuda_c(fake, build_dir, monkeypatch):
    def use(seed):
        heap = DeviceHeap(fake.ndarray)  # device arrays with guard bytes, checked after every launch

        def empty(shape, dtype=np.float64):
            fake._refuse_while_capturing("a pool allocation (cupy.empty)")
            return heap.empty(shape, dtype)

        def asarray(a):
            fake._refuse_while_capturing("a pool allocation (cupy.asarray)")
            return heap.asarray(a)

        monkeypatch.setattr(fake, "empty", empty)
        monkeypatch.setattr(fake, "asarray", asarray)
        module = CpuModule(SOURCE_PATH, build_dir, seed=seed, heap=heap)
        fake.use_cuda_c(module)
        return module
    return use


