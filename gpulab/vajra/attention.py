"""Attention backends over the paged KV cache, behind one interface.

``backend.begin(batch, kv)`` runs once per forward step (metadata, flashinfer's plan) and returns
a state; ``backend(layer_idx, q, k, v, cache_layer, kv, state)`` writes this step's K/V into the
cache layer (``[num_blocks, 2, block_size, Hkv, D]``, NHD pages) and returns the attention output
``[T, Hq, D]``.

* ``torch``: the SDPA reference, sequence by sequence (any device; the CPU default).
* ``triton``: the Triton paged-attention kernels (``paged_attention.py``): the split-KV decode kernel
  for decode-only steps, the general varlen kernel for prefill and mixed steps; on the CPU only under
  ``TRITON_INTERPRET=1`` (tests).
* ``flashinfer``: BatchPrefill/BatchDecodeWithPagedKVCacheWrapper (GPU only, imported lazily). Opt-in:
  its plan() runs on the host every step, so its decode steps run eagerly (no CUDA graphs), and its
  prefill module is a ~75 s JIT build on first use.
* ``auto``: ``triton`` on a GPU (decode in CUDA graphs), ``torch`` on the CPU.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from gpulab.core.errors import DeviceError, InputError
from gpulab.vajra import reference as ref
from gpulab.vajra.interface import ForwardBatch, KVCache

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")


# GQA group sizes (query heads per KV head) flashinfer's CUDA-core decode kernels are built for
# (DISPATCH_GQA_GROUP_SIZE); any other group size ("Unsupported group_size: 7", e.g. Qwen2-7B's 28/4)
# needs the tensor-core decode path, which takes every group size.
FLASHINFER_CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4, 8)


def flashinfer_decode_tensor_cores(num_heads: int, num_kv_heads: int) -> bool:
    """Whether flashinfer's decode wrapper must use its tensor-core kernels for this head layout."""
    return (num_heads // num_kv_heads) not in FLASHINFER_CUDA_CORE_DECODE_GROUPS


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


class TorchAttention:
    name = "torch"
    graph_capturable = False  # reads query/context lengths back to the host every step
    fused_store = False  # the K/V store as one Triton kernel (fused_ops.store_kv): the Triton and flashinfer
    # backends; the model keeps it in step with its own fused kernels (off where their probe failed)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.hq, self.hkv, self.d, self.scale = num_heads, num_kv_heads, head_dim, scale

    def begin(self, batch: ForwardBatch, kv: KVCache) -> Any:
        return None

    def write(self, k, v, cache_layer, batch: ForwardBatch, kv: KVCache, layer: int) -> None:
        ks, vs = kv.scales(layer)
        if self.fused_store:
            from gpulab.vajra.fused_ops import store_kv

            store_kv(cache_layer, k, v, batch.slot_mapping, ks, vs)
        else:
            ref.write_kv(cache_layer, k, v, batch.slot_mapping, ks, vs)

    def __call__(self, q, k, v, cache_layer, batch: ForwardBatch, kv: KVCache, state: Any, layer: int
                 ) -> torch.Tensor:
        self.write(k, v, cache_layer, batch, kv, layer)
        return ref.paged_attention(q, cache_layer, batch.query_lens, batch.context_lens, batch.block_tables,
                                   self.scale, *kv.scales(layer))


class TritonAttention(TorchAttention):
    name = "triton"
    graph_capturable = True  # decode-only steps run without a host sync
    fused_store = True

    def __init__(self, *a, device: torch.device, **kw):
        super().__init__(*a, **kw)
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") != "1":
            raise DeviceError("attention backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")

    def begin(self, batch: ForwardBatch, kv: KVCache) -> Any:
        from gpulab.vajra.paged_attention import make_metadata

        # decode-only: max query length is 1, known without reading query_lens back (CUDA-graph capture)
        return make_metadata(batch.query_lens, batch.context_lens, 1 if batch.is_decode_only else None)

    def __call__(self, q, k, v, cache_layer, batch, kv, state, layer):
        from gpulab.vajra.paged_attention import paged_attention, paged_decode_attention

        self.write(k, v, cache_layer, batch, kv, layer)
        ks, vs = kv.scales(layer)
        if self.uses_decode_kernel(q, state):
            return paged_decode_attention(q, cache_layer, batch.block_tables, state.context_lens, self.scale, ks, vs)
        return paged_attention(q, cache_layer, batch.block_tables, state, self.scale, ks, vs)

    @staticmethod
    def uses_decode_kernel(q, state) -> bool:
        """Decode-only step (every query length 1: max_query_len, known on the host without a sync for
        a decode-only batch, and one token per sequence): the split-KV flash-decoding kernel."""
        return state.max_query_len == 1 and q.shape[0] == state.query_lens.shape[0]


class FlashInferAttention(TorchAttention):
    """flashinfer's paged prefill (mixed batches) and decode (decode-only batches) wrappers."""

    name = "flashinfer"
    graph_capturable = False  # plan() runs on the host every step (fixed-buffer CUDA-graph wrappers not wired up)
    fused_store = True
    WORKSPACE_BYTES = 128 << 20
    HEAD_DIMS = (64, 128, 256)  # the head sizes flashinfer's kernels are built for
    ACT_DTYPES = (torch.bfloat16, torch.float16)  # flashinfer has no fp32 attention kernels

    def __init__(self, *a, device: torch.device, act_dtype: torch.dtype, use_tensor_cores: bool | None = None, **kw):
        super().__init__(*a, **kw)
        if device.type != "cuda":
            raise DeviceError("attention backend 'flashinfer' needs a CUDA GPU")
        if self.d not in self.HEAD_DIMS:
            other = "triton" if triton_head_dim_ok(self.d) else "torch"
            raise InputError(f"attention backend 'flashinfer' supports head_dim {', '.join(map(str, self.HEAD_DIMS))}, "
                             f"not {self.d} (use --attention-backend {other})")
        if act_dtype not in self.ACT_DTYPES:
            raise InputError(f"attention backend 'flashinfer' needs bf16 or fp16 activations, not "
                             f"{str(act_dtype).replace('torch.', '')} (use --attention-backend triton)")
        try:
            import flashinfer
        except Exception as e:
            raise DeviceError(f"attention backend 'flashinfer' needs the flashinfer package ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'not importable'}); "
                              "install the 'flashinfer' extra or use --attention-backend triton") from None
        self.fi = flashinfer
        self.act_dtype = act_dtype
        self.workspace = torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # prefill pinned to the FA2 kernels (auto picks FA3 on Hopper: a second, slower JIT build). Decode uses
        # the CUDA-core decode kernels by default: their JIT module builds in ~16 s, the tensor-core path
        # (use_tensor_cores=True) reuses the prefill module instead (~75 s on first use). The CUDA-core
        # kernels exist for GQA groups 1, 2, 3, 4 and 8 only: other groups take the tensor-core path.
        if use_tensor_cores is None:
            use_tensor_cores = flashinfer_decode_tensor_cores(self.hq, self.hkv)
        self.use_tensor_cores = bool(use_tensor_cores)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                    use_tensor_cores=use_tensor_cores)

    def begin(self, batch: ForwardBatch, kv: KVCache) -> Any:
        bs = kv.block_size
        ql = batch.query_lens.to("cpu", torch.int32)
        cl = batch.context_lens.to("cpu", torch.int32)
        nblk = (cl + bs - 1) // bs
        kv_indptr = torch.zeros(len(cl) + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(nblk, 0)
        bt = batch.block_tables.to("cpu", torch.int32)
        indices = torch.cat([bt[i, : int(n)] for i, n in enumerate(nblk.tolist())]) if len(cl) else bt.new_zeros(0)
        last = (cl - (nblk - 1) * bs).to(torch.int32)
        # host tensors: plan() needs them on the host anyway and copies them to the device itself
        decode = bool(batch.is_decode_only or bool((ql == 1).all()))
        if decode:
            self.decode.plan(kv_indptr, indices, last, self.hq, self.hkv, self.d, bs,
                             pos_encoding_mode="NONE", sm_scale=self.scale,
                             q_data_type=self.act_dtype, kv_data_type=kv.dtype)
            return self.decode
        qo = torch.zeros(len(ql) + 1, dtype=torch.int32)
        qo[1:] = torch.cumsum(ql, 0)
        self.prefill.plan(qo, kv_indptr, indices, last, self.hq, self.hkv, self.d, bs, causal=True,
                          sm_scale=self.scale, q_data_type=self.act_dtype, kv_data_type=kv.dtype)
        return self.prefill

    def __call__(self, q, k, v, cache_layer, batch, kv, state, layer):
        self.write(k, v, cache_layer, batch, kv, layer)
        if cache_layer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            ks, vs = kv.scales(layer)
            return state.run(q.contiguous(), cache_layer, k_scale=ks, v_scale=vs)
        return state.run(q.contiguous(), cache_layer)


def triton_head_dim_ok(d: int) -> bool:
    """Whether the Triton paged-attention kernels take this head_dim (powers of two from 16)."""
    return d >= 16 and not d & (d - 1)


def make_backend(name: str, *, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, act_dtype: torch.dtype):
    if name not in ATTENTION_BACKENDS:
        raise InputError(f"attention backend {name!r} is unknown (choose from {', '.join(ATTENTION_BACKENDS)})")
    if name == "auto":  # triton on a GPU: its decode steps can be captured in CUDA graphs, flashinfer's not yet
        # (its kernels tile head_dim by powers of two: 80, 96 or 100 (open_llama_3b) take the torch reference)
        name = "triton" if device.type == "cuda" and triton_head_dim_ok(head_dim) else "torch"
    if name == "triton" and not triton_head_dim_ok(head_dim):
        raise InputError(f"attention backend 'triton' needs a head_dim that is a power of two >= 16, this model's "
                         f"is {head_dim} (use --attention-backend torch or flashinfer)")
    args = (num_heads, num_kv_heads, head_dim)
    if name == "torch":
        return TorchAttention(*args, scale=scale)
    if name == "triton":
        return TritonAttention(*args, scale=scale, device=device)
    return FlashInferAttention(*args, scale=scale, device=device, act_dtype=act_dtype)
