"""scripts/sass_counts.py --join: the tensor-core join kernels built for sm_90 without a GPU (Triton AOT, ptxas -v),
the register and occupancy figures BENCHMARKS.md quotes. Guards what the word-split product and the sliced rare
branch bought: no spills at any quoted tile, and the count-only and BM 32 kernels within 128 registers (four or
more programs an SM)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tensor_core_join_registers_on_sm90():
    triton = pytest.importorskip("triton")
    from gpulab.core.device import package_version, version_release

    if version_release(package_version("triton")) < (3, 2):
        pytest.skip("the script passes ASTSource the signature form of Triton >= 3.2")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_counts.py"), "--join", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert len(res) == 9
    assert all(r["spill_bytes"] == 0 for r in res.values()), {k: r["spill_bytes"] for k, r in res.items()}
    for name, r in res.items():
        if "count only" in name or "BM32" in name:
            assert r["registers"] <= 128 and r["programs_per_sm"] >= 4, (name, r)
    # the emitting BM 64 kernel with 64-bit keys: below the 255 that spilled (Triton 3.8: 135, 3.6: 240)
    assert res["tc_join BM64 int64"]["registers"] < 255
