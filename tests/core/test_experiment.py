import sys
import types

import pytest
import typer
import yaml

from gpulab import cli
from gpulab.core import experiment, results
from gpulab.core.errors import InputError


@pytest.fixture
def echo_command(monkeypatch):
    """Register a test-only command 'echo-bench' that records its parameters as a result."""
    mod = types.ModuleType("gpulab_test_echo")
    app = typer.Typer()

    @app.command()
    def bench(n: int = typer.Option(1, "--n"), dtype: str = typer.Option("int32", "--dtype"),
              fast: bool = typer.Option(False, "--fast/--no-fast"), fail: bool = typer.Option(False, "--fail"),
              exit_code: int = typer.Option(0, "--exit-code")):
        if exit_code:
            raise typer.Exit(exit_code)
        rec = results.Record(name="echo-bench", config={"n": n, "dtype": dtype, "fast": fast})
        rec.summary = {"n": n, "dtype": dtype}
        rec.check("ok", not fail)
        rec.save()

    mod.app = app
    monkeypatch.setitem(sys.modules, "gpulab_test_echo", mod)
    monkeypatch.setitem(cli.COMMANDS, "echo", ("gpulab_test_echo:app", "test"))
    yield


def write(tmp_path, data):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return p


def test_expand_is_cartesian_in_order():
    assert experiment.expand({"a": [1, 2], "b": "x", "c": [True, False]}) == [
        {"a": 1, "b": "x", "c": True}, {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True}, {"a": 2, "b": "x", "c": False}]
    with pytest.raises(InputError, match="'a' is an empty list"):
        experiment.expand({"a": []})


def test_plan_builds_argv(echo_command, tmp_path):
    data = experiment.load_file(write(tmp_path, {"runs": [{"command": "echo", "params": {"n": [1, 2], "fast": True}}]}))
    invs = experiment.plan(data)
    assert [i.argv for i in invs] == [["echo", "--n", "1", "--fast"], ["echo", "--n", "2", "--fast"]]


@pytest.mark.parametrize("data, message", [
    ({"runs": [{"command": "echo"}], "bogus": 1}, "unknown key 'bogus'"),
    ({"runs": [{"command": "echo", "extra": 1}]}, "unknown key 'extra'"),
    ({"runs": [{"command": "echo", "params": {"nn": 1}}]}, "unknown parameter 'nn'"),
    ({"runs": [{"command": "echo", "params": {"n": "many"}}]}, "parameter 'n'"),
    ({"runs": [{"command": "echo", "params": {"fast": "yes"}}]}, "parameter 'fast' must be true or false"),
    ({"runs": [{"command": "nope"}]}, "unknown command 'nope'"),
    ({"runs": []}, "'runs' must be a non-empty list"),
    ({"runs": [{"command": "echo"}], "device": "tpu"}, "'device' must be"),
    ("runs: [\n", "malformed YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_validation_errors_name_the_key(echo_command, tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        experiment.plan(experiment.load_file(write(tmp_path, data)))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        experiment.load_file(tmp_path / "nope.yaml")


def test_run_end_to_end_writes_results_and_summary(echo_command, tmp_path, capsys):
    out = tmp_path / "res"
    exp = write(tmp_path, {"name": "t", "runs": [{"command": "echo", "params": {"n": [3, 4], "dtype": "f32"}}]})
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 0
    files = sorted(out.glob("echo-bench-*.yaml"))
    assert sorted(results.load(f)["config"]["n"] for f in files) == [3, 4]
    summary = [results.load(f) for f in out.glob("run-*.yaml")]
    assert len(summary) == 1 and summary[0]["ok"] is True and len(summary[0]["rows"]) == 2


def test_run_reports_failed_runs(echo_command, tmp_path, capsys):
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"fail": [False, True]}}]})
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 1
    assert "1 of 2 runs failed" in capsys.readouterr().err


def test_out_placeholder_is_the_calls_out_folder(echo_command, tmp_path, capsys):
    out = tmp_path / "res"
    exp = write(tmp_path, 'runs:\n  - command: echo\n    params: {dtype: "{out}/x"}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 0
    (f,) = out.glob("echo-bench-*.yaml")
    assert results.load(f)["config"]["dtype"] == f"{out}/x"


def test_a_single_command_with_a_failed_check_exits_1(echo_command, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path), "echo", "--fail"])
    assert e.value.code == 1 and "checks failed: ok" in capsys.readouterr().err


def test_run_counts_a_command_that_exits_non_zero_through_typer_exit(echo_command, tmp_path, capsys):
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"exit_code": [0, 3]}}]})
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 1
    assert "1 of 2 runs failed" in capsys.readouterr().err
    (summary,) = [results.load(f) for f in out.glob("run-*.yaml")]
    assert [r["ok"] for r in summary["rows"]] == [True, False] and summary["rows"][1]["error"] == "exit 3"
