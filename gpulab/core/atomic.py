"""Atomic file and folder writes: nothing half-written is ever left at the destination.

A file is written to a temporary name in the same folder and renamed over the target; a folder is
built under a temporary sibling name and swapped into place. On any failure the temporary is removed
and an existing target is left as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: str, folder: bool = False) -> None:
    """Give a temporary (mkstemp/mkdtemp make them owner-only) the mode a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _backup(path: Path) -> str:
    """A hard link to ``path`` under a new name beside it (a copy where the file system has no hard links).
    A link never overwrites: a name that another process took meanwhile is passed over for the next one."""
    while True:
        keep = tempfile.mktemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
        try:
            os.link(path, keep)
            return keep
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: a copy into a file created for it
            fd, keep = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
            os.close(fd)
            shutil.copy2(path, keep)
            return keep


def write_with(path: Path | str, writer: Callable[[str], object], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` to write the file, then rename it to ``path``.

    ``suffix`` is appended to the temporary name for writers that choose a format by extension.
    """
    return write_all([(path, writer, suffix)])[0]


def write_all(items: list[tuple[Path | str, Callable[[str], object], str]]) -> list[Path]:
    """Several files as one: every ``(path, writer, suffix)`` is written to its temporary first, and the
    temporaries are renamed to their paths only once all of them are written. A failure leaves every path as
    it was: a rename that fails after others undoes them (an earlier file comes back from a hard link kept
    beside it until the last rename)."""
    staged: list[tuple[str, Path]] = []
    kept: dict[Path, str] = {}  # path -> hard link to the file it replaces
    done: list[Path] = []
    try:
        for path, writer, suffix in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            writer(tmp)
            _as_created(tmp)
        if len(staged) > 1:
            for _, path in staged:
                if path.is_file():
                    kept[path] = _backup(path)
        try:
            for tmp, path in staged:
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in reversed(done):
                if path in kept:
                    os.replace(kept.pop(path), path)
                else:
                    path.unlink(missing_ok=True)
            raise
    finally:
        for leftover in [tmp for tmp, _ in staged] + list(kept.values()):
            try:
                os.unlink(leftover)
            except OSError:  # renamed: nothing left to remove
                pass
    return [path for _, path in staged]


def bytes_writer(data: bytes) -> Callable[[str], None]:
    """A writer for :func:`write_with` / :func:`write_all` that writes ``data`` (synced to the disk)."""
    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return writer


def text_writer(text: str) -> Callable[[str], None]:
    """A writer of ``text`` as UTF-8 (see :func:`bytes_writer`)."""
    return bytes_writer(text.encode("utf-8"))


def write_text(path: Path | str, text: str) -> Path:
    return write_with(path, text_writer(text))


@contextmanager
def build_folder(folder: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``folder`` (which may exist)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _as_created(str(tmp), folder=True)
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            try:
                os.replace(tmp, folder)
            except BaseException:  # the original goes back where it was
                os.replace(old / folder.name, folder)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
