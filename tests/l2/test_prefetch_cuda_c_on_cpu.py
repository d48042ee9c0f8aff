"""prefetch_l2.cu run on this CPU (tests/cuda_on_cpu): which lines each prefetch kernel asks the L2 for, through
the launch that PrefetchKernels.launch makes (its driver call replaced by the emulation). The PTX itself is only
recorded here: that it prefetches is a GPU matter (the GPU tests and `l2 run --ncu`)."""
import ctypes
import types

import numpy as np
import pytest

from gpulab.l2 import cuda_l2

from ..cuda_on_cpu.module import GXX, CpuModule

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")
LINE, CHUNK = 128, 65536
BASE = 1 << 40  # an address the kernels only compute with (the emulation never dereferences a prefetch)


@pytest.fixture(scope="module")
def module(build_dir):
    return CpuModule(cuda_l2.SOURCE, build_dir)


def emulated_kernels(module):
    """A PrefetchKernels whose cuLaunchKernel runs the emulated kernel with the arguments the host packed."""
    def launch(fn, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        values, types_ = args
        assert types_ == (ctypes.c_void_p, ctypes.c_ulonglong)
        ptr = types.SimpleNamespace(data=types.SimpleNamespace(ptr=int(values[0])))
        module.get_function(fn)((gx, gy, gz), (bx, by, bz), (ptr, np.uint64(values[1])), shared_mem=smem)
        return (0,)

    pk = object.__new__(cuda_l2.PrefetchKernels)
    pk._driver = types.SimpleNamespace(cuLaunchKernel=launch, CUstream=int)
    pk.functions = {name: name for name in cuda_l2.PREFETCH_KERNELS}
    pk.arch = 90
    return pk


SIZES = [1, 127, 128, 129, 4096, 100_000, (1 << 20) + 16, 3 * CHUNK + 48]


@pytest.mark.parametrize("kind", ["prefetch_l2", "prefetch_l2_evict_last"])
@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("blocks, threads", [(8, 256), (1, 32)])
def test_line_prefetch_covers_each_line_once(module, kind, nbytes, blocks, threads):
    emulated_kernels(module).launch(kind, BASE, nbytes, 0, blocks=blocks, threads=threads)
    log = module.ptx_log()
    want_op = "prefetch.global.L2 [%0];" if kind == "prefetch_l2" else "prefetch.global.L2::evict_last [%0];"
    assert {op for op, *_ in log} == {want_op}
    addresses = sorted(inputs[0] for *_, inputs in log)
    assert addresses == [BASE + LINE * i for i in range(-(-nbytes // LINE))]


@pytest.mark.parametrize("nbytes", SIZES)
def test_bulk_prefetch_covers_the_range_in_chunks(module, nbytes):
    emulated_kernels(module).launch("prefetch_l2_bulk", BASE, nbytes, 0)
    log = module.ptx_log()
    assert {op for op, *_ in log} == {"cp.async.bulk.prefetch.L2.global [%0], %1;"}
    pieces = sorted(inputs for *_, inputs in log)
    assert all(size % 16 == 0 and 0 < size <= CHUNK for _, size in pieces)
    assert [p for p, _ in pieces] == [BASE + CHUNK * i for i in range(len(pieces))]  # contiguous, no overlap
    assert sum(size for _, size in pieces) == -(-nbytes // 16) * 16


def test_nothing_launched_for_an_empty_range(module):
    module.get_function("prefetch_l2")((1,), (32,), (types.SimpleNamespace(data=types.SimpleNamespace(ptr=BASE)),
                                                   np.uint64(100)))
    emulated_kernels(module).launch("prefetch_l2", BASE, 0, 0)
    assert len(module.ptx_log()) == 1  # still the previous launch's: a zero-byte range launches nothing
