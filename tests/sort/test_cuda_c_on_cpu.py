"""bitonic.cu itself, run on this CPU (tests/cuda_on_cpu), under the real driver (cuda_sort.py).

The same emulated cupy as test_driver_emulated.py (stream queues drained in a random order that respects
only stream order and events), but every launch runs the CUDA C kernel from bitonic.cu, compiled by g++
with the CUDA-on-CPU header: its index arithmetic, register networks, padded shared-memory tiles,
__syncthreads placement and key transforms, on every kernel family the variants use, with the exact
argument types the kernels declare. Compared exactly with numpy. What this cannot show: the GPU memory
model, or speed (the GPU tests and benchmarks do).
"""
import sys

import numpy as np
import pytest

from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort.bench import DISTS, make_data
from gpulab.sort.cuda_sort import SOURCE, BitonicCuda

from ..cuda_on_cpu.module import GXX, CpuModule, DeviceHeap
from .test_driver_emulated import DevArray, Scheduler, fake_cupy, inputs
from .test_schedule import SIZES, data, seed

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")


class QueuedKernel:
    """A CPU-run kernel whose launches go on the current stream's queue, as a GPU launch would."""

    def __init__(self, sched, kernel):
        self.sched, self.kernel = sched, kernel

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.kernel.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self.kernel.max_dynamic_shared_size_bytes = value

    def __call__(self, grid, block, args, shared_mem=0):
        self.sched.enqueue(lambda: self.kernel(grid, block, args, shared_mem=shared_mem))


@pytest.fixture
def cuda_c(monkeypatch, build_dir):
    def make(seed, eager=False):
        sched = Scheduler(seed, eager)
        heap = DeviceHeap(DevArray)  # device arrays with guard bytes, checked after every launch
        module = CpuModule(SOURCE, build_dir, seed=seed, heap=heap)
        kernels = {}

        def get_function(name):
            if name not in kernels:
                kernels[name] = QueuedKernel(sched, module.get_function(name))
            return kernels[name]

        cp = fake_cupy(sched, get_function)
        cp.empty, cp.zeros = heap.empty, heap.zeros
        monkeypatch.setitem(sys.modules, "cupy", cp)
        monkeypatch.setattr(BitonicCuda, "_module", None)
        return sched, module, BitonicCuda()
    return make


# (variant, n, dtype, order, kv): every kernel family (transforms, global passes F=1..5 through the schedules,
# tile sorts and merges of each tile config) on every key width, both orders, with and without values
WHOLE = [
    ("bitonic-global", 1000, "int32", "desc", True),
    ("bitonic-global", 777, "int64", "asc", False),
    ("bitonic-shared", 5000, "float32", "asc", True),
    ("bitonic-shared", 3000, "uint32", "desc", False),
    ("bitonic-fused", 20000, "int32", "asc", False),
    ("bitonic-fused", 9000, "int64", "desc", True),
    ("bitonic-fused", 40000, "int64", "asc", True),  # merges of 64-bit keys and values: 512 threads, two slots each
    ("bitonic-fused", 40000, "int64", "desc", False),  # ... and of 64-bit keys alone (also 512 threads)
    ("bitonic-fused", 1, "float32", "asc", True),
    ("bitonic-fused@t14f4g5", 40000, "float32", "desc", True),
    ("bitonic-fused@t15f4g5", 70000, "int32", "asc", False),  # 2^15-key tiles: each thread runs two slots
    ("bitonic-fused@t15f4g5", 3000, "float32", "desc", False),  # one partial tile carries both transforms
    ("bitonic-fused@t12f3g3", 10000, "uint32", "asc", True),
    ("bitonic-fused@t11f1g2", 5000, "int64", "asc", False),
    ("bitonic-fused@t13f4g5c", 20000, "int32", "asc", False),  # constant steps: tile sorts and merges
    ("bitonic-fused@t13f3g4c", 17000, "uint32", "desc", False),  # ... the default configuration's tile
    ("bitonic-fused@t15f4g5c", 70000, "uint32", "desc", False),  # ... with two slots a thread
    ("bitonic-fused@t14f4g5c", 3000, "float32", "asc", False),  # ... one partial tile: stages up to 12 of 14
    ("bitonic-fused@t14f4g5c", 9000, "int64", "desc", True),  # no constant-step kernel here: runtime steps
    ("bitonic-fused@t14f4g5w512", 40000, "int32", "asc", False),  # 512 threads a tile block, two slots each
    ("bitonic-fused@t14f4g5w512", 9000, "float32", "desc", True),  # no w512 kernel with values: the plain tile
]


@pytest.mark.parametrize("variant, n, dtype, order, kv", WHOLE)
def test_sort_cuda_c(cuda_c, variant, n, dtype, order, kv):
    sched, module, bit = cuda_c(n, eager=True)
    x = inputs(n, dtype, np.random.default_rng(n))
    keys, perm = bit.sort(x.view(DevArray), variant, order, kv=kv)
    assert ref.mismatch(np.asarray(keys), ref.sort(x, order)) is None, variant
    if kv:
        assert np.array_equal(np.asarray(perm), ref.argsort(x, order)), variant
    assert n <= 1 or module.launches > 0
    const = [name for name in bit._fns if name.endswith("_c")]
    assert bool(const) == (variant.endswith("c") and dtype != "int64" and not kv), const
    capped = [name for name in bit._fns if name.endswith("_w512")]
    assert bool(capped) == (variant.endswith("w512") and dtype != "int64" and not kv), capped


@pytest.mark.parametrize("variant, n, dtype, chunks, order, kv", [
    ("bitonic-fused", 20000, "float32", 2, "asc", True),
    ("bitonic-shared", 5000, "int64", 4, "desc", True),
    ("bitonic-global", 1025, "int32", 16, "desc", False),  # 9 chunks on 8 streams in turn
])
def test_sort_host_cuda_c(cuda_c, variant, n, dtype, chunks, order, kv):
    """The pipelined host sort: chunk sorts on several streams, then the merges, with random stream interleaving."""
    sched, module, bit = cuda_c(chunks)
    x = inputs(n, dtype, np.random.default_rng(n))
    out = np.empty_like(x)
    perm = np.empty(n, np.uint32) if kv else None
    bit.sort_host(x, out, variant, order, chunks, perm)
    assert ref.mismatch(out, ref.sort(x, order)) is None
    if kv:
        assert np.array_equal(perm.astype(np.int64), ref.argsort(x, order))


@pytest.mark.parametrize("variant, n, dtype, order", [("bitonic-fused", 9000, "int64", "desc"),
                                                      ("bitonic-shared", 3000, "float32", "asc")])
def test_sort_plan_cuda_c(cuda_c, variant, n, dtype, order):
    """SortPlan's captured sort with values: the tile kernels and bitonic_widen_values (uint32 values into the
    plan's int64 permutation) from bitonic.cu, replayed twice over new contents of the bound buffer."""
    from gpulab.sort.sort_plan import SortPlan

    sched, module, bit = cuda_c(n)
    rng = np.random.default_rng(n)
    x = module.heap.asarray(inputs(n, dtype, rng))
    plan = SortPlan(bit, x, variant, order, kv=True)
    assert plan.graph is not None and "bitonic_widen_values" in bit._fns
    for round_ in range(2):
        if round_:
            x[:] = inputs(n, dtype, rng)
        out, perm = plan.run()
        plan.stream.synchronize()
        assert ref.mismatch(np.asarray(out), ref.sort(np.asarray(x), order)) is None, round_
        assert np.array_equal(np.asarray(perm), ref.argsort(np.asarray(x), order)), round_


REAL = ["bitonic-global", "bitonic-shared", "bitonic-fused", "bitonic-fused@t13f3g4"]


def check_cuda_c(bit, x, variant, order, kv):
    keys, perm = bit.sort(x.view(DevArray), variant, order, kv=kv)
    assert ref.mismatch(np.asarray(keys), ref.sort(x, order)) is None, (variant, x.shape, order, kv)
    if kv:
        assert np.array_equal(np.asarray(perm), ref.argsort(x, order)), (variant, x.shape, order, kv)


@pytest.mark.parametrize("variant", REAL)
@pytest.mark.parametrize("dtype", K.DTYPES)
def test_cuda_c_sizes(cuda_c, variant, dtype):
    """The issue's sizes (0, 1, 2, 3, 1023, 1024, 1025, 4097 and a random one) in every dtype (float32 with NaN,
    +-inf and -0.0; odd sizes with many ties), orders and key-value mode taking turns."""
    rng = np.random.default_rng(seed("cuda-c", variant, dtype))
    _, _, bit = cuda_c(seed(variant, dtype), eager=True)
    for i, n in enumerate(SIZES + [int(rng.integers(5, 600))]):
        check_cuda_c(bit, data(n, dtype, rng), variant, K.ORDERS[i % 2], kv=i % 3 != 1)


@pytest.mark.parametrize("variant", REAL)
@pytest.mark.parametrize("dist", DISTS)
def test_cuda_c_distributions(cuda_c, variant, dist):
    """Every bench distribution, each dtype once, the order and the key-value mode taking turns."""
    _, _, bit = cuda_c(seed(variant, dist), eager=True)
    for i, dtype in enumerate(K.DTYPES):
        check_cuda_c(bit, make_data(777, dtype, dist, seed=i), variant, K.ORDERS[i % 2], kv=i < 2)
