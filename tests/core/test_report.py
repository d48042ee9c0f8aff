"""`gpulab report`: one line per result or per table row, as a table, markdown, CSV or JSON."""
import csv
import io
import json

import pytest
from typer.testing import CliRunner

from gpulab.core import results
from gpulab.core.report_cli import app, csv_text, report_rows

DEVICE = {"backend": "cpu", "cpu": {"model": "Test CPU", "cores": 2}}


def _save(tmp_path, name, n, medians):
    rec = results.Record(name, config={"n": n, "impl": "a,b", "shape": [1, 2]}, device=DEVICE,
                         rows=[{"impl": impl, "median_ms": ms, "extra": {"nested": 1}} for impl, ms in medians.items()],
                         summary={"best": min(medians, key=medians.get) if medians else None,
                                  "per_impl": dict(medians)})
    rec.check("correct", True)
    return rec.save(tmp_path)


def test_report_rows_per_result_and_per_row(tmp_path):
    data = results.load(_save(tmp_path, "sort-bench", 1000, {"a": 1.25, "b": 0.5}))
    [one] = report_rows(data, "f.yaml", per_row=False)
    assert one["best"] == "b" and "per_impl" not in one and one["ok"] is True and one["file"] == "f.yaml"
    per = report_rows(data, "f.yaml", per_row=True)
    assert [(r["impl"], r["median_ms"], r["n"]) for r in per] == [("a", 1.25, 1000), ("b", 0.5, 1000)]
    assert all("extra" not in r and "shape" not in r for r in per)  # nested values left out
    assert list(per[0])[:5] == ["file", "name", "finished_utc", "device", "ok"]


def test_csv_keeps_numbers_and_blanks_missing():
    text = csv_text([{"a": 1, "b": 0.123456789}, {"a": None, "c": "x,y"}])
    got = list(csv.DictReader(io.StringIO(text)))
    assert got == [{"a": "1", "b": "0.123456789", "c": ""}, {"a": "", "b": "", "c": "x,y"}]


@pytest.mark.parametrize("fmt", ["csv", "json", "markdown", "table"])
def test_report_cli_formats(tmp_path, fmt):
    _save(tmp_path, "sort-bench", 1000, {"a": 1.25, "b": 0.5})
    _save(tmp_path, "sort-bench", 2000, {"a": 2.5, "b": 1.0})
    _save(tmp_path, "join-bench", 10, {"hash": 3.0})
    (tmp_path / "other.yaml").write_text("x: 1\n")
    r = CliRunner().invoke(app, [str(tmp_path), "--rows", "--name", "sort", "--format", fmt])
    assert r.exit_code == 0, r.output
    if fmt == "csv":
        got = list(csv.DictReader(io.StringIO(r.output)))
        assert sorted((int(x["n"]), x["impl"], float(x["median_ms"])) for x in got) == \
            [(1000, "a", 1.25), (1000, "b", 0.5), (2000, "a", 2.5), (2000, "b", 1.0)]
    elif fmt == "json":
        got = json.loads(r.output)
        assert len(got) == 4 and {x["name"] for x in got} == {"sort-bench"}
    elif fmt == "markdown":
        assert "join-bench" not in r.output and r.output.count("| sort-bench |") == 4
    else:
        assert "4 rows from" in r.output


def test_report_cli_errors(tmp_path):
    run = CliRunner().invoke
    r = run(app, [str(tmp_path), "--format", "xml"])
    assert r.exit_code != 0 and "--format must be table, markdown, csv or json, got 'xml'" in str(r.exception)
    _save(tmp_path, "probe", 0, {})
    r = run(app, [str(tmp_path), "--name", "sort"])
    assert r.exit_code != 0 and "no gpulab result files under" in str(r.exception) and "named sort*" in str(r.exception)
    r = run(app, [str(tmp_path), "--rows"])
    assert r.exit_code != 0 and "have no table rows" in str(r.exception)


def test_rows_keep_their_own_name_and_device(tmp_path):
    """A row's name (a seam model) or device (a join implementation) must not be overwritten by the result's."""
    rec = results.Record("seam-eval", device=DEVICE, rows=[{"name": "r18", "device": "cuda", "top1": 0.7}])
    data = results.load(rec.save(tmp_path))
    [row] = report_rows(data, "f.yaml", per_row=True)
    assert row["name"] == "seam-eval" and row["row_name"] == "r18" and row["row_device"] == "cuda"
    assert row["top1"] == 0.7


def test_json_has_no_nan_literals(tmp_path):
    rec = results.Record("b", device=DEVICE, rows=[{"impl": "x", "ms": float("nan"), "gbs": float("inf")}])
    rec.save(tmp_path)
    r = CliRunner().invoke(app, [str(tmp_path), "--rows", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert "NaN" not in r.output and "Infinity" not in r.output
    [row] = json.loads(r.output, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert row["ms"] is None and row["gbs"] is None


def test_malformed_result_parts_are_skipped(tmp_path):
    good = _save(tmp_path, "sort-bench", 10, {"a": 1.0})
    text = good.read_text()
    for i, (old, new) in enumerate([("summary:", "summary: [1, 2]\nold_summary:"), ("rows:", "rows: 5\nold_rows:")]):
        (tmp_path / f"bad{i}.yaml").write_text(text.replace(old, new, 1))
    r = CliRunner().invoke(app, [str(tmp_path), "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert len(r.output.strip().splitlines()) == 2  # the header and the one good result
    r = CliRunner().invoke(app, [str(tmp_path / "bad1.yaml")])
    assert r.exit_code != 0 and "not of the expected type" in str(r.exception)


def test_files_of_one_name_in_two_subfolders_stay_apart(tmp_path):
    """The file column is the path below the folder: records copied from two machines (h100/, h200/) under the
    same name were two rows with one file name."""
    import shutil

    one = _save(tmp_path / "h100", "sort-bench", 1000, {"a": 1.0})
    (tmp_path / "h200").mkdir()
    shutil.copy(one, tmp_path / "h200" / one.name)
    r = CliRunner().invoke(app, [str(tmp_path), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert sorted(x["file"] for x in json.loads(r.output)) == [f"h100/{one.name}", f"h200/{one.name}"]
    r = CliRunner().invoke(app, [str(one), "--format", "json"])  # one file given: its name
    assert [x["file"] for x in json.loads(r.output)] == [one.name]


def test_config_or_cpu_of_the_wrong_type_is_skipped(tmp_path):
    """A result file whose config is not a mapping (or whose device's cpu is not one) is skipped like the other
    malformed parts: it made the whole report fail with an AttributeError."""
    good = _save(tmp_path, "sort-bench", 10, {"a": 1.0})
    text = good.read_text()
    (tmp_path / "bad0.yaml").write_text(text.replace("config:", "config: [1, 2]\nold_config:", 1))
    (tmp_path / "bad1.yaml").write_text(text.replace("device:", "device:\n  cpu: some cpu\nold_device:", 1))
    for rows in ([], ["--rows"]):
        r = CliRunner().invoke(app, [str(tmp_path), "--format", "csv", *rows])
        assert r.exit_code == 0, r.output
        assert len(r.output.strip().splitlines()) == 2  # the header and the one good result (one row)
    r = CliRunner().invoke(app, [str(tmp_path / "bad0.yaml"), "--rows"])
    assert r.exit_code != 0 and "not of the expected type" in str(r.exception)


def test_keys_that_are_not_strings_are_skipped(tmp_path):
    """A result whose summary, config or a row has a key that is not a string (gpulab writes only strings): the
    table and markdown formats failed on the whole folder with a TypeError."""
    good = _save(tmp_path, "sort-bench", 10, {"a": 1.0})
    text = good.read_text()
    (tmp_path / "bad0.yaml").write_text(text.replace("summary:", "summary:\n  5: 1\nold_summary:", 1))
    (tmp_path / "bad1.yaml").write_text(text.replace("config:", "config:\n  5: 1\nold_config:", 1))
    (tmp_path / "bad2.yaml").write_text(text.replace("rows:", "rows:\n- 5: 1\nold_rows:", 1))
    for fmt in ("table", "markdown", "csv"):
        for rows in ([], ["--rows"]):
            r = CliRunner().invoke(app, [str(tmp_path), "--format", fmt, *rows])
            assert r.exit_code == 0, (fmt, rows, r.exception)
            assert "bad" not in r.output


@pytest.mark.parametrize("how", ["option", "env", "experiment"])
def test_report_reads_the_out_folder_by_default(out_dir, tmp_path, monkeypatch, capsys, how):
    """Without a FOLDER, report reads where the call's results go (--out, GPULAB_OUT; in an experiment file the
    run's --out), not ./results: "no such folder or file: results" under GPULAB_OUT."""
    from gpulab.cli import main

    out = tmp_path / "elsewhere"
    _save(out, "sort-bench", 1000, {"a": 1.25})
    monkeypatch.chdir(tmp_path)  # no results/ here
    if how == "option":
        argv = ["--out", str(out), "report", "--format", "csv"]
    elif how == "env":
        monkeypatch.setenv("GPULAB_OUT", str(out))
        argv = ["report", "--format", "csv"]
    else:
        exp = tmp_path / "exp.yaml"
        exp.write_text("runs:\n  - command: report\n    params: {format: csv}\n")
        argv = ["--out", str(out), "run", str(exp)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    got = capsys.readouterr()
    assert e.value.code == 0, got.err
    assert "sort-bench" in got.out and "no such folder" not in got.err


def test_name_time_or_status_of_the_wrong_type_is_skipped(tmp_path):
    """A result whose name, finished_utc or ok is not a plain value (an unquoted timestamp reads as a datetime):
    --format json failed on the whole folder with 'TypeError: Object of type datetime is not JSON serializable'."""
    good = _save(tmp_path, "sort-bench", 10, {"a": 1.0})
    text = good.read_text()
    stamp = results.load(good)["finished_utc"]
    (tmp_path / "bad0.yaml").write_text(text.replace(f"finished_utc: '{stamp}'", f"finished_utc: {stamp}", 1))
    (tmp_path / "bad1.yaml").write_text(text.replace("name: sort-bench", "name: [sort-bench]", 1))
    (tmp_path / "bad2.yaml").write_text(text.replace("ok: true", "ok: {x: 1}", 1))
    for fmt in ("json", "csv", "markdown"):
        for rows in ([], ["--rows"]):
            r = CliRunner().invoke(app, [str(tmp_path), "--format", fmt, *rows])
            assert r.exit_code == 0, (fmt, rows, r.exception)
            assert "bad" not in r.output
    r = CliRunner().invoke(app, [str(tmp_path / "bad0.yaml"), "--format", "json"])
    assert r.exit_code != 0 and "not of the expected type" in str(r.exception)
