"""Prefill providers: prompts prefilled by another model, decoded by vajra (``--prefill NAME=ARG``).

A provider is found by NAME among the ``gpulab.prefill_providers`` entry points (a package registers
``NAME = "module:function"``; gpulab registers ``stitchkv``: a ``gpulab kvstitch`` run folder as ARG),
or NAME is itself ``module:function``. The function is called as ``function(ARG, device=DEVICE)`` and
returns a :class:`~gpulab.vajra.interface.PrefillProvider`. Providers never import vajra: the contract
is the :class:`~gpulab.vajra.interface.PrefilledPrompt` they return.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Callable

from gpulab.core.errors import InputError

ENTRY_POINT_GROUP = "gpulab.prefill_providers"


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=ARG`` -> (NAME, ARG)."""
    name, sep, arg = spec.partition("=")
    if not sep or not name or not arg:
        raise InputError(f"--prefill must be NAME=ARG (e.g. stitchkv=RUN_DIR), got {spec!r}")
    return name, arg


def registered() -> dict[str, Any]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve(name: str) -> Callable[..., Any]:
    """The factory behind a provider name (entry point) or a ``module:function`` path."""
    eps = registered()
    if name in eps:
        return eps[name].load()
    if ":" not in name:
        known = ", ".join(sorted(eps)) or "none installed"
        raise InputError(f"unknown prefill provider {name!r} (registered: {known}; or give module:function)")
    mod, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"prefill provider {name!r} cannot be loaded ({type(e).__name__}: {e})") from None


def load_provider(spec: str, device: str) -> Any:
    name, arg = parse_spec(spec)
    provider = resolve(name)(arg, device=device)
    if not callable(provider):
        raise InputError(f"prefill provider {name!r} returned {type(provider).__name__}, not a callable provider")
    return provider
