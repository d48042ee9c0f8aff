"""`gpulab l2 run` on the CPU: runs the models, reports that the policies need a GPU, one-line errors."""
import subprocess
import sys

import pytest
import yaml

from gpulab.cli import invoke, main
from gpulab.core.errors import DeviceError, InputError
from tests.conftest import HAS_CUDA


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_help_imports_no_torch():
    code = ("import sys; import gpulab.l2.cli; assert 'torch' not in sys.modules and 'triton' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
@pytest.mark.parametrize("argv", [
    ["--workload", "mlp", "--width", "32", "--layers", "2", "--batch", "3", "--policy", "all"],
    ["--workload", "cnn", "--width", "8", "--layers", "2", "--batch", "2", "--image", "8"],
    ["--workload", "ofa", "--width-mult", "0.25", "--image", "32", "--batch", "1", "--subnets", "3"],
])
def test_cpu_run_writes_record(argv, out_dir, capsys):
    code, out, err = _run(["--out", str(out_dir), "l2", "run", *argv, "--reps", "3"], capsys)
    assert code == 0, err
    files = list(out_dir.glob("l2-*.yaml"))
    assert len(files) == 1
    rec = yaml.safe_load(files[0].read_text())
    assert rec["ok"] is True and rec["checks"]
    assert rec["rows"][0]["policy"] == "cpu-baseline" and rec["rows"][0]["median_ms"] > 0
    assert all(r["status"].startswith("skipped") for r in rec["rows"][1:])
    assert any("need a CUDA GPU" in n for n in rec["notes"])
    if "mlp" in argv or "cnn" in argv:
        assert rec["checks"]["triton_interpreter_vs_torch"]["passed"]
    assert "need a GPU" in out or "needs a CUDA GPU" in out


@pytest.mark.skipif(HAS_CUDA, reason="no GPU must be visible")
def test_device_cuda_without_gpu_is_one_line_error(out_dir, capsys):
    code, out, err = _run(["--device", "cuda", "--out", str(out_dir), "l2", "run"], capsys)
    assert code == 1 and err.count("\n") == 1 and "no CUDA GPU" in err
    assert not out_dir.exists() or not list(out_dir.glob("*.yaml"))
    with pytest.raises(DeviceError):
        invoke(["--device", "cuda", "l2", "run", "--width", "8", "--layers", "1"])


@pytest.mark.parametrize("args,msg", [
    (["--workload", "rnn"], "unknown --workload"),
    (["--policy", "persist,lru"], "unknown policy 'lru'"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--dtype", "fp4"], "unknown --dtype"),
    (["--prefetch-kernel", "magic"], "unknown --prefetch-kernel"),
    (["--impl", "cuda"], "unknown --impl"),
    (["--lookahead", "0"], "--lookahead must be >= 1"),
    (["--pollute-mib", "-1"], "--pollute-mib must be >= 0"),
    (["--pollute-mib", "nan"], "--pollute-mib must be >= 0"),
    (["--width-mult", "nan"], "--width-mult must be in"),
    (["--width-mult", "inf"], "--width-mult must be in"),
    (["--width-mult", "1e30"], "--width-mult must be in (0, 16]"),
    (["--set-aside-mib", "-1"], "--set-aside-mib must be > 0"),
    (["--set-aside-mib", "nan"], "--set-aside-mib must be > 0"),
    (["--window-mib", "0"], "--window-mib must be > 0"),
    (["--rounds", "1"], "policy auto needs --rounds >= 2"),
    (["--policy", "persist,auto", "--rounds", "1"], "policy auto needs --rounds >= 2"),
])
def test_bad_input_is_one_line_error(args, msg, out_dir, capsys):
    code, _, err = _run(["--out", str(out_dir), "l2", "run", *args], capsys)
    assert code == 1 and msg in err and err.count("\n") == 1
    with pytest.raises(InputError):
        invoke(["l2", "run", *args])


@pytest.mark.skipif(HAS_CUDA, reason="no GPU must be visible")
def test_ncu_without_gpu_is_one_line_error(out_dir, capsys):
    code, _, err = _run(["--out", str(out_dir), "l2", "run", "--width", "8", "--layers", "1", "--ncu"], capsys)
    assert code == 1 and err == "error: --ncu needs a CUDA GPU, and none is visible\n"
    assert not out_dir.exists() or not list(out_dir.glob("*.yaml"))


def test_rounds_1_without_auto_is_fine_and_one_subnet_is_the_largest():
    import torch

    from gpulab.l2.bench import RunConfig, build_workload, run
    from gpulab.l2.supernet import SubnetConfig

    if not HAS_CUDA:
        rec = run(RunConfig(workload="mlp", width=8, layers=1, batch=1, reps=1, rounds=1, policies=("default",)))
        assert rec.rows[0]["policy"] == "cpu-baseline"
    one = build_workload(RunConfig(workload="ofa", width_mult=0.25, image=32, batch=1, subnets=1), "cpu", torch.float32)
    assert one.subnets == [SubnetConfig.largest()]
    three = build_workload(RunConfig(workload="ofa", width_mult=0.25, image=32, batch=1, subnets=3), "cpu",
                           torch.float32)
    assert len(three.subnets) == 3 and three.subnets[-1] == SubnetConfig.largest()
