"""Where gpulab finds its shared data sets.

The small public data sets (tinyshakespeare, CIFAR-10) live in ``../shared/data`` beside the repository
checkout; ``GPULAB_DATA`` points elsewhere. Real runs take paths from the user.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data(*parts: str) -> Path:
    """``$GPULAB_DATA/<parts>``, or ``<repo>/../shared/data/<parts>``."""
    base = os.environ.get("GPULAB_DATA") or REPO_ROOT.parent / "shared" / "data"
    return Path(base, *parts)
