"""serve-kernels' GEMM rows: timed as CUDA-graph replays on a GPU (eagerly where capture fails, and on the CPU),
the mode in each row's ``timed`` column."""
from __future__ import annotations

import types

import pytest
import torch

from gpulab.core import timing
from gpulab.vajra import kernel_bench as KB


def _rec():
    return types.SimpleNamespace(notes=[], metrics={}, rows=[])


def _fake_benchmark(calls):
    def bench(fn, *, device, warmup=3, reps=20, flush_l2=False, **kw):
        calls.append({"fn": fn, "device": device, "warmup": warmup, "reps": reps, "flush_l2": flush_l2})
        return timing.summarize([0.5])
    return bench


def test_timed_replays_a_graph_on_a_gpu(monkeypatch):
    calls, graph = [], types.SimpleNamespace(replay=lambda: None)
    monkeypatch.setattr(timing, "benchmark", _fake_benchmark(calls))
    monkeypatch.setattr(KB, "_graph_of", lambda fn: graph)
    rec = _rec()
    t, how = KB._timed(rec, lambda: None, "cuda", 50, "qkv M=1 w8a16")
    assert how == "graph" and t.median == 0.5 and rec.notes == []
    assert len(calls) == 1 and calls[0]["fn"] is graph.replay and calls[0]["flush_l2"] and calls[0]["reps"] == 50
    KB._timed(rec, lambda: None, "cuda", 50, "attn", graph_reps=25)
    assert calls[1]["reps"] == 25


def test_timed_falls_back_to_eager_where_capture_fails(monkeypatch):
    calls = []

    def no_graph(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timing, "benchmark", _fake_benchmark(calls))
    monkeypatch.setattr(KB, "_graph_of", no_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    rec, fn = _rec(), (lambda: None)
    t, how = KB._timed(rec, fn, "cuda", 50, "o M=16 dequant-jit", warmup=3)
    assert how == "eager" and calls[0]["fn"] is fn and calls[0]["flush_l2"] and calls[0]["warmup"] == 3
    assert rec.notes == ["o M=16 dequant-jit: CUDA-graph capture failed (RuntimeError), timed eagerly"]


def test_timed_on_the_cpu_is_eager(monkeypatch):
    monkeypatch.setattr(KB, "_graph_of", lambda fn: pytest.fail("no CUDA graph on the CPU"))
    t, how = KB._timed(_rec(), lambda: torch.ones(4).sum(), "cpu", 2, "x")
    assert how == "eager" and t.median >= 0


def test_gemm_rows_name_their_timing_mode(out_dir):
    from typer.testing import CliRunner

    from gpulab.core import results

    r = CliRunner().invoke(KB.app, ["--size", "small", "--tokens", "1,4", "--reps", "1", "--no-decode",
                                    "--no-attn-kernels", "--no-tilings"])
    assert r.exit_code == 0, r.output
    rec = results.load(sorted(out_dir.glob("vajra-kernels-*.yaml"))[-1])
    gemm_rows = [row for row in rec["rows"] if row["gemm"] in KB.GEMMS_8B]
    assert len(gemm_rows) >= 8 and rec["ok"]
    want = "graph" if torch.cuda.is_available() else "eager"
    assert {row["timed"] for row in gemm_rows} == {want}


@pytest.mark.gpu
def test_gpu_w8a16_gemm_is_timed_in_a_graph():
    """The Triton W8A16 GEMM, its dequant+GEMM and dense neighbours capture into a CUDA graph: the rows time the
    kernels, not the wrappers' launch."""
    import torch.nn.functional as F

    from gpulab.vajra import fp8_kernels as K
    from gpulab.vajra import reference as R
    from gpulab.vajra.w8a16 import w8a16_matmul

    w = torch.randn(1024, 512, device="cuda") * 0.02
    q, s = R.quantize_rows(w)
    x = torch.randn(1, 512, device="cuda").to(torch.bfloat16)
    rec = _rec()
    for fn in (lambda: w8a16_matmul(x, q, s, "channel"), lambda: F.linear(x, w.to(torch.bfloat16)),
               lambda: F.linear(x, K.dequantize(q, s, None, out_dtype=torch.bfloat16))):
        t, how = KB._timed(rec, fn, "cuda", 5, "gemm")
        assert how == "graph" and t.median > 0, rec.notes
    prof = KB.kernel_profile(lambda: w8a16_matmul(x, q, s, "channel"))  # the profiler sees CUDA kernels here
    assert prof is not None and prof["kernels"] >= 1 and prof["kernel_us"] > 0, prof


def test_summarize_kernels_sums_device_time_by_kernel():
    """One profiled step -> launches, device time inside kernels, the kernels that take the most; host events,
    copies and memsets are not kernels."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from gpulab.vajra.kernel_bench import summarize_kernels

    def ev(name, us, dev=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [ev("w8a16_gemv", 30.0), ev("rms_norm", 2.0), ev("w8a16_gemv", 40.0), ev("Memcpy HtoD", 9.0),
              ev("memset", 1.0), ev("aten::mm", 500.0, DeviceType.CPU), ev("rope_" + "x" * 90, 3.5)]
    s = summarize_kernels(events, top=2)
    assert s["kernels"] == 4 and s["kernel_us"] == 75.5
    assert s["top"] == {"w8a16_gemv": {"launches": 2, "us": 70.0}, "rope_" + "x" * 75: {"launches": 1, "us": 3.5}}


def test_the_batch_1_goal_flag_takes_the_fastest_backend_whatever_the_order():
    """goal_decode_b1_graph_le_3.4ms was the last backend's: `--attention triton,flashinfer` and
    `flashinfer,triton` gave different flags for the same times."""
    from gpulab.vajra.kernel_bench import decode_b1_goal_met

    for order in (("triton", 3.3), ("flashinfer", 3.9)), (("flashinfer", 3.9), ("triton", 3.3)):
        metrics = {"decode_b1_ms_other": 1.0}
        for be, ms in order:
            metrics[f"decode_b1_{be}_graph_ms"] = ms
        assert decode_b1_goal_met(metrics) is True
    assert decode_b1_goal_met({"decode_b1_triton_graph_ms": 3.5}) is False
    assert decode_b1_goal_met({}) is False


def test_its_own_out_option_is_checked_before_the_work(tmp_path, monkeypatch, capsys):
    """serve-kernels --out DIR (the command's own option, not gpulab's global one) that cannot take the record
    fails before the kernels are timed, not at the save after them."""
    from gpulab import cli

    monkeypatch.setattr(KB, "_attention_kernels", lambda *a, **k: pytest.fail("worked first"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "results"), "serve-kernels", "--out", str(blocker / "sub"),
                  "--size", "small", "--tokens", "1", "--reps", "1", "--no-decode", "--no-gemms"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith(f"error: --out {blocker / 'sub'}") and "\n" not in err


@pytest.mark.parametrize("budget", ["-1", "nan"])
def test_a_budget_that_is_no_number_of_seconds_is_refused(out_dir, budget):
    """--budget-s takes seconds, 0 for none (as serve-bench refuses what is not a number of seconds): a negative
    one ran without a budget, NaN without one too (no comparison with it holds)."""
    from typer.testing import CliRunner

    from gpulab.core.errors import InputError

    r = CliRunner().invoke(KB.app, ["--size", "small", "--tokens", "1", "--reps", "1", "--no-decode",
                                    "--no-attn-kernels", "--no-gemms", "--budget-s", budget])
    assert isinstance(r.exception, InputError) and "--budget-s" in str(r.exception)
    assert not list(out_dir.glob("vajra-kernels-*.yaml"))


def test_nothing_to_measure_is_refused(out_dir):
    """--no-gemms --no-attn-kernels --no-decode wrote a record that measured nothing."""
    from typer.testing import CliRunner

    from gpulab.core.errors import InputError

    r = CliRunner().invoke(KB.app, ["--size", "small", "--tokens", "1", "--reps", "1", "--no-decode",
                                    "--no-attn-kernels", "--no-gemms"])
    assert isinstance(r.exception, InputError), r.output
    assert str(r.exception) == "--no-gemms, --no-attn-kernels and --no-decode leave nothing to measure"
    assert not list(out_dir.glob("vajra-kernels-*.yaml"))


def test_help_has_a_description():
    from typer.testing import CliRunner

    r = CliRunner().invoke(KB.app, ["--help"])
    assert r.exit_code == 0 and "Benchmark vajra's kernels" in r.output


def _cli_error(tmp_path, capsys, args):
    from gpulab import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--device", "cpu", "--out", str(tmp_path / "results"), "serve-kernels", "--reps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("vajra-kernels-*.yaml"))
    return err


@pytest.mark.parametrize("args", [["--no-gemms", "--no-attn-kernels"], ["--no-gemms", "--no-attn-kernels",
                                                                        "--size", "small"]])
def test_nothing_this_machine_can_measure_is_refused(tmp_path, capsys, monkeypatch, args):
    """On the CPU (or at --size small) the decode step is skipped with a note: with the GEMMs and the attention
    kernels off, the record measured nothing."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = _cli_error(tmp_path, capsys, args)
    assert "leave nothing to measure" in err and "the decode step needs a GPU and --size full" in err, err


def test_attention_kernels_alone_on_the_cpu_need_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = _cli_error(tmp_path, capsys, ["--no-gemms", "--no-decode"])
    assert "leave nothing to measure" in err and "TRITON_INTERPRET=1" in err, err


@pytest.mark.parametrize("args, needle", [
    (["--no-gemms", "--tilings"], "--tilings applies only to --gemms"),
    (["--no-gemms", "--tokens", "1,4"], "--tokens applies only to --gemms"),
    (["--no-attn-kernels", "--no-decode", "--attention", "triton"],
     "--attention applies only to --attn-kernels or --decode"),
])
def test_options_of_parts_that_are_off_are_refused(tmp_path, capsys, monkeypatch, args, needle):
    """--tilings and --tokens set the GEMM rows, --attention the attention kernels' and the decode step's
    backends: with those parts off they were silently ignored."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the attention kernels would run: only the option is at fault
    monkeypatch.setattr(KB, "_attention_kernels", lambda *a, **k: pytest.fail("refused after the work"))
    err = _cli_error(tmp_path, capsys, ["--size", "small", *args])
    assert needle in err, err
