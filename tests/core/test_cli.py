import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpulab import cli
from gpulab.core import results

ROOT = Path(__file__).resolve().parents[2]


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gpulab", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_every_group_without_torch():
    code = ("import sys; from gpulab import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.stdout.strip().endswith("NO-TORCH"), p.stdout + p.stderr
    for group in ("probe", "serve", "serve-kernels", "kvstitch", "seam", "l2", "join", "sort", "run", "report"):
        assert f" {group} " in p.stdout, group


def test_import_cli_imports_no_torch():
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gpulab.cli"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0
    assert "torch" not in p.stderr


def test_probe_writes_yaml(tmp_path):
    p = run("--out", str(tmp_path), "probe")
    assert p.returncode == 0, p.stderr
    files = list(tmp_path.glob("probe-*.yaml"))
    assert len(files) == 1
    data = results.load(files[0])
    import torch

    assert data["device"]["backend"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert data["device"]["cpu"]["cores"] >= 1
    assert "torch" in data["device"]["versions"]


@pytest.mark.parametrize("args, message", [
    (["run", "does-not-exist.yaml"], "experiment file not found: does-not-exist.yaml"),
])
def test_known_errors_are_one_line(args, message):
    p = run(*args)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {message}"
    assert "Traceback" not in p.stderr


def test_malformed_yaml_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: [\n")
    p = run("run", str(bad))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "malformed YAML" in lines[0] and str(bad) in lines[0]


def test_debug_shows_traceback(tmp_path):
    p = run("--debug", "run", str(tmp_path / "nope.yaml"))
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_usage_errors_exit_2():
    assert run("--device", "tpu", "probe").returncode == 2
    assert run("probe", "--bogus").returncode == 2
    assert run("no-such-group").returncode == 2


def test_report_markdown(tmp_path):
    assert run("--out", str(tmp_path), "probe").returncode == 0
    (tmp_path / "unrelated.yaml").write_text("a: 1\n")  # not a result: skipped in a folder scan
    p = run("report", str(tmp_path), "--format", "markdown")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("| file | name |") and "| probe |" in p.stdout
    p = run("report", str(tmp_path / "empty"))
    assert p.returncode == 1 and "no such folder" in p.stderr


def test_missing_subsystem_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("gpulab.ghost.cli:app", "missing"))
    with pytest.raises(SystemExit) as e:
        cli.main(["ghost"])
    assert e.value.code == 1
    assert "not available in this build" in capsys.readouterr().err


def test_out_of_gpu_memory_is_one_line(monkeypatch, capsys):
    class OutOfMemoryError(RuntimeError):  # what torch raises (torch.OutOfMemoryError), without a GPU
        pass

    def boom(*a, **k):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has a total capacity ...")

    monkeypatch.setattr(cli.typer.main, "get_command", lambda app: type("C", (), {"main": staticmethod(boom)})())
    with pytest.raises(SystemExit) as e:
        cli.main(["sort", "bench"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of GPU memory: CUDA out of memory. Tried to allocate")


@pytest.mark.parametrize("exc", [RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 80000000000 bytes."),
                                 MemoryError()])
def test_out_of_host_memory_is_one_line(monkeypatch, capsys, exc):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(cli.typer.main, "get_command", lambda app: type("C", (), {"main": staticmethod(boom)})())
    with pytest.raises(SystemExit) as e:
        cli.main(["l2", "run"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: out of host memory: ")
    assert "try smaller sizes" in err


def test_resolve_device_errors(monkeypatch):
    from gpulab.core import options
    from gpulab.core.errors import DeviceError

    monkeypatch.setattr(options, "cuda_available", lambda: False)
    assert options.resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        options.resolve_device("cuda")
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        options.resolve_device("auto", need_gpu=True, what="the L2 policies")


def test_a_failed_check_exits_1_after_writing_the_record(tmp_path, monkeypatch, capsys):
    save = results.Record.save

    def save_with_a_failed_check(self, out=None):
        self.check("forced", False, "made to fail by the test")
        return save(self, out)

    monkeypatch.setattr(results.Record, "save", save_with_a_failed_check)
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path), "probe"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checks failed: forced (see ") and err.count("\n") == 1, err
    (path,) = tmp_path.glob("probe-*.yaml")
    assert results.load(path)["ok"] is False


def test_probe_ceilings_on_the_cpu_says_what_it_skipped(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["--device", "cpu", "--out", str(tmp_path), "probe", "--ceilings"])
    assert e.value.code == 0
    data = results.load(next(tmp_path.glob("probe-*.yaml")))
    assert data["metrics"]["ceilings"]["copy_gbs"] > 0
    assert any("need a CUDA GPU" in n for n in data["notes"])


def test_debug_is_this_calls_own_or_the_environments(tmp_path, monkeypatch, capsys):
    """An earlier --debug call in the process must not make a later call print a traceback; GPULAB_DEBUG works."""
    from gpulab.core import options
    from gpulab.core.errors import InputError

    missing = str(tmp_path / "nope.yaml")
    monkeypatch.delenv("GPULAB_DEBUG", raising=False)
    with pytest.raises(InputError, match="experiment file not found") as e:
        cli.main(["--debug", "run", missing])
    assert not isinstance(e.value, SystemExit)  # the traceback path: the exception itself
    with pytest.raises(SystemExit) as e:
        cli.main(["run", missing])
    assert e.value.code == 1 and "error: experiment file not found" in capsys.readouterr().err
    monkeypatch.setenv("GPULAB_DEBUG", "1")
    with pytest.raises(InputError, match="experiment file not found") as e:
        cli.main(["run", missing])
    assert not isinstance(e.value, SystemExit) and options.get().debug is True


def test_summaries_refuse_nan_and_marked_times_counts_every_run():
    from gpulab.core import timing

    with pytest.raises(ValueError, match="NaN"):
        timing.summarize([1.0, float("nan"), 3.0])
    runs = iter([["a"], ["a", "b"], ["a"]])  # "b" only in the middle run (a retry)
    clock = iter(range(100))
    got = timing.marked_times(lambda mark: [mark(n) for n in next(runs)], lambda: next(clock),
                              lambda a, b: float(b - a), lambda: None, reps=2)
    assert got["b"]["launches"] == 1 and got["a"]["launches"] == 1


@pytest.mark.parametrize("argv,work", [
    (["sort", "bench", "--n", "10", "--impl", "numpy"], "gpulab.sort.bench:run"),
    (["join", "bench", "--rows", "10", "--impl", "pandas"], "gpulab.dbjoin.bench:run"),
    (["l2", "run", "--workload", "mlp", "--policy", "default"], "gpulab.l2.bench:run"),
    (["probe"], "gpulab.core.device:probe"),
])
def test_an_out_folder_that_cannot_take_results_fails_before_the_work(tmp_path, monkeypatch, capsys, argv, work):
    """A record-writing command checks --out first (it found out at its save, after all the work); the check
    creates nothing."""
    import importlib

    module, attr = work.split(":")
    monkeypatch.setattr(importlib.import_module(module), attr, lambda *a, **k: pytest.fail("worked first"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as e:
            cli.main(["--out", str(out), *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err.startswith(f"error: --out {out}") and "\n" not in err
    results.check_out_folder(tmp_path / "new" / "deeper")  # creatable: fine, and not created by the check
    assert not (tmp_path / "new").exists()


def test_an_empty_out_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", "", "probe"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
