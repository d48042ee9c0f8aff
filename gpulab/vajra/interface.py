"""The contract between vajra's model side (loader, layers, attention) and its engine side
(block manager, scheduler, sampler, server).

The engine builds a :class:`ForwardBatch` per step and calls ``model.forward``; the model
reads and writes the paged KV cache that :meth:`VajraModelProtocol.allocate_kv_cache` made.

Layout (varlen, flattened): the step's tokens of all scheduled sequences are concatenated,
sequence by sequence. For sequence i, ``query_lens[i]`` new tokens are processed (a prefill chunk
or 1 for a decode) at positions ``context_lens[i] - query_lens[i] ... context_lens[i] - 1``;
``context_lens[i]`` counts every token of the sequence whose K/V is in the cache after this step
(earlier chunks + this one). ``slot_mapping[t] = block_id * block_size + offset`` is the cache
slot where token t's K/V is written. ``block_tables[i, j]`` is the j-th block of sequence i
(padded with 0 beyond its blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch


@dataclass
class ModelInfo:
    """What the engine needs to know about a loaded model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype  # activation dtype
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""


@dataclass
class PrefilledPrompt:
    """A prompt prefilled elsewhere (disaggregated inference: e.g. a larger model whose states stitch
    layers map into this model's cache). ``logits``: float [vocab] at the last prompt position (the
    engine samples the first output token from them); ``kv``: per layer of *this* model, K and V of
    every prompt token, [P, num_kv_heads, head_dim] each, K after RoPE (as the cache holds it)."""

    logits: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class PrefillProvider(Protocol):
    """Prefills prompts for the engine (``gpulab serve/generate --prefill NAME=ARG``)."""

    name: str

    def __call__(self, prompt_ids: list[int]) -> PrefilledPrompt: ...


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    query_lens: torch.Tensor  # int32 [B]
    context_lens: torch.Tensor  # int32 [B]
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    is_decode_only: bool = False  # every sequence has query_len 1 (CUDA graphs apply)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.shape[0])


@dataclass
class KVCache:
    """Per layer one tensor [num_blocks, 2, block_size, num_kv_heads, head_dim] (NHD pages, K then V)."""

    layers: list[torch.Tensor]
    block_size: int
    num_blocks: int
    dtype: torch.dtype
    k_scale: float = 1.0  # for an fp8 cache: stored = value / scale
    v_scale: float = 1.0
    layer_scales: Optional[list[tuple[float, float]]] = None  # fp8: per layer (k, v), a checkpoint's calibration

    def scales(self, layer: int) -> tuple[float, float]:
        """(k_scale, v_scale) of ``layer``: its own when the checkpoint had them, else the cache's."""
        return self.layer_scales[layer] if self.layer_scales else (self.k_scale, self.v_scale)


class VajraModelProtocol(Protocol):
    info: ModelInfo
    device: torch.device

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: Any = "auto") -> KVCache: ...

    def kv_bytes_per_block(self, block_size: int, dtype: Any = "auto") -> int: ...

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Logits of the last token of each sequence: float32 [B, vocab]."""
        ...

    # The CUDA-graph decode path captures final_hidden and runs logits eagerly; forward(b, kv) must equal
    # logits(final_hidden(b, kv)).
    def final_hidden(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """The normed last hidden state of each sequence [B, hidden]."""
        ...

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, vocab] of final hidden states."""
        ...

    # Optional (prompt logprobs): forward() plus the states of chosen tokens, whose logits(...) the engine takes
    # a chunk of rows at a time.
    def forward_rows(self, batch: ForwardBatch, kv: KVCache, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(batch, kv), the states logits() reads of the flattened tokens ``rows`` [R, ...])."""
        ...
