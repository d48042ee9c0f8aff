"""Where gpulab finds its shared data sets.

The small public data sets (tinyshakespeare, CIFAR-10) live in ``../shared/data`` beside the repository
checkout; ``GPULAB_DATA`` points elsewhere. Real runs take paths from the user.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_hint(path: Path | str) -> str:
    """For a missing path under the shared data folder: where that folder was looked for and how to point
    elsewhere (a checkout that is not beside ``shared/`` finds no data); '' for any other path."""
    root = shared_data()
    try:
        Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return ""
    how = "GPULAB_DATA is set to it" if os.environ.get("GPULAB_DATA") else "it is ../shared/data beside the checkout"
    return (f" (the shared data sets are looked for in {root}: {how}; set GPULAB_DATA to the folder that holds "
            "tinyshakespeare.txt and cifar10/, or pass a path)")


def shared_data(*parts: str) -> Path:
    """``$GPULAB_DATA/<parts>``, or ``<repo>/../shared/data/<parts>``."""
    base = os.environ.get("GPULAB_DATA") or REPO_ROOT.parent / "shared" / "data"
    return Path(base, *parts)
