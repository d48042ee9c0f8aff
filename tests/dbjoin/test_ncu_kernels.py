"""The --ncu kernel filters name every kernel the join (and the join-aggregate) launches on the GPU.

The kernel names are read from the sources (CUDA C and Triton), so renaming a kernel without updating the
filter fails here instead of silently dropping it from the profile. No GPU needed.
"""
import inspect
import re
from pathlib import Path

from gpulab.dbjoin import agg_bench, bench, hash_join_cuda, tensorcore_join

HERE = Path(tensorcore_join.__file__).parent


def triton_kernels(module_file: str) -> list[str]:
    """The launchable @triton.jit functions of a module (helpers start with _ and are inlined)."""
    text = (HERE / module_file).read_text()
    names = re.findall(r"^@triton\.jit\b[^\n]*\ndef (\w+)\(", text, re.M)
    return [n for n in names if not n.startswith("_")]


def cuda_kernels(prefix: str) -> list[str]:
    """The CUDA C kernels of hash_join.cu named <prefix>_*: hj (the join) or ha (the hash aggregate)."""
    text = hash_join_cuda.SOURCE_PATH.read_text()
    bases = re.findall(rf'extern "C" __global__ void ({prefix}_\w+?)_##SUFFIX\(', text)
    suffixes = re.findall(rf"^{prefix.upper()}_DEFINE\((\w+),", text, re.M)
    assert bases and suffixes
    return [f"{b}_{s}" for b in bases for s in suffixes]


def partition_kernels() -> list[str]:
    """The Triton kernels that the GPU partition (tensorcore_join.partition_counting) imports and launches."""
    src = inspect.getsource(tensorcore_join.partition_counting)
    m = re.search(r"from gpulab\.dbjoin\.tensorcore_kernel import ([\w, ]+)", src)
    return [n.strip() for n in m.group(1).split(",")]


def misses(regex: str, names: list[str]) -> list[str]:
    return [n for n in names if not re.search(regex, n)]


def test_join_filter_matches_every_gpu_kernel():
    names = cuda_kernels("hj") + triton_kernels("tensorcore_kernel.py")
    assert {"tc_hist_kernel", "tc_scatter_kernel", "tc_join_kernel", "hj_probe_i64"} <= set(names)
    assert misses(bench.ncu_kernel_regex(), names) == []


def test_aggregate_filter_matches_every_gpu_kernel():
    names = triton_kernels("tensorcore_aggregate_kernel.py") + partition_kernels() + cuda_kernels("ha")
    assert {"tc_agg_kernel", "tc_hist_kernel", "tc_scatter_kernel", "ha_emit_i64"} <= set(names)
    assert misses(agg_bench.KERNEL_REGEX, names) == []


def test_filters_name_no_missing_kernel():
    """Every alternative of the filters (but the library radix sort) is a kernel that exists."""
    defined = (cuda_kernels("hj") + cuda_kernels("ha") + triton_kernels("tensorcore_kernel.py")
               + triton_kernels("tensorcore_aggregate_kernel.py"))
    for regex in (bench.ncu_kernel_regex(), agg_bench.KERNEL_REGEX):
        for alt in regex.split("|"):
            if alt != "[Rr]adix":
                assert any(re.search(alt, n) for n in defined), (alt, regex)
