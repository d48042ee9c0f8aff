"""scripts/sass_counts.py --sort: one bitonic shared-memory step of bitonic.cu (tile_chunk) in sm_90 SASS, with its
stride bits at run time, with only the stride at run time, and as constants: the figures BENCHMARKS.md's analysis of
the fused sort quotes."""
from tests.triton_aot import run_sass_counts


def test_sass_counts_of_a_sort_tile_step():
    """One t14f4 step built by nvcc: the constant one is the 32 compare-exchanges and little else."""
    out = run_sass_counts("--sort", "--only", "none", needs_nvcc=True)
    const, runtime = out["sort t14f4 step, constant"], out["sort t14f4 step, runtime"]
    shape = out["sort t14f4 step, shape"]  # what the runtime-step tile kernels run: only p_hi at run time
    assert const["opcodes"]["VIMNMX.U32"] == shape["opcodes"]["VIMNMX.U32"] == 64  # 32 compare-exchanges, min + max
    assert const["total"] * 3 < runtime["total"], (const["total"], runtime["total"])
    assert shape["total"] * 3 < runtime["total"] and shape["total"] < const["total"] * 1.5, (shape, const)
