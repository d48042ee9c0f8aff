"""scripts/sass_counts.py (the SASS figures BENCHMARKS.md quotes) runs without a GPU and says what the FP8 changes
claim: V's PTX conversion cuts the decode tile's instructions well below Triton's cast (no byte loads from shared
memory), and the W8A16 tile with the bf16 recipe issues no conversion instruction at all (the sort's tile step:
tests/sort/test_sass_step.py)."""
from tests.triton_aot import run_sass_counts


def test_sass_counts_of_the_fp8_tiles():
    out = {}
    for only in ("decode, fp8", "w8a16"):
        out.update(run_sass_counts("--only", only))
    cast, ptx = out["decode, fp8 cache, Triton's cast"], out["decode, fp8 cache, PTX V"]
    assert ptx["total"] < 0.8 * cast["total"], (ptx["total"], cast["total"])
    assert cast["opcodes"].get("LDS.U8", 0) > 0 and "LDS.U8" not in ptx["opcodes"]
    conversions = [op for op in out["w8a16 M16 tile, PTX bf16"]["opcodes"] if op.startswith(("F2F", "I2F", "F2I"))]
    assert not conversions, conversions
    assert out["w8a16 M16 tile, Triton's cast"]["opcodes"].get("F2F.BF16.F16", 0) > 0

