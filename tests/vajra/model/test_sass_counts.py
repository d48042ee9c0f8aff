"""scripts/sass_counts.py (the SASS figures BENCHMARKS.md quotes) runs without a GPU and says what the FP8 changes
claim: V's PTX conversion cuts the decode tile's instructions well below Triton's cast (no byte loads from shared
memory), and the W8A16 tile with the bf16 recipe issues no conversion instruction at all (the sort's tile step:
tests/sort/test_sass_step.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_sass_counts_of_the_fp8_tiles():
    triton = pytest.importorskip("triton")
    from gpulab.core.device import package_version, version_release

    if version_release(package_version("triton")) < (3, 2):
        pytest.skip("the script passes ASTSource the signature form of Triton >= 3.2")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        pytest.skip("this Triton ships no nvdisasm")
    out = {}
    for only in ("decode, fp8", "w8a16"):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_counts.py"), "--json", "--only", only],
                              capture_output=True, text=True, timeout=300, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.update(json.loads(proc.stdout))
    cast, ptx = out["decode, fp8 cache, Triton's cast"], out["decode, fp8 cache, PTX V"]
    assert ptx["total"] < 0.8 * cast["total"], (ptx["total"], cast["total"])
    assert cast["opcodes"].get("LDS.U8", 0) > 0 and "LDS.U8" not in ptx["opcodes"]
    conversions = [op for op in out["w8a16 M16 tile, PTX bf16"]["opcodes"] if op.startswith(("F2F", "I2F", "F2I"))]
    assert not conversions, conversions
    assert out["w8a16 M16 tile, Triton's cast"]["opcodes"].get("F2F.BF16.F16", 0) > 0

