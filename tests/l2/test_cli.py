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
    ["--workload", "matformer", "--width", "16", "--layers", "2", "--batch", "2", "--subnets", "3", "--policy", "all"],
    ["--workload", "matformer", "--width", "16", "--layers", "2", "--batch", "2", "--subnets", "3", "--impl", "cublas"],
    ["--workload", "cnn", "--width", "8", "--layers", "2", "--batch", "2", "--image", "8", "--impl", "cublas"],
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
    if "cublas" in argv:
        assert rec["checks"]["vendor_ops_vs_torch"]["passed"] and "triton_interpreter_vs_torch" not in rec["checks"]
    elif "ofa" not in argv:
        assert rec["checks"]["triton_interpreter_vs_torch"]["passed"]
    assert "need a GPU" in out or "needs a CUDA GPU" in out


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
def test_cpu_run_notes_the_policy_options_it_does_not_use(out_dir, capsys):
    """On the CPU no policy runs: options set for them (not at their defaults) are named in the note as unused."""
    base = ["--out", str(out_dir), "l2", "run", "--workload", "mlp", "--width", "16", "--layers", "2", "--reps", "3"]
    code, _, err = _run([*base, "--policy", "persist,prefetch", "--set-aside-mib", "4", "--lookahead", "2"], capsys)
    assert code == 0, err
    [f] = out_dir.glob("l2-*.yaml")
    [note] = [n for n in yaml.safe_load(f.read_text())["notes"] if "need a CUDA GPU" in n]
    assert note.endswith("; --set-aside-mib, --lookahead are for them, unused here")
    f.unlink()
    code, _, err = _run([*base, "--policy", "persist"], capsys)
    assert code == 0, err
    [f] = out_dir.glob("l2-*.yaml")
    [note] = [n for n in yaml.safe_load(f.read_text())["notes"] if "need a CUDA GPU" in n]
    assert "unused here" not in note


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
    (["--workload", "ofa", "--width-mult", "nan"], "--width-mult must be in"),
    (["--workload", "ofa", "--width-mult", "inf"], "--width-mult must be in"),
    (["--workload", "ofa", "--width-mult", "1e30"], "--width-mult must be in (0, 16]"),
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
    from gpulab.l2.matformer import MatConfig
    one = build_workload(RunConfig(workload="matformer", width=8, layers=3, batch=1, subnets=1), "cpu", torch.float32)
    assert one.subnets == [MatConfig.largest(3)]
    three = build_workload(RunConfig(workload="matformer", width=8, layers=3, batch=1, subnets=3), "cpu", torch.float32)
    assert len(three.subnets) == 3 and three.subnets[-1] == MatConfig.largest(3)


@pytest.mark.parametrize("args,msg", [
    (["--workload", "mlp", "--image", "5"], "--image applies to --workload cnn or ofa, not mlp"),
    (["--workload", "mlp", "--subnets", "3"], "--subnets applies to --workload ofa or matformer, not mlp"),
    (["--workload", "cnn", "--width-mult", "2"], "--width-mult applies to --workload ofa, not cnn"),
    (["--workload", "ofa", "--width", "7"], "--width applies to --workload mlp, cnn or matformer, not ofa"),
    (["--workload", "ofa", "--layers", "3"], "--layers applies to --workload mlp, cnn or matformer, not ofa"),
    (["--workload", "ofa", "--impl", "triton"], "--impl applies to --workload mlp, cnn or matformer, not ofa"),
    (["--workload", "matformer", "--image", "32"], "--image applies to --workload cnn or ofa, not matformer"),
    (["--workload", "matformer", "--width-mult", "2"], "--width-mult applies to --workload ofa, not matformer"),
    (["--policy", "default,prefetch", "--window-mib", "4"], "--window-mib applies to the policies that persist"),
    (["--policy", "persist", "--lookahead", "2"], "--lookahead applies to the policies that prefetch"),
    (["--policy", "default", "--prefetch-kernel", "read"], "--prefetch-kernel applies to the policies that prefetch"),
])
def test_options_that_would_be_ignored_are_refused(args, msg, out_dir, capsys):
    """An option of another workload, or of a policy not run, was ignored and written into the config as used."""
    code, _, err = _run(["--out", str(out_dir), "l2", "run", *args], capsys)
    assert code == 1 and err.startswith(f"error: {msg}") and err.count("\n") == 1
    assert not out_dir.exists() or not list(out_dir.glob("*.yaml"))


@pytest.mark.parametrize("cfg", [
    dict(workload="mlp", width=96, layers=3, impl="torch", set_aside_mib=4.0, window_mib=8.0, lookahead=2,
         prefetch_kernel="read", prefetch_budget=0.25),
    dict(workload="cnn", width=16, layers=2, image=12, lookahead=3),
    dict(workload="ofa", width_mult=0.5, image=64, subnets=3, window_mib=2.0, prefetch_budget=0.75),
    dict(workload="matformer", width=64, layers=3, subnets=5, impl="torch", set_aside_mib=1.0, lookahead=2),
])
@pytest.mark.parametrize("pol", ["default", "persist", "prefetch", "persist+prefetch"])
def test_ncu_child_command_line_reproduces_the_run(cfg, pol, monkeypatch):
    """The command line each ncu child runs parses (no option refused as not applying) into the same run for its
    policy: the workload's own options and those of the policy, as given."""
    from gpulab.core import ncu
    from gpulab.l2 import bench

    full = bench.RunConfig(batch=3, dtype="float32", pollute_mib=2.0, graph=True, seed=4, **cfg)
    full.validate()
    seen = {}

    class Parsed(Exception):
        pass

    def parsed(c):
        seen["cfg"] = c
        raise Parsed

    monkeypatch.setattr(ncu, "profile_gpulab", lambda args, **k: seen.update(args=args) or [])
    monkeypatch.setattr(bench, "summarize_ncu", lambda recs, reps: {})
    bench._ncu_dram(full, pol, reps=2)
    monkeypatch.setattr(bench, "run", parsed)
    with pytest.raises(Parsed):
        invoke(seen["args"])
    child = seen["cfg"]
    child.validate()
    for name in ("workload", "batch", "dtype", "pollute_mib", "graph", "seed", *bench.WORKLOAD_OPTIONS,
                 *bench.POLICY_OPTIONS):
        if bench.option_applies(name, full.workload, [pol]):
            assert getattr(child, name) == getattr(full, name), name
    assert child.policies == (pol,) and child.rounds == 1 and child.reps == 2


@pytest.mark.parametrize("cfg", [
    dict(workload="mlp", width=40, layers=3, batch=17),
    dict(workload="cnn", width=12, layers=2, batch=2, image=6),
    dict(workload="matformer", width=40, layers=3, batch=17, subnets=4),
])
def test_interpreter_steps_count_the_kernels_tile_steps(cfg, monkeypatch):
    """The CPU check's size limit counts what the interpreter's time follows: each launched program's K-loop
    iterations, summed over one inference (counted here from the launches themselves, kernels stubbed out)."""
    import torch

    from gpulab.l2 import bench, kernels
    from gpulab.l2.models import run_layers

    counted = []

    class Spy:
        def __init__(self, block_k_name, k_of):
            self.block_k_name, self.k_of = block_k_name, k_of

        def __getitem__(self, grid):
            def launch(*args, **kw):
                programs = 1
                for g in grid:
                    programs *= g
                counted.append(programs * -(-self.k_of(args) // kw[self.block_k_name]))
            return launch

    monkeypatch.setattr(kernels, "INTERPRET", True)  # the interpreter's tiles, also where a GPU is visible
    monkeypatch.setattr(kernels, "_linear_kernel", Spy("BLOCK_K", lambda a: a[7]))  # (x, w, b, add, y, m, n, k, ...)
    monkeypatch.setattr(kernels, "_conv2d_kernel", Spy("BLOCK_K", lambda a: a[5] * 9))  # C, 3x3 kernels
    rc = bench.RunConfig(**cfg)
    model = bench.build_workload(rc, "cpu", torch.float32)
    for r in model.requests("triton"):
        run_layers(r.x, r.layers)
    assert sum(counted) == bench.interpreter_steps(rc, model) > 0


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
def test_cpu_run_skips_the_interpreter_check_by_tile_steps_not_macs(out_dir, capsys):
    """Batch 1 at width 2048: few MACs (8.4e6) but 8,192 tile steps (the interpreter pads the row to a 16-row
    tile): skipped with a note naming the steps, where a MACs limit had let it run for ~15 s."""
    code, _, err = _run(["--out", str(out_dir), "l2", "run", "--workload", "mlp", "--width", "2048", "--layers", "2",
                         "--batch", "1", "--reps", "3"], capsys)
    assert code == 0, err
    [f] = out_dir.glob("l2-*.yaml")
    rec = yaml.safe_load(f.read_text())
    assert "triton_interpreter_vs_torch" not in rec["checks"]
    assert any("8192 tile steps are too many for the interpreter" in n for n in rec["notes"])


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
def test_cpu_run_notes_that_pollution_did_not_run(out_dir, capsys):
    """--pollute-mib (other traffic between inferences, a CUDA kernel) does not run on the CPU: like --graph and
    --dtype it is noted as unused there, not recorded in the config as if it had run."""
    base = ["--out", str(out_dir), "l2", "run", "--workload", "mlp", "--width", "16", "--layers", "2", "--reps", "3"]
    code, _, err = _run([*base, "--policy", "default", "--pollute-mib", "64"], capsys)
    assert code == 0, err
    [f] = out_dir.glob("l2-*.yaml")
    notes = yaml.safe_load(f.read_text())["notes"]
    assert any(n.startswith("--pollute-mib 64 is for the GPU") for n in notes), notes
    f.unlink()
    code, _, err = _run([*base, "--policy", "default"], capsys)
    assert code == 0, err
    [f] = out_dir.glob("l2-*.yaml")
    assert not any("--pollute-mib" in n for n in yaml.safe_load(f.read_text())["notes"])


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
def test_cpu_run_checks_every_request_of_the_stream_even_with_repeated_subnets(out_dir, capsys):
    """The matformer stream of seed 0 at 2 layers and 3 subnets draws the largest subnet (XL-XL) before the appended
    one: each request gets its own finite check."""
    code, _, err = _run(["--out", str(out_dir), "l2", "run", "--workload", "matformer", "--width", "16", "--layers",
                         "2", "--batch", "2", "--subnets", "3", "--reps", "3"], capsys)
    assert code == 0, err
    rec = yaml.safe_load(next(out_dir.glob("l2-*.yaml")).read_text())
    finite = [k for k in rec["checks"] if k.startswith("finite[")]
    assert len(finite) == 3 and "finite[XL-XL#0]" in finite and "finite[XL-XL#2]" in finite, finite
