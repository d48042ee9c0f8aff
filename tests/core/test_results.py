import numpy as np
import pytest
import yaml

from gpulab.core import results
from gpulab.core.errors import InputError


def test_save_and_load_round_trip(out_dir):
    rec = results.Record(name="unit-bench", config={"n": np.int64(5), "dtype": "int32", "sizes": (1, 2)})
    rec.metrics["median_ms"] = np.float32(1.5)
    rec.rows.append({"impl": "numpy", "median_ms": 2.0, "correct": True})
    rec.summary = {"best": "numpy"}
    assert rec.check("numpy_equal", True)
    path = rec.save()
    assert path.parent == out_dir and path.name.startswith("unit-bench-") and path.suffix == ".yaml"
    assert [p.name for p in out_dir.iterdir()] == [path.name]  # no temp files left behind
    data = results.load(path)
    assert data["ok"] is True
    assert data["config"] == {"n": 5, "dtype": "int32", "sizes": [1, 2]}
    assert data["metrics"]["median_ms"] == pytest.approx(1.5)
    assert data["device"]["backend"] in ("cpu", "cuda")
    for key in ("started_utc", "finished_utc", "argv", "git", "gpulab_version", "schema"):
        assert key in data
    assert path in results.written


def test_records_finished_at_the_same_time_are_both_kept(out_dir):
    first = results.Record(name="twin", summary={"i": 1})
    second = results.Record(name="twin", summary={"i": 2})
    second.finished = first.finished = results.utc_now()
    a, b = first.save(), second.save()
    assert a != b and b.name.endswith("-2.yaml")
    assert [results.load(p)["summary"]["i"] for p in (a, b)] == [1, 2]


def test_failed_check_marks_result_not_ok(out_dir):
    rec = results.Record(name="x")
    rec.check("a", True)
    assert not rec.check("b", False, detail="mismatch at 3")
    data = results.load(rec.save())
    assert data["ok"] is False
    assert data["checks"]["b"] == {"passed": False, "detail": "mismatch at 3"}


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.yaml"
    results.atomic_write_yaml(target, {"a": 1})

    class Boom:
        def as_dict(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        results.atomic_write_yaml(target, {"a": Boom()})
    assert yaml.safe_load(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.yaml"]


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        results.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(InputError, match="malformed YAML"):
        results.load(bad)
    other = tmp_path / "other.yaml"
    other.write_text("a: 1\n")
    with pytest.raises(InputError, match="not a gpulab result"):
        results.load(other)


def test_markdown_table_and_fmt():
    md = results.markdown_table([{"a": 1.23456, "b": True}, {"a": None, "b": "x|y"}])
    lines = md.splitlines()
    assert lines[0] == "| a | b |"
    assert lines[2] == "| 1.235 | true |"
    assert lines[3] == "| - | x\\|y |"
    assert results.fmt(float("nan")) == "nan"
    assert results.fmt(1e-5) == "1.000e-05"


def test_what_gpulab_writes_it_reads_back_as_written(tmp_path):
    """The writer quotes every string that YAML 1.1 or 1.2 would read as another type (the reader is 1.2):
    a class folder "008", a fingerprint of digits, "1e-3", "no"; and anchors with '<<' merges still load."""
    from gpulab.core import files

    data = {"classes": ["000", "007", "008", "009", "010"], "id": "0581203945812039", "x": "12e345678",
            "lr": "1e-3", "oct": "0o17", "w": "no", "t": "1:30", "n": 5, "f": 0.5, "b": True, "none": None}
    p = results.atomic_write_yaml(tmp_path / "r.yaml", data)
    assert files.read_yaml_mapping(p, "missing") == data
    (tmp_path / "m.yaml").write_text("a: &p {x: 1}\nb:\n  <<: *p\n  y: 2\n")
    assert files.read_yaml_mapping(tmp_path / "m.yaml", "missing")["b"] == {"x": 1, "y": 2}


def test_data_hint_points_at_gpulab_data(monkeypatch, tmp_path):
    from gpulab.core import paths

    monkeypatch.setenv("GPULAB_DATA", str(tmp_path / "nowhere"))
    hint = paths.data_hint(paths.shared_data("tinyshakespeare.txt"))
    assert "GPULAB_DATA is set to it" in hint and "set GPULAB_DATA to the folder" in hint
    assert paths.data_hint(tmp_path / "elsewhere.txt") == ""  # a path the user gave: no hint


def test_markdown_table_keeps_a_multiline_value_in_its_row():
    """A newline in a value ended the table's row in the middle of a cell (the rest became a stray line)."""
    md = results.markdown_table([{"a": "x\ny", "b": 1}, {"a": "z\r\nw", "b": 2}])
    lines = md.splitlines()
    assert len(lines) == 4 and all(ln.startswith("|") and ln.endswith("|") for ln in lines)
    assert lines[2] == "| x<br>y | 1 |" and lines[3] == "| z<br>w | 2 |"
