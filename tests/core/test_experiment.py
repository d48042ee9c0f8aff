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
              exit_code: int = typer.Option(0, "--exit-code"), n_max: int = typer.Option(0, "--n-max"),
              tag: list[str] = typer.Option([], "--tag"), interrupt: str = typer.Option("", "--interrupt")):
        if interrupt == "signal":  # Ctrl-C: SIGINT to this process, taken at the next bytecode
            import os
            import signal
            import time

            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        if interrupt == "term":  # SIGTERM (timeout, a job scheduler)
            import os
            import signal
            import time

            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        if interrupt == "keyboard":  # a KeyboardInterrupt that no handler of gpulab's turned into its own
            raise KeyboardInterrupt
        if exit_code:
            raise typer.Exit(exit_code)
        if dtype == "bogus":  # a value the command itself refuses, as sort bench does an unknown --dist
            raise InputError("--dtype bogus is not a dtype")
        rec = results.Record(name="echo-bench", config={"n": n, "dtype": dtype, "fast": fast, "tag": list(tag)})
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


@pytest.mark.parametrize("how", ["signal", "keyboard"])
def test_ctrl_c_stops_a_sweep_and_a_command_with_exit_130(echo_command, tmp_path, capsys, how):
    """Ctrl-C in a sweep's second run stops the sweep there (Typer turns a KeyboardInterrupt into exit code 130,
    which the sweep took for one failed run before going on): no later run, no summary, 'error: interrupted'."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"interrupt": ["", how, ""], "n": 1}}]})
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"
    assert len(list(out.glob("echo-bench-*.yaml"))) == 1 and not list(out.glob("run-*.yaml"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "echo", "--interrupt", how])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "error: interrupted"
    with pytest.raises(SystemExit) as e:  # --debug: the traceback, and still 130
        cli.main(["--debug", "--out", str(out), "echo", "--interrupt", how])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "Traceback" in err and err.endswith("error: interrupted")
    assert signal.getsignal(signal.SIGINT) is handler  # pytest's own handler is back


def test_ctrl_c_in_a_forked_child_is_a_keyboard_interrupt(monkeypatch):
    """A child forked while gpulab's handler is installed (a DataLoader worker) gets the KeyboardInterrupt its own
    code expects; the main process gets gpulab's Interrupted."""
    import os
    import signal

    from gpulab.core.errors import Interrupted

    monkeypatch.setattr(cli, "_MAIN_PID", [os.getpid()])
    with pytest.raises(Interrupted):
        cli._raise_interrupted(signal.SIGINT, None)
    monkeypatch.setattr(cli, "_MAIN_PID", [os.getpid() + 1])  # as seen from a child
    with pytest.raises(KeyboardInterrupt):
        cli._raise_interrupted(signal.SIGINT, None)


def test_empty_name_and_description_are_absent(echo_command, tmp_path):
    data = experiment.load_file(write(tmp_path, "name:\ndescription:\nruns:\n  - command: echo\n    name:\n"))
    (inv,) = experiment.plan(data)
    assert inv.label == "echo"


def _run(out, exp, *extra):
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp), *extra])
    return e.value.code


def test_summary_fails_when_a_run_with_a_shared_label_fails(echo_command, tmp_path, capsys):
    """Two runs with one label: the failed one must not be overwritten by the good one in the summary's checks."""
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"dtype": "bogus"}}, {"command": "echo"}]})
    assert _run(out, exp) == 1
    (summary,) = [results.load(f) for f in out.glob("run-*.yaml")]
    assert summary["ok"] is False and len(summary["checks"]) == 2


def test_records_of_a_run_keep_their_own_command_line(echo_command, tmp_path, capsys):
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"n": [5, 6]}}]})
    assert _run(out, exp) == 0
    argvs = sorted(results.load(f)["argv"] for f in out.glob("echo-bench-*.yaml"))
    assert [a[-3:] for a in argvs] == [["echo", "--n", "5"], ["echo", "--n", "6"]]


@pytest.mark.parametrize("text, message", [
    ("runs:\n  - command: echo\n    params: {n: 1, n: 2}\n", "duplicate key 'n'"),
    ("runs:\n  - command: echo\n    params: {dtype: null}\n", "parameter 'dtype' is null"),
    ("runs:\n  - command: echo\n    params: {1: 2}\n", "parameter names must be strings"),
    ("runs:\n  - command: echo\n    params: {n: []}\n", "runs\\[0\\]: parameter 'n' is an empty list"),
    ("runs:\n  - command: echo\n    params: {n: 1, n_max: abc}\n", "parameter 'n_max'"),
    ("runs:\n  - command: echo\n    args: [null]\n", "'args' must be a list"),
    ("runs:\n  - command: echo\n    params: {n-max: 1, n_max: 2}\n", "parameter 'n_max' is given twice \\(also as 'n-max'\\)"),
    ("runs:\n  - command: echo\n    name: 5\n", "runs\\[0\\]: 'name' must be a non-empty string, got 5"),
    ("runs:\n  - command: echo\n    name: [a, b]\n    params: {n: [1, 2]}\n", "'name' must be a non-empty string"),
    ("name: {a: 1}\nruns:\n  - command: echo\n", "'name' must be a string, got dict"),
    ("description: [1]\nruns:\n  - command: echo\n", "'description' must be a string, got list"),
    ("runs:\n  - command: echo\n    params: {n: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype: [a, b, c, d, e, f, g, h, i, j],"
     " tag: [[a], [b], [c], [d], [e], [f], [g], [h], [i], [j]], n_max: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n",
     "the sweep has 11000 points"),
])
def test_more_validation_errors(echo_command, tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        experiment.plan(experiment.load_file(write(tmp_path, text)))


def test_yaml_1_2_scalars(echo_command, tmp_path):
    """n: 010 is ten and 'no' a string (PyYAML's YAML 1.1 would give 8 and False)."""
    data = experiment.load_file(write(tmp_path, "runs:\n  - command: echo\n    params: {n: 010, dtype: no}\n"))
    (inv,) = experiment.plan(data)
    assert inv.argv == ["echo", "--n", "10", "--dtype", "no"]


def test_repeatable_option_takes_a_list_and_sweeps_lists_of_lists(echo_command, tmp_path, capsys):
    data = experiment.load_file(write(tmp_path, {"runs": [{"command": "echo", "params": {"tag": ["a", "b"]}},
                                                          {"command": "echo", "params": {"tag": [["a"], ["b", "c"]]}}]}))
    assert [i.argv for i in experiment.plan(data)] == [
        ["echo", "--tag", "a", "--tag", "b"], ["echo", "--tag", "a"], ["echo", "--tag", "b", "--tag", "c"]]


def test_dry_run_prints_markup_and_spaces_literally(echo_command, tmp_path, capsys):
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"dtype": "[/] a b"}}]})
    assert _run(tmp_path / "res", exp, "--dry-run") == 0
    assert capsys.readouterr().out.strip() == "gpulab echo --dtype '[/] a b'"


def test_bad_out_folder_fails_before_any_run(echo_command, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    exp = write(tmp_path, {"runs": [{"command": "echo"}]})
    for out in (blocker, blocker / "sub"):
        assert _run(out, exp) == 1
        err = capsys.readouterr().err
        assert "--out" in err and str(blocker) in err and len(err.strip().splitlines()) == 1


def test_a_folder_is_not_an_experiment_file(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        experiment.load_file(tmp_path)


def test_stop_on_error_says_what_did_not_run(echo_command, tmp_path, capsys):
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"fail": [True, False, False]}}]})
    assert _run(tmp_path / "res", exp, "--stop-on-error") == 1
    assert "1 of 1 runs failed, 2 not run (--stop-on-error)" in capsys.readouterr().err


def test_a_cuda_experiment_without_a_gpu_fails_before_any_run(echo_command, tmp_path, capsys, monkeypatch):
    """`device: cuda` with no GPU: one error up front (every run failed, one by one); --dry-run shows the device."""
    from gpulab.core import options

    monkeypatch.setattr(options, "cuda_available", lambda: False)
    out = tmp_path / "res"
    exp = write(tmp_path, {"device": "cuda", "runs": [{"command": "echo", "params": {"n": [1, 2]}}]})
    assert _run(out, exp) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda was asked for, but no CUDA GPU is visible") and "\n" not in err
    assert not out.exists() or not list(out.glob("*.yaml"))
    assert _run(out, exp, "--dry-run") == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("gpulab --device cuda echo")
    plain = write(tmp_path, {"runs": [{"command": "echo"}]})  # the call's --device, not the file's: not named
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda", "--out", str(out), "run", str(plain)])
    assert "(gpulab run)" in capsys.readouterr().err


def test_sigterm_ends_a_sweep_as_terminated_and_cleans_up(echo_command, tmp_path, capsys):
    """SIGTERM ended the process at once (the default): `finally` blocks never ran, so a folder being built stayed
    behind half-written. Now it is gpulab's Interrupted: 'error: terminated', exit 143, handlers restored."""
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"interrupt": ["", "term", ""], "n": 1}}]})
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 143 and capsys.readouterr().err.strip().splitlines()[-1] == "error: terminated"
    assert len(list(out.glob("echo-bench-*.yaml"))) == 1 and not list(out.glob("run-*.yaml"))
    assert {s: signal.getsignal(s) for s in handlers} == handlers



@pytest.mark.parametrize("text, message", [
    ("runs:\n  - command: echo\n    args: 0\n", "'args' must be a list"),
    ("runs:\n  - command: echo\n    args: ''\n", "'args' must be a list"),
    ("runs:\n  - command: echo\n    params: []\n", "'params' must be a mapping"),
    ("runs:\n  - command: echo\n    params: false\n", "'params' must be a mapping"),
])
def test_falsy_params_or_args_of_the_wrong_type_are_errors(echo_command, tmp_path, text, message):
    """`args: 0` was taken for no arguments (dropped silently) because of `run.get("args") or []`."""
    with pytest.raises(InputError, match=message):
        experiment.plan(experiment.load_file(write(tmp_path, text)))


def test_empty_params_and_args_are_absent(echo_command, tmp_path):
    text = "runs:\n  - command: echo\n    params:\n    args:\n"
    (inv,) = experiment.plan(experiment.load_file(write(tmp_path, text)))
    assert inv.argv == ["echo"]


def test_every_run_key_is_documented():
    """expect_ok was accepted but documented nowhere: each key of a run is named in the module's format and in
    README.md's experiment section."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Experiment files", 1)[1].split("\n### ", 1)[0]
    for key in experiment.RUN_KEYS:
        assert f"{key}:" in experiment.__doc__, key
        assert key in section, key


def test_expect_ok_false_counts_a_failing_run_as_the_expected_outcome(echo_command, tmp_path, capsys):
    out = tmp_path / "res"
    exp = write(tmp_path, {"runs": [{"command": "echo", "params": {"fail": True}, "expect_ok": False},
                                    {"command": "echo", "params": {"dtype": "bogus"}, "expect_ok": False}]})
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 0, capsys.readouterr().err
    (summary,) = [results.load(f) for f in out.glob("run-*.yaml")]
    assert summary["ok"] is True and [r["ok"] for r in summary["rows"]] == [True, True]
    exp = write(tmp_path, {"runs": [{"command": "echo", "expect_ok": False}]})  # it passed: not what was expected
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "run", str(exp)])
    assert e.value.code == 1 and "1 of 1 runs failed" in capsys.readouterr().err


def test_a_flag_named_by_its_negative_spelling_keeps_its_meaning(echo_command, tmp_path):
    """`no_fast: true` (the --no-fast spelling of --fast/--no-fast) gave --fast: the opposite of what was written."""
    data = experiment.load_file(write(tmp_path, {"runs": [{"command": "echo", "params": {"no_fast": [True, False]}},
                                                          {"command": "echo", "params": {"no-fast": True}},
                                                          {"command": "echo", "params": {"fast": [True, False]}}]}))
    assert [i.argv for i in experiment.plan(data)] == [
        ["echo", "--no-fast"], ["echo", "--fast"], ["echo", "--no-fast"], ["echo", "--fast"], ["echo", "--no-fast"]]
