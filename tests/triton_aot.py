"""Compile Triton kernels for a GPU target without a GPU: a script run in a child process without
TRITON_INTERPRET (ahead-of-time triton.compile of ASTSource for a GPUTarget), so that lowering
errors of the GPU tile sizes and dtypes show up in CPU tests, not on GPU time."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_aot_script(script: str, done_marker: str, timeout: int = 300) -> str:
    """Run ``script`` (it imports triton, ASTSource, GPUTarget itself); it must exit 0 and print
    ``done_marker``. Skips where this Triton has no AOT API. Returns its stdout."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget")
    from gpulab.core.device import package_version, version_release

    if version_release(package_version("triton")) < (3, 2):  # 3.0/3.1 key the signature by position
        pytest.skip("the AOT scripts pass ASTSource the signature form of Triton >= 3.2 (names, constexpr entries)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert done_marker in proc.stdout
    return proc.stdout


def run_sass_counts(*args: str, needs_nvcc: bool = False, timeout: int = 300) -> dict:
    """``python scripts/sass_counts.py --json ARGS`` (sm_90 builds with the ptxas and nvdisasm that Triton ships, and
    nvcc for the sort's step), parsed; skips where this Triton or this machine lacks what the script needs."""
    import json
    import shutil

    triton = pytest.importorskip("triton")
    from gpulab.core.device import package_version, version_release

    if version_release(package_version("triton")) < (3, 2):
        pytest.skip("the script passes ASTSource the signature form of Triton >= 3.2")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "nvdisasm").exists()):
        pytest.skip("this Triton ships no ptxas/nvdisasm")
    if needs_nvcc and shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_counts.py"), "--json", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)
