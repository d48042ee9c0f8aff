"""Every committed experiment file validates (commands, options and value types), and the smoke run works."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpulab.core import experiment, results
from gpulab.core.paths import shared_data

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_experiment_file_validates(path):
    invocations = experiment.plan(experiment.load_file(path), source=path.name)
    assert invocations and all(inv.argv for inv in invocations)


@pytest.mark.skipif(not (shared_data("tinyshakespeare.txt").is_file() and shared_data("cifar10").is_dir()),
                    reason="the shared data sets (../shared/data or $GPULAB_DATA) are not here")
def test_smoke_experiment_runs(tmp_path):
    """What `make demo` runs: every subsystem's small case on this machine's device, all checks passing."""
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "gpulab", "--out", str(out), "run", "experiments/smoke.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COLUMNS": "160"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = [results.load(f) for f in out.glob("run-*.yaml")]
    assert len(summary) == 1 and summary[0]["ok"]
    names = {results.load(f)["name"] for f in out.glob("*.yaml")}
    assert {"probe", "run"} < names and len(names) >= 8
