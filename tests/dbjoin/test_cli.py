"""`gpulab join ...` end to end at small sizes (CPU implementations; the GPU ones report as skipped)."""
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpulab.cli import invoke, main
from gpulab.core.errors import DeviceError, InputError

ROOT = Path(__file__).resolve().parents[2]


def _result(out_dir):
    files = sorted(Path(out_dir).glob("join-bench-*.yaml"))
    assert len(files) == 1
    return yaml.safe_load(files[0].read_text())


def test_bench_small_all_impls(out_dir):
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "600", "--right-rows", "500", "--dup", "zipf:0.5", "--key-dtype", "int64",
            "--reps", "2", "--warmup", "1", "--tc-block", "32"])
    data = _result(out_dir)
    assert data["ok"] is True
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"hash", "hash-graph", "hash-cpu", "tensorcore", "tensorcore-graph", "torch", "pandas"}
    ref = data["metrics"]["output_rows"]
    for impl in ("hash-cpu", "tensorcore", "torch", "pandas"):
        if "skipped" not in rows[impl]:
            assert rows[impl]["correct"] is True and rows[impl]["output_rows"] == ref
    assert data["checks"]["hash-cpu"]["passed"]
    if "skipped" not in rows["tensorcore"]:  # its first capacity guess is max(rows, right rows): short iff more pairs
        assert rows["tensorcore"]["retries_per_call"] == (1.0 if ref > 600 else 0.0)
        assert data["metrics"]["tensorcore_retries"] >= 2 * rows["tensorcore"]["retries_per_call"]
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not data["device"]["gpu"]:
        assert "skipped" in rows["hash"] and any(n.startswith("hash: skipped") for n in data["notes"])
        assert "skipped" in rows["hash-graph"] and any(n.startswith("hash-graph: skipped") for n in data["notes"])
        assert "needs a CUDA GPU" in rows["tensorcore-graph"]["skipped"]


def test_tensorcore_graph_options(out_dir):
    """tensorcore-graph takes the tensor-core options (one tile size: a list times only `tensorcore`)."""
    with pytest.raises(InputError, match="^--tc-block 64,32 times the tensorcore join at each size; without "
                                         "--impl tensorcore it takes one size"):
        invoke(["--out", str(out_dir), "join", "bench", "--rows", "50", "--impl", "tensorcore-graph,pandas",
                "--tc-block", "64,32"])
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "50", "--impl", "tensorcore-graph,pandas",
            "--tc-block", "32", "--tc-dtype", "fp16", "--reps", "1", "--warmup", "0"])
    rows = {r["impl"]: r for r in _result(out_dir)["rows"]}
    assert set(rows) == {"tensorcore-graph", "pandas"}


@pytest.mark.parametrize("aggregate, block", [("none", 32), ("sum", 64)])
def test_tile_size_default_is_the_join_s_32_and_the_aggregate_s_64(aggregate, block, out_dir):
    """Without --tc-block: the join at 32 (faster than 64 on the H200 twice), the aggregate at 64 (older Tritons
    cannot compile it below 64)."""
    from gpulab.dbjoin import bench as B

    assert B.default_block(aggregate) == block and B.BenchConfig().tc_block == B.DEFAULT_JOIN_BLOCK == 32
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "64", "--impl", "tensorcore,pandas", "--reps", "1",
            "--warmup", "0", "--aggregate", aggregate])
    rec = next(Path(out_dir).glob("join-*bench-*.yaml"))  # join-bench or join-agg-bench
    assert yaml.safe_load(rec.read_text())["config"]["tc_block"] == block


def test_bench_tensorcore_at_several_tile_sizes(out_dir):
    """--tc-block 32,16: the tensorcore join at the first size (row `tensorcore`) and again at each further one
    (row `tensorcore@16`), each checked against pandas and in the summary."""
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "300", "--dup", "zipf:0.7", "--key-dtype", "int64",
            "--impl", "tensorcore,pandas", "--reps", "1", "--warmup", "0", "--tc-block", "32,16"])
    data = _result(out_dir)
    assert data["ok"] is True and data["config"]["tc_block"] == 32 and data["config"]["tc_blocks_more"] == [16]
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"tensorcore", "tensorcore@16", "pandas"}
    if "skipped" not in rows["tensorcore"]:
        assert rows["tensorcore"]["tc_block"] == 32 and rows["tensorcore@16"]["tc_block"] == 16
        assert rows["tensorcore@16"]["partitions"] > rows["tensorcore"]["partitions"]  # fewer rows per partition
        for name in ("tensorcore", "tensorcore@16"):
            assert rows[name]["correct"] is True and data["checks"][name]["passed"]
            assert rows[name]["output_rows"] == data["metrics"]["output_rows"]


@pytest.mark.parametrize("value, why", [("64,48", "--tc-block must be 16, 32, 64 or 128, got 48"),
                                        ("64,x", "--tc-block must be 16, 32, 64 or 128 (or a list of them), got"),
                                        ("", "--tc-block must be 16, 32, 64 or 128 (or a list of them), got")])
def test_bench_tile_size_list_errors(out_dir, value, why):
    with pytest.raises(InputError, match=why.replace("(", r"\(").replace(")", r"\)")):
        invoke(["--out", str(out_dir), "join", "bench", "--rows", "10", "--impl", "tensorcore", "--tc-block", value])
    with pytest.raises(InputError, match="--tc-block takes one tile size with --aggregate"):
        invoke(["--out", str(out_dir), "join", "bench", "--rows", "10", "--impl", "tensorcore", "--aggregate", "sum",
                "--tc-block", "64,32"])


def test_bench_hash_graph_skipped_without_gpu(out_dir):
    """Without cupy or a GPU, hash-graph (like hash) is one row with a one-line reason; the rest still runs."""
    from gpulab.core import options

    if options.cuda_available():
        pytest.skip("a GPU is visible")
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "300", "--impl", "hash,hash-graph,torch,pandas",
            "--reps", "1", "--warmup", "0"])
    data = _result(out_dir)
    assert data["ok"] is True
    rows = {r["impl"]: r for r in data["rows"]}
    for impl in ("hash", "hash-graph"):
        why = rows[impl]["skipped"]
        assert why and "\n" not in why and rows[impl]["correct"] is None
        assert f"{impl}: skipped: {why}" in data["notes"]
    assert rows["torch"]["correct"] is True and rows["pandas"]["correct"] is True
    assert "hash-graph_ms" not in data["summary"]


def test_bench_files_and_count_only(out_dir, tmp_path):
    invoke(["join", "gen", str(tmp_path / "l.csv"), str(tmp_path / "r.npz"), "--rows", "300", "--right-rows", "200",
            "--key-dtype", "int64"])
    invoke(["--out", str(out_dir), "join", "bench", "--left", str(tmp_path / "l.csv"), "--right", str(tmp_path / "r.npz"), "--impl",
            "hash-cpu,torch,pandas", "--count-only", "--reps", "1", "--warmup", "0"])
    data = _result(out_dir)
    assert data["ok"] and data["config"]["count_only"] and data["config"]["rows"] == 300
    assert all(r["output_rows"] == 150 for r in data["rows"])


@pytest.mark.parametrize("option", [["--rows", "300"], ["--seed", "3"], ["--dup", "zipf:1.1"], ["--key-dtype", "int64"],
                                    ["--match-rate", "0.2"], ["--right-rows", "5"]])
def test_bench_files_refuse_generation_options(out_dir, tmp_path, option):
    invoke(["join", "gen", str(tmp_path / "l.npz"), str(tmp_path / "r.npz"), "--rows", "20"])
    files = ["--left", str(tmp_path / "l.npz"), "--right", str(tmp_path / "r.npz")]
    with pytest.raises(InputError, match=f"^{option[0]}: for generated tables only \\(with --left/--right"):
        invoke(["--out", str(out_dir), "join", "bench", *files, *option, "--impl", "pandas", "--reps", "1"])
    assert not list(Path(out_dir).glob("*.yaml"))
    # the same option left at its default value (not given) is no error
    invoke(["--out", str(out_dir), "join", "bench", *files, "--impl", "pandas", "--reps", "1", "--warmup", "0"])
    assert _result(out_dir)["ok"]


def test_bench_empty_table(out_dir):
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "50", "--right-rows", "0", "--match-rate", "0", "--impl",
            "hash-cpu,torch,pandas,tensorcore", "--reps", "1", "--warmup", "0"])
    data = _result(out_dir)
    assert data["ok"] and data["metrics"]["output_rows"] == 0


@pytest.mark.parametrize("args,exc,match", [
    (["--impl", "hash,bogus"], InputError, "unknown implementation 'bogus'"),
    (["--left", "x.npz"], InputError, "--left and --right go together"),
    (["--rows", "-5"], InputError, "--rows must be >= 0"),
    (["--key-dtype", "int16"], InputError, "--key-dtype"),
    (["--tc-dtype", "fp64"], InputError, "--tc-dtype"),
    (["--reps", "0", "--impl", "pandas"], InputError, "--reps"),
    (["--match-rate", "2", "--impl", "pandas"], InputError, "--match-rate"),
    (["--seed", "-1", "--impl", "pandas"], InputError, "--seed must be >= 0, got -1"),
    (["--load-factor", "0", "--impl", "hash-cpu"], InputError, "--load-factor must be within"),
    (["--load-factor", "nan", "--impl", "hash,pandas", "--aggregate", "sum"], InputError, "--load-factor"),
    (["--tc-block", "48", "--impl", "tensorcore"], InputError, "--tc-block must be 16, 32, 64 or 128"),
    (["--max-interpret-rows", "-1", "--impl", "tensorcore"], InputError, "--max-interpret-rows must be >= 0"),
    # options of implementations not in --impl would be ignored
    (["--load-factor", "0.3", "--impl", "pandas,tensorcore"], InputError,
     "^--load-factor applies only to the hash implementations \\(not in --impl pandas,tensorcore\\)"),
    (["--tc-block", "32,16", "--tc-dtype", "int8", "--impl", "pandas"], InputError,
     "^--tc-dtype, --tc-block apply only to --impl tensorcore"),
    (["--max-interpret-rows", "5", "--impl", "hash-cpu"], InputError, "^--max-interpret-rows applies only"),
    (["--max-interpret-rows", "5", "--impl", "tensorcore-graph"], InputError, "^--max-interpret-rows applies only"),
    # with --aggregate only `hash` has a hash form: hash-cpu and hash-graph are skipped, so would ignore it
    (["--load-factor", "0.3", "--impl", "hash-cpu,hash-graph,pandas", "--aggregate", "sum"], InputError,
     "^--load-factor applies only to --impl hash with --aggregate \\(not in --impl hash-cpu,hash-graph,pandas\\)"),
])
def test_bench_bad_input(out_dir, args, exc, match):
    with pytest.raises(exc, match=match):
        invoke(["--out", str(out_dir), "join", "bench", "--rows", "10", *args])
    assert not Path(out_dir).exists() or not list(Path(out_dir).glob("*.yaml"))


def test_bench_bad_file_is_one_line_error(out_dir, tmp_path, capsys):
    np.savez(tmp_path / "l.npz", key=np.arange(3.0), payload=np.arange(3))
    np.savez(tmp_path / "r.npz", key=np.arange(3), payload=np.arange(3))
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out_dir), "join", "bench", "--left", str(tmp_path / "l.npz"), "--right", str(tmp_path / "r.npz")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: l.npz: column 'key' must be integer (int32 or int64), got float64"]


def test_bench_npz_that_is_no_zip_is_named(out_dir, tmp_path, capsys):
    (tmp_path / "l.npz").write_text("key,payload\n1,2\n")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out_dir), "join", "bench", "--left", str(tmp_path / "l.npz"), "--right",
              str(tmp_path / "l.npz")])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: l.npz: not a valid .npz file (not a zip archive)"]


def test_ncu_without_gpu_fails_before_any_work(out_dir, monkeypatch):
    from gpulab.core import options
    from gpulab.dbjoin import bench

    if options.cuda_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setattr(bench, "load_tables", lambda cfg: pytest.fail("tables loaded before the --ncu check"))
    for extra in ([], ["--aggregate", "count"]):
        with pytest.raises(DeviceError, match="--ncu needs a CUDA GPU"):
            invoke(["--out", str(out_dir), "join", "bench", "--rows", "10", "--impl", "pandas", "--ncu", *extra])
    assert not Path(out_dir).exists() or not list(Path(out_dir).glob("*.yaml"))


@pytest.mark.parametrize("files", [False, True])
def test_ncu_child_argv_reproduces_the_config(out_dir, tmp_path, monkeypatch, files):
    """The command line handed to ncu's child parses into the same tables and join settings."""
    from gpulab.dbjoin import bench

    seen = []
    monkeypatch.setattr(bench, "run", lambda cfg, argv_for_ncu=None: seen.append((cfg, argv_for_ncu)) or pytest.skip())
    if files:
        invoke(["join", "gen", str(tmp_path / "l.npz"), str(tmp_path / "r.npz"), "--rows", "20"])
        args = ["--left", str(tmp_path / "l.npz"), "--right", str(tmp_path / "r.npz")]
    else:
        args = ["--rows", "77", "--right-rows", "33", "--match-rate", "0.25", "--dup", "zipf:1.2", "--seed", "5",
                "--key-dtype", "int64"]
    args += ["--impl", "hash,tensorcore", "--count-only", "--load-factor", "0.25", "--tc-block", "64,32"]
    for argv in (["join", "bench", *args], None):
        try:
            invoke(argv if argv is not None else seen[-1][1])
        except pytest.skip.Exception:
            pass
    (first, _), (child, _) = seen
    fields = ("rows", "right_rows", "match_rate", "dup", "seed", "key_dtype", "left", "right", "count_only",
              "load_factor", "tc_block", "tc_blocks_more")
    assert {f: getattr(child, f) for f in fields} == {f: getattr(first, f) for f in fields}


@pytest.mark.parametrize("names,match", [
    (("l.npz", "r.txt"), "r.txt: unknown table format '.txt'"),
    (("l.npz", "l.npz"), "would both be written to"),
    (("folder.csv", "r.npz"), "it is a folder"),
    (("l.npz", "file.txt/r.npz"), "is not a folder"),
])
def test_gen_checks_both_outputs_before_writing(tmp_path, names, match):
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file.txt").write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=match):
        invoke(["join", "gen", str(tmp_path / names[0]), str(tmp_path / names[1]), "--rows", "5"])
    assert sorted(tmp_path.rglob("*")) == before  # neither table (nor a temporary) was written


def test_gen_failure_on_the_second_table_leaves_neither(tmp_path, monkeypatch):
    from gpulab.dbjoin import tables

    real = tables.table_writer
    calls = []

    def writer(t, p):  # the second table's write fails (disk full)
        calls.append(p)
        path, write, suffix = real(t, p)
        if len(calls) == 2:
            def write(tmp):
                raise OSError(28, "No space left on device")
        return path, write, suffix

    monkeypatch.setattr(tables, "table_writer", writer)
    (tmp_path / "l.npz").write_bytes(b"old left")
    with pytest.raises(OSError, match="No space left"):
        invoke(["join", "gen", str(tmp_path / "l.npz"), str(tmp_path / "r.npz"), "--rows", "5"])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["l.npz"]  # no temporaries, no right table
    assert (tmp_path / "l.npz").read_bytes() == b"old left"  # the old left table was not replaced
    monkeypatch.setattr(tables, "table_writer", real)
    invoke(["join", "gen", str(tmp_path / "l.npz"), str(tmp_path / "r.npz"), "--rows", "5"])
    assert len(tables.load_table(tmp_path / "l.npz")) == 5 and sorted(x.name for x in tmp_path.iterdir()) == [
        "l.npz", "r.npz"]


def test_gen_negative_seed(tmp_path):
    with pytest.raises(InputError, match="--seed must be >= 0"):
        invoke(["join", "gen", str(tmp_path / "l.npz"), str(tmp_path / "r.npz"), "--seed", "-3"])
    assert not list(tmp_path.iterdir())


def test_gpu_only_impl_without_gpu(out_dir):
    from gpulab.core import options

    if options.cuda_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        invoke(["--out", str(out_dir), "join", "bench", "--rows", "10", "--impl", "hash"])
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        invoke(["--out", str(out_dir), "join", "bench", "--rows", "10", "--impl", "hash-graph,hash"])


def test_experiment_file_validates():
    from gpulab.core import experiment as exp

    data = exp.load_file(ROOT / "experiments" / "join_1m.yaml")
    invocations = exp.plan(data, source="join_1m.yaml")
    assert invocations and all(inv.words == ["join", "bench"] for inv in invocations)
    from gpulab.dbjoin.bench import IMPLS

    for run in data["runs"]:  # every impl named there exists, and hash-graph runs wherever hash joins
        impls = str(run["params"].get("impl", "")).split(",")
        assert set(impls) <= set(IMPLS) | {""}, run["name"]
        if "aggregate" not in run["params"]:  # hash-graph has no aggregate form
            assert ("hash" in impls) == ("hash-graph" in impls), run["name"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the run where no implementation can run")
@pytest.mark.parametrize("args", [["--impl", "hash,tensorcore", "--rows", "5000", "--count-only"],
                                  ["--impl", "hash", "--rows", "100", "--aggregate", "sum"]])
def test_a_bench_that_checked_nothing_is_an_error(out_dir, args):
    """Every implementation skipped (no GPU; the interpreter's row cap): not a record that reads as correct."""
    with pytest.raises(DeviceError, match="none of --impl .* ran here"):
        invoke(["--device", "cpu", "--out", str(out_dir), "join", "bench", "--reps", "1", *args])
    assert not list(Path(out_dir).glob("join-*.yaml"))


def test_timed_row_mrows_per_s_is_decimal_millions(monkeypatch):
    """DB7: mrows_per_s = input rows / median seconds / 1e6 (decimal), and the checked output is fn's own."""
    from types import SimpleNamespace

    from gpulab.core import timing
    from gpulab.dbjoin import bench

    monkeypatch.setattr(timing, "benchmark", lambda fn, **kw: SimpleNamespace(median=2.0, p10=1.5, p90=3.0,
                                                                              reps=kw["reps"]))
    out, row = bench.timed_row("x", "cpu", lambda: "result", reps=3, warmup=1, rows_in=3_000_000)
    assert out == "result" and row["reps"] == 3
    assert row["mrows_per_s"] == pytest.approx(3_000_000 / 2e-3 / 1e6)
    assert (row["median_ms"], row["p10_ms"], row["p90_ms"]) == (2.0, 1.5, 3.0)


def test_aggregate_record_names_the_load_factor(out_dir):
    """The hash aggregate is timed at --load-factor: the result's config records it, as the join's does."""
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "50", "--aggregate", "count", "--impl", "hash,torch",
            "--load-factor", "0.3", "--reps", "1", "--warmup", "0"])
    (f,) = Path(out_dir).glob("join-agg-bench-*.yaml")
    assert yaml.safe_load(f.read_text())["config"]["load_factor"] == 0.3


def test_each_row_says_how_many_timed_runs_it_has(out_dir):
    """pandas takes at most 5 timed runs, hash-cpu at most 10, the others --reps: each row records its own."""
    invoke(["--out", str(out_dir), "join", "bench", "--rows", "200", "--reps", "12", "--warmup", "1",
            "--impl", "pandas,hash-cpu,torch"])
    (f,) = Path(out_dir).glob("join-bench-*.yaml")
    rows = {r["impl"]: r for r in yaml.safe_load(f.read_text())["rows"]}
    assert (rows["pandas"]["reps"], rows["hash-cpu"]["reps"], rows["torch"]["reps"]) == (5, 10, 12)


def test_replay_columns_of_a_graph_plan():
    """hash-graph's and tensorcore-graph's replay_gpu_* columns: quantiles of the replay times, the median's
    fraction of the copy bound when there is one; nothing without replays (no graph)."""
    from gpulab.dbjoin.bench import add_replay_columns

    row = {}
    add_replay_columns(row, [0.1, 0.3, 0.2], 50.0)
    assert row["replay_gpu_median_ms"] == pytest.approx(0.2) and row["replay_frac_of_copy_bound"] == pytest.approx(0.25)
    assert row["replay_gpu_p10_ms"] < row["replay_gpu_median_ms"] < row["replay_gpu_p90_ms"]
    row = {}
    add_replay_columns(row, [0.2], None)
    assert "replay_frac_of_copy_bound" not in row and row["replay_gpu_median_ms"] == 0.2
    row = {}
    add_replay_columns(row, [], 50.0)
    assert row == {}


def test_every_gen_option_has_help():
    import typer

    from gpulab.dbjoin.cli import app

    gen = typer.main.get_command(app).commands["gen"]
    assert [p.name for p in gen.params if not getattr(p, "help", None)] == []
