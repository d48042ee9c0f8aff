"""The device scripts (scripts/device/*.sh) parse, and all.sh gives each script its own time budget.

They run only on a lent GPU machine, where a mistake costs scarce device time; these checks run here."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts" / "device").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_all_sh_budgets_each_script(tmp_path):
    """all.sh hands a script its own seconds (default or NAME:SECONDS) as SCRIPT_BUDGET, kills it at that
    limit, skips what no longer fits, and packs every log into one tarball."""
    dev = tmp_path / "scripts" / "device"
    dev.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "device" / "all.sh", dev / "all.sh")
    shutil.copy(ROOT / "scripts" / "device" / "lib.sh", dev / "lib.sh")
    (dev / "probe.sh").write_text('source "$(dirname "$0")/lib.sh"\nbudget_start 50\n'
                                  'echo "script=$SCRIPT_BUDGET steps=$BUDGET"\n')
    (dev / "slow.sh").write_text("sleep 30\n")
    env = {k: v for k, v in os.environ.items() if k not in ("BUDGET_S", "SCRIPT_BUDGET")}
    env.update(BUDGET="40", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PREFLIGHT="0")
    proc = subprocess.run(["bash", "scripts/device/all.sh", "probe:7", "slow:2", "probe:60", "missing"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "work" / "probe" / "log.txt").read_text()
    assert "script=7 steps=4" in log  # its own 7 s, less 3 s for its summary; not the call's BUDGET=40
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("probe: exit 0")
    assert summary[1].startswith("slow: exit 124") and "timed out" in summary[1]
    assert summary[2].startswith("probe: skipped (needs 60s")
    assert summary[3] == "missing: no script"
    assert (tmp_path / "out" / "gpulab-device.tgz").stat().st_size > 0


def test_all_sh_preflight_stops_without_cuda(tmp_path):
    """Without a CUDA device the preflight stops all.sh before any script, in one summary line."""
    from gpulab.core import options

    if options.cuda_available():
        pytest.skip("a GPU is visible")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFLIGHT", "SCRIPT_BUDGET")}
    env.update(BUDGET="40", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PY=sys.executable,
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device" / "all.sh"), "core"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert (tmp_path / "out" / "summary.txt").read_text() == "preflight failed: no script was run\n"
    pre = (tmp_path / "out" / "preflight.txt").read_text()
    assert "torch " in pre and "torch sees no CUDA device" in pre
    assert not (tmp_path / "work" / "core").exists()
