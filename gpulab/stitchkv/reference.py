"""References the stitched paths are checked against.

- :func:`own_cache`: the small model's actual KV cache of a prompt (the warm-up target, and what an
  identity stitch of a model to itself must reproduce exactly).
- :func:`greedy_no_cache`: greedy decoding that recomputes the whole sequence each step, no cache:
  the reference of the cached decode loops in :mod:`gpulab.stitchkv.generate`.
"""
from __future__ import annotations

from typing import Any

from gpulab.stitchkv.models import output_cache
from gpulab.stitchkv.stitch import cache_tensors


def own_cache(model: Any, prompt: Any) -> list[tuple[Any, Any]]:
    """(K after RoPE, V) [B, H, T, D] per layer of ``model`` on ``prompt`` [B, T]."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return cache_tensors(output_cache(out))


def greedy_no_cache(model: Any, prompt: Any, n_new: int, first_token: Any = None) -> Any:
    """[B, n_new] greedy tokens; ``first_token`` [B] forces the first one (as a prefill node would)."""
    import torch

    seq = prompt
    new = []
    for i in range(n_new):
        if i == 0 and first_token is not None:
            nxt = first_token
        else:
            nxt = model(input_ids=seq, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)
        new.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return torch.stack(new, 1)
