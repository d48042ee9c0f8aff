"""Shared test set-up.

Without a CUDA GPU, Triton kernels run under the interpreter and numba.cuda kernels under the
simulator: both switches are set here, before any test module imports triton or numba.
Tests marked ``@pytest.mark.gpu`` are skipped without CUDA; run them on a GPU with ``pytest -m gpu``.
"""
from __future__ import annotations

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_report_header(config: pytest.Config) -> list[str]:
    from gpulab.core.triton_compat import interpreter_problem

    why = None if HAS_CUDA else interpreter_problem()
    return [f"WARNING: the Triton kernel tests will fail here: {why}"] if why else []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    """Where tests/cuda_on_cpu compiles CUDA C sources for the CPU: each source once per test session."""
    return tmp_path_factory.mktemp("cuda_on_cpu")


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """A results folder for this test, set as the global --out."""
    from gpulab.core import options

    old = options.get().out
    options.set_options(out=tmp_path / "results")
    yield tmp_path / "results"
    options.set_options(out=old)
