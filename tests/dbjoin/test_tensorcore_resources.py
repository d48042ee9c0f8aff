"""scripts/sass_counts.py --join: the tensor-core join kernels built for sm_90 without a GPU (Triton AOT, ptxas -v),
the register and occupancy figures BENCHMARKS.md quotes. Guards what the word-split product and the sliced rare
branch bought: no spills at any quoted tile, and the count-only and BM 32 kernels within 128 registers (four or
more programs an SM)."""
from tests.triton_aot import run_sass_counts


def test_tensor_core_join_registers_on_sm90():
    res = run_sass_counts("--join")
    assert len(res) == 9
    assert all(r["spill_bytes"] == 0 for r in res.values()), {k: r["spill_bytes"] for k, r in res.items()}
    for name, r in res.items():
        if "count only" in name or "BM32" in name:
            assert r["registers"] <= 128 and r["programs_per_sm"] >= 4, (name, r)
    # the emitting BM 64 kernel with 64-bit keys: below the 255 that spilled (Triton 3.8: 135, 3.6: 240)
    assert res["tc_join BM64 int64"]["registers"] < 255
