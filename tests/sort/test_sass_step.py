"""scripts/sass_counts.py --sort: one bitonic shared-memory step of bitonic.cu (tile_chunk) in sm_90 SASS, with its
stride bits at run time, with only the stride at run time, and as constants: the figures BENCHMARKS.md's analysis of
the fused sort quotes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sass_counts_of_a_sort_tile_step():
    """One t14f4 step built by nvcc: the constant one is the 32 compare-exchanges and little else."""
    import shutil

    triton = pytest.importorskip("triton")
    if shutil.which("nvcc") is None or not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" /
                                            "nvdisasm").exists():
        pytest.skip("needs nvcc and Triton's nvdisasm")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_counts.py"), "--json", "--sort", "--only",
                           "none"], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    const, runtime = out["sort t14f4 step, constant"], out["sort t14f4 step, runtime"]
    shape = out["sort t14f4 step, shape"]  # what the runtime-step tile kernels run: only p_hi at run time
    assert const["opcodes"]["VIMNMX.U32"] == shape["opcodes"]["VIMNMX.U32"] == 64  # 32 compare-exchanges, min + max
    assert const["total"] * 3 < runtime["total"], (const["total"], runtime["total"])
    assert shape["total"] * 3 < runtime["total"] and shape["total"] < const["total"] * 1.5, (shape, const)
