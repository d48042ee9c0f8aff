import pytest

from gpulab.core import atomic


def test_write_with_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic.write_with(target, lambda tmp: open(tmp, "wb").write(b"one"))
    assert target.read_bytes() == b"one"

    def failing(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, failing)
    assert target.read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_write_with_suffix_for_format_by_extension(tmp_path):
    seen = []
    atomic.write_with(tmp_path / "t.npz", lambda tmp: (seen.append(tmp), open(tmp, "w").write("x")), suffix=".npz")
    assert seen[0].endswith(".npz")


def test_build_folder_swaps_in_and_keeps_old_on_failure(tmp_path):
    folder = tmp_path / "model"
    with atomic.build_folder(folder) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (folder / "config.json").read_text() == "{}"
    with pytest.raises(ValueError):
        with atomic.build_folder(folder) as tmp:
            (tmp / "config.json").write_text("half")
            raise ValueError("bad tensor")
    assert (folder / "config.json").read_text() == "{}"
    with atomic.build_folder(folder) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_all_renames_only_when_every_file_is_written(tmp_path):
    from pathlib import Path

    from gpulab.core import atomic

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")

    def fails(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_all([(a, lambda tmp: Path(tmp).write_text("new a"), ""), (b, fails, "")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and a.read_text() == "old a"
    assert atomic.write_all([(a, lambda tmp: Path(tmp).write_text("new a"), ".txt"),
                             (b, lambda tmp: Path(tmp).write_text("b"), "")]) == [a, b]
    assert (a.read_text(), b.read_text()) == ("new a", "b") and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt", "b.txt"]


def test_written_files_and_folders_get_the_umask_mode(tmp_path):
    """Temporaries are owner-only; what lands at the destination has the mode open()/mkdir() would give."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.yaml", "x: 1\n")
        with atomic.build_folder(tmp_path / "d") as d:
            (d / "f").write_text("y")
        assert stat.S_IMODE((tmp_path / "a.yaml").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
        os.umask(0o077)
        atomic.write_text(tmp_path / "b.yaml", "x: 2\n")
        assert stat.S_IMODE((tmp_path / "b.yaml").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_write_all_undoes_earlier_renames_when_a_later_one_fails(tmp_path, monkeypatch, names):
    """The renames come last; the last one failing after others puts back what the others replaced (a file that
    existed keeps its old text; one that did not is gone again)."""
    import os
    from pathlib import Path

    from gpulab.core import atomic

    paths = [tmp_path / f"{n}.txt" for n in names]
    paths[0].write_text("old a")
    paths[-1].write_text("old last")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == paths[-1]:
            raise OSError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="Permission denied"):
        atomic.write_all([(p, lambda tmp, p=p: Path(tmp).write_text("new " + p.stem), "") for p in paths])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({paths[0].name, paths[-1].name})
    assert (paths[0].read_text(), paths[-1].read_text()) == ("old a", "old last")


def test_write_all_backup_never_overwrites_a_file_that_took_its_name(tmp_path, monkeypatch):
    """The backup of a replaced file is a hard link under a fresh name: a name another process took between
    choosing and linking is passed over, and that process's file is left as it was."""
    import tempfile
    from pathlib import Path

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    other = tmp_path / ".a.txt.taken.old"
    other.write_text("someone else's")
    names = iter([str(other), str(tmp_path / ".a.txt.free.old")])
    monkeypatch.setattr(tempfile, "mktemp", lambda **kw: next(names))
    atomic.write_all([(p, lambda tmp, p=p: Path(tmp).write_text("new " + p.stem), "") for p in (a, b)])
    assert (a.read_text(), b.read_text(), other.read_text()) == ("new a", "new b", "someone else's")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.txt.taken.old", "a.txt", "b.txt"]


def test_build_folder_restores_the_original_when_the_swap_fails(tmp_path, monkeypatch):
    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "keep.txt").write_text("old")
    real = atomic.os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"):
        with atomic.build_folder(folder) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (folder / "keep.txt").read_text() == "old" and not (folder / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["family"]  # no temporaries left beside it
