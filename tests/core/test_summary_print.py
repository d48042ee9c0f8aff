"""How a record's summary prints: ``gpulab probe`` on the H200 (fixtures/probe_h200_2026-11-27.yaml, 14 summary
fields) printed one column per field, and in the device run's 80-column log rich folded every column to ~3
characters. A summary that does not fit the terminal now prints one line per field."""
from pathlib import Path

import pytest
import yaml

from gpulab.core import results

PROBE = yaml.safe_load((Path(__file__).parent / "fixtures" / "probe_h200_2026-11-27.yaml").read_text())


def printed(capsys, monkeypatch, rec, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    rec.print()
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_probe_summary_is_one_line_per_field_in_a_narrow_terminal(capsys, monkeypatch, columns):
    rec = results.Record(name="probe", summary=PROBE["summary"], device=PROBE["device"])
    lines = printed(capsys, monkeypatch, rec, columns)
    assert max(len(ln) for ln in lines) <= columns
    for key, value in PROBE["summary"].items():
        (line,) = [ln for ln in lines if f" {key} " in ln]  # whole, on one line, with its value
        assert results.fmt(value) in line, line
    assert any("sm_count" in ln and "132" in ln for ln in lines)
    assert any("NVIDIA H200 (sm_90)" in ln for ln in lines)


def test_probe_summary_is_one_row_where_it_fits(capsys, monkeypatch):
    rec = results.Record(name="probe", summary=PROBE["summary"], device=PROBE["device"])
    width = results.table_width([PROBE["summary"]])
    lines = printed(capsys, monkeypatch, rec, width)
    header = next(ln for ln in lines if "sm_count" in ln)
    assert "device" in header and "h2d_pageable_gbs" in header  # all the fields side by side


def test_a_small_summary_keeps_its_columns(capsys, monkeypatch):
    rec = results.Record(name="unit-bench", summary={"best": "numpy", "median_ms": 1.5}, device={"backend": "cpu"})
    lines = printed(capsys, monkeypatch, rec, 80)
    assert any("best" in ln and "median_ms" in ln for ln in lines)
    assert not any(" field " in ln for ln in lines)


def test_table_width_is_what_rich_draws():
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(results.rows_table([PROBE["summary"]]))
    drawn = max(len(ln) for ln in console.export_text().splitlines())
    assert results.table_width([PROBE["summary"]]) == drawn


def test_summary_table_vertical_rows():
    table = results.summary_table({"a": 1, "b": None}, width=3)
    assert [c.header for c in table.columns] == ["field", "value"]
    assert table.row_count == 2
