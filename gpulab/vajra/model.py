"""The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2 biases) over a paged KV cache.

One forward takes the step's tokens of all scheduled sequences flattened (varlen) with their
positions (see :mod:`gpulab.vajra.interface`) and returns the float32 logits of each sequence's
last token. q/k/v and gate/up are fused into one GEMM each; RMSNorm and RoPE follow transformers'
numerics (norm in fp32, cos/sin in fp32 cast to the activation dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gpulab.core.errors import InputError
from gpulab.vajra.config import LlamaConfig, rope_inv_freq
from gpulab.vajra import reference as ref
from gpulab.vajra.interface import ForwardBatch, KVCache, ModelInfo
from gpulab.vajra.linear import Linear

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    """Implements :class:`gpulab.vajra.interface.VajraModelProtocol`."""

    def __init__(self, cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, embed: torch.Tensor,
                 layers: list[DecoderLayer], norm: torch.Tensor, lm_head: Linear, attention, kv_cache_dtype: str,
                 max_model_len: int, quant: dict[str, Any] | None = None, fused_ops: bool | None = None):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self._fused_ops = False
        self.attention = attention
        self.kv_cache_dtype = kv_cache_dtype
        self.quant = quant
        self.info = ModelInfo(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              vocab_size=cfg.vocab_size, max_model_len=max_model_len, dtype=dtype,
                              eos_token_ids=cfg.eos_token_ids, name=cfg.name)
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.scale = cfg.head_dim ** -0.5
        self.notes: list[str] = []
        self.kv_scales: list[tuple[float, float]] | None = None  # a checkpoint's per-layer (k, v) FP8 KV scales
        if fused_ops is None:  # the fused Triton kernels on a GPU, where they pass their probe
            why = None
            if device.type == "cuda":
                half = cfg.head_dim // 2
                if cfg.head_dim % 2 or half & (half - 1):
                    why = f"head_dim {cfg.head_dim} is not twice a power of two"
                else:
                    from gpulab.vajra.fused_ops import fused_ops_problem

                    why = fused_ops_problem(str(device), dtype, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                            cfg.head_dim, self._kv_dtype(kv_cache_dtype),
                                            splits=self._norm_partial_splits(device))
                if why:
                    self.notes.append(f"fused RMSNorm/RoPE/SiLU kernels off ({why}): the unfused torch ops serve")
            fused_ops = device.type == "cuda" and not why
        self.fused_ops = bool(fused_ops)
        if device.type == "cuda" and dtype == torch.bfloat16 and quant:  # W8A16's e4m3 -> bf16, probed before
            from gpulab.vajra.fp8_ptx import conversion_problem, gpu_lacks  # any CUDA-graph capture

            why = conversion_problem(device, "bf16")
            if why and not gpu_lacks(why):
                self.notes.append(f"FP8 weights: W8A16 converts them by Triton's cast, not by PTX ({why})")

    def _norm_partial_splits(self, device: torch.device) -> tuple[int, ...]:
        """The numbers of W8A16 split-K partials the fused residual add + norm may sum in this model: those of the
        o and down projections at W8A16's batch sizes (the most), and every power of two below (larger batches,
        or w8a16 asked for at any batch, split less). Each is a kernel variant the fused-ops probe builds."""
        from gpulab.vajra.linear import w8a16_fits
        from gpulab.vajra.w8a16 import partial_splits

        top = 2
        for lin in ((self.layers[0].o, self.layers[0].down) if self.layers else ()):
            if lin.qw is not None and lin.backend in ("auto", "w8a16") and w8a16_fits(lin.qw):
                top = max(top, partial_splits(lin.out_features, lin.in_features, device, lin.qw.block))
        return tuple(sorted({top} | {1 << i for i in range(1, top.bit_length()) if 1 << i <= top}))

    # The fused kernels (fused_ops.py) serve together: the attention backend's K/V store follows the model's choice,
    # also when a bench swaps the backend or turns the kernels off.
    @property
    def fused_ops(self) -> bool:
        return self._fused_ops

    @fused_ops.setter
    def fused_ops(self, on: bool) -> None:
        self._fused_ops = bool(on)
        if on:  # the decoder layer's pointwise steps: the fused Triton kernels or the torch ops they replace
            from gpulab.vajra import fused_ops as pointwise
        else:
            pointwise = ref
        self._pointwise = pointwise
        self._sync_store()

    @property
    def attention(self):
        return self._attention

    @attention.setter
    def attention(self, backend) -> None:
        self._attention = backend
        self._sync_store()

    def _sync_store(self) -> None:
        backend = getattr(self, "_attention", None)
        if backend is not None and hasattr(backend, "fused_store"):
            backend.fused_store = self._fused_ops and type(backend).fused_store

    # -------------------------------------------------------------------------------- KV cache

    def _kv_dtype(self, dtype: Any) -> torch.dtype:
        if dtype is None or dtype == "auto":
            dtype = self.kv_cache_dtype
        if dtype == "auto":
            return self.dtype
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype not in KV_DTYPES:
            raise InputError(f"kv cache dtype {dtype!r} is unknown (auto, {', '.join(KV_DTYPES)})")
        return KV_DTYPES[dtype]

    def kv_bytes_per_block(self, block_size: int, dtype: Any = "auto") -> int:
        dt = self._kv_dtype(dtype)
        el = torch.empty((), dtype=dt).element_size()
        return 2 * block_size * self.cfg.num_kv_heads * self.cfg.head_dim * el * self.cfg.num_layers

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: Any = "auto") -> KVCache:
        if num_blocks <= 0 or block_size <= 0:
            raise InputError(f"kv cache needs num_blocks > 0 and block_size > 0, got {num_blocks} and {block_size}")
        dt = self._kv_dtype(dtype)
        shape = (num_blocks, 2, block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        fp8 = dt in (torch.float8_e4m3fn, torch.float8_e5m2)
        if fp8:  # zero bytes are +0.0; older torch has no fp8 fill_
            layers = [torch.zeros(shape, dtype=torch.uint8, device=self.device).view(dt)
                      for _ in range(self.cfg.num_layers)]
        else:
            layers = [torch.zeros(shape, dtype=dt, device=self.device) for _ in range(self.cfg.num_layers)]
        triton_attention = getattr(self.attention, "name", "") == "triton"
        if dt == torch.float8_e4m3fn and self.device.type == "cuda" and triton_attention \
                and self.dtype in (torch.float16, torch.bfloat16):
            self._probe_fp8_attention(block_size)
        return KVCache(layers=layers, block_size=block_size, num_blocks=num_blocks, dtype=dt,
                       layer_scales=self.kv_scales if fp8 else None)

    def _probe_fp8_attention(self, page: int) -> None:
        """The Triton attention's inline-PTX conversion of an e4m3 V, checked here (before any CUDA-graph capture)
        at the model's head layout; where it fails, Triton's own cast serves and a note says why."""
        from gpulab.vajra.fp8_ptx import gpu_lacks
        from gpulab.vajra.paged_attention import fp8_v_ptx_problem

        c = self.cfg
        why = fp8_v_ptx_problem(str(self.device), self.dtype, c.num_heads, c.num_kv_heads, c.head_dim, page)
        note = f"FP8 KV cache: the attention converts V by Triton's cast, not by PTX ({why})"
        if why and not gpu_lacks(why) and note not in self.notes:
            self.notes.append(note)

    # --------------------------------------------------------------------------------- forward

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    def hidden_states(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """The residual stream after the last decoder layer, every token of the step [T, hidden]."""
        c = self.cfg
        t = batch.num_tokens
        if batch.positions.shape[0] != t or batch.slot_mapping.shape[0] != t:
            raise InputError(f"forward batch: {t} input_ids but {batch.positions.shape[0]} positions and "
                             f"{batch.slot_mapping.shape[0]} slots")
        if len(kv.layers) != c.num_layers:
            raise InputError(f"kv cache has {len(kv.layers)} layers, the model {c.num_layers}")
        x = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.rope(batch.positions)
        state = self.attention.begin(batch, kv)
        qs = c.q_size
        n = len(self.layers)
        x, h = self.add_norm(x, None, self.layers[0].input_norm) if n else (x, x)
        raw = self.fused_ops  # the fused kernels sum W8A16's split-K partials themselves (one kernel fewer each)
        for li, L in enumerate(self.layers):
            q, k, v = self.rope_split(L.qkv(h, partials=raw), cos, sin)
            o = self.attention(q, k, v, kv.layers[li], batch, kv, state, li)
            x, h = self.add_norm(x, L.o(o.reshape(t, qs), partials=raw), L.post_norm)
            down = L.down(self.silu_mul(L.gate_up(h)), partials=raw and li + 1 < n)
            if li + 1 < n:  # the next layer's input norm rides on this residual add
                x, h = self.add_norm(x, down, self.layers[li + 1].input_norm)
            else:
                x = x + down
        return x

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta, w)); delta None: (x, rms_norm(x, w))."""
        return self._pointwise.add_rms_norm(x, delta, w, self.cfg.rms_norm_eps)

    def rope_split(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """RoPE'd q [T, H, D], k [T, KVH, D] and v [T, KVH, D] (contiguous) of a fused qkv output."""
        c = self.cfg
        return self._pointwise.rope_split(qkv, cos, sin, c.num_heads, c.num_kv_heads, c.head_dim)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        return self._pointwise.silu_mul(gu)

    def final_hidden(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """The normed last hidden state of each sequence [B, hidden] (what the lm_head reads)."""
        x = self.hidden_states(batch, kv)
        last = torch.cumsum(batch.query_lens.to(torch.int64), 0) - 1
        return ref.rms_norm(x[last], self.norm, self.cfg.rms_norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, vocab] of final hidden states [B, hidden]."""
        return self.lm_head(h).float()

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Float32 logits of the last token of each sequence [B, vocab]."""
        return self.logits(self.final_hidden(batch, kv))

    def forward_rows(self, batch: ForwardBatch, kv: KVCache, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() and the normed hidden states of the flattened tokens ``rows`` (for prompt logprobs)."""
        x = self.hidden_states(batch, kv)
        last = torch.cumsum(batch.query_lens.to(torch.int64), 0) - 1
        h = ref.rms_norm(x[torch.cat([last, rows.to(last.device)])], self.norm, self.cfg.rms_norm_eps)
        return self.logits(h[:last.numel()]), h[last.numel():]

    __call__ = forward

    def linears(self) -> dict[str, Linear]:
        out = {}
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}"
            out[f"{p}.self_attn.qkv_proj"] = L.qkv
            out[f"{p}.self_attn.o_proj"] = L.o
            out[f"{p}.mlp.gate_up_proj"] = L.gate_up
            out[f"{p}.mlp.down_proj"] = L.down
        return out

    def weight_bytes(self) -> int:
        """Bytes a decode step streams: every linear weight, the norms, and the lm_head."""
        n = sum(lin.weight_bytes for lin in self.linears().values()) + self.lm_head.weight_bytes
        n += sum(L.input_norm.numel() * L.input_norm.element_size() * 2 for L in self.layers)
        return n
