"""Every `gpulab ...` command written in README.md and BENCHMARKS.md names a real command and only options it
has: the docs are what users copy, so a renamed option must break a test, not a user's run."""
import re
from pathlib import Path

import pytest

from gpulab.core.clickcompat import click

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "BENCHMARKS.md")
ROOT_OPTIONS = {"--device", "--out", "--debug", "--help", "-h"}


def _spans(text: str) -> list[str]:
    """The gpulab command lines of a Markdown text: lines of fenced code blocks, and inline code spans (which
    may wrap over lines)."""
    pieces = re.split(r"^```[^\n]*$", text, flags=re.M)
    candidates = []
    for k, piece in enumerate(pieces):
        if k % 2:  # inside a fence
            candidates += piece.splitlines()
        else:
            candidates += re.findall(r"`([^`]+)`", piece)
    out = []
    for span in candidates:
        words = span.split()
        if "gpulab" in words:
            out.append(" ".join(words[words.index("gpulab"):]))
    return out


def _resolve(words: list[str]):
    """(click command, index of the first word after its name) for `gpulab GROUP [SUB] ...`, or None when the
    span names alternatives (`seam train/eval/select`, `quantize | generate`) rather than one command."""
    import typer

    from gpulab.cli import app

    cmd = typer.main.get_command(app)
    i = 1
    while hasattr(cmd, "list_commands") and i < len(words):
        w = words[i]
        if w.startswith("-"):  # root options before the group: --device cuda, --out DIR
            i += 1 if w in ("--debug", "-h", "--help") or "=" in w else 2
            continue
        if "/" in w or "|" in w:
            return None
        sub = cmd.get_command(click.Context(cmd), w)
        assert sub is not None, f"'gpulab ... {w}' is not a command"
        cmd, i = sub, i + 1
    if hasattr(cmd, "list_commands"):
        return None  # the group alone (`gpulab kvstitch`), no options to check
    return cmd, i


def _options(cmd) -> set[str]:
    names = set(ROOT_OPTIONS)
    for p in cmd.params:
        names.update(getattr(p, "opts", ()))
        names.update(getattr(p, "secondary_opts", ()))
    return names


def _cases():
    for doc in DOCS:
        for span in _spans((ROOT / doc).read_text()):
            yield pytest.param(span, id=f"{doc}:{span[:60]}")


@pytest.mark.parametrize("span", list(_cases()))
def test_documented_command_exists_with_its_options(span):
    words = span.split()
    found = _resolve(words)
    if found is None:
        return
    cmd, i = found
    known = _options(cmd)
    for w in words[i:]:
        for opt in re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", w):
            assert opt in known, f"{span!r}: {opt} is not an option of 'gpulab {cmd.name}'"


def test_the_docs_hold_commands():
    spans = [s for doc in DOCS for s in _spans((ROOT / doc).read_text())]
    assert len(spans) > 30  # the parser finds the command lines (a broken regex would pass every case above)
