"""Linear layers over dense or FP8 weights, and the fusion of q/k/v and gate/up shards.

Backends for an FP8 weight (``QuantWeight``):

* ``dequant``: dequantize once at load into the activation dtype (CPU, and a fallback anywhere).
* ``w8a8``: activations quantized to FP8 (dynamic per token, or the checkpoint's static per-tensor
  ``input_scale``), then ``torch._scaled_mm`` (tensor/row-wise scales; CUDA compute capability >= 8.9,
  also runs on the CPU).
* ``w8a16``: the Triton weight-only GEMM/GEMV (``w8a16.py``): bf16/fp32 activations, FP8 weights
  dequantized in registers; per-tensor, per-channel and block scales.
* ``dequant-jit``: dequantize into a temporary with the Triton kernel, then a dense GEMM (large
  batches on GPUs without FP8 tensor cores, and block scales at large M).
* ``auto``: per call, by the number of tokens M: ``w8a16`` for M <= 64 on a GPU (block scales: when their K
  size has a power-of-two divisor >= 16), else ``w8a8`` where the GPU has FP8 tensor cores, the scales are
  tensor/channel and ``torch._scaled_mm`` runs with them (probed once at load: some torch builds have no
  row-wise kernel for sm_89), else ``dequant-jit``; ``dequant`` on the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from gpulab.core.errors import DeviceError, InputError, series
from gpulab.vajra import reference as ref
from gpulab.vajra.checkpoint import QuantWeight

LINEAR_BACKENDS = ("auto", "dequant", "w8a8", "w8a16", "dequant-jit")


def check_backend_option(name: str) -> None:
    """--linear-backend NAME: a one-line InputError unless it is one of LINEAR_BACKENDS."""
    if name not in LINEAR_BACKENDS:
        raise InputError(f"--linear-backend must be {series(LINEAR_BACKENDS)}, got {name!r}")
W8A16_MAX_M = 64


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "") == "1"


def fp8_tensor_cores(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# FP8 GEMMs on a GPU accumulate with the tensor cores' fast accumulation (``use_fast_accum``: no periodic promotion
# of the partial sums to fp32, as the FP8 GEMM kernels of inference engines run on Hopper); GPULAB_FP8_FAST_ACCUM=0
# turns it off for a whole run (an A/B: serve-kernels also times W8A8 both ways at M > 64). Where a torch build
# refuses it for a scale kind, the probe falls back to plain accumulation for that device and kind.
FAST_ACCUM = os.environ.get("GPULAB_FP8_FAST_ACCUM", "1") != "0"
_NO_FAST_ACCUM: set[tuple[str, bool]] = set()  # (device, row-wise) where the probe found fast accumulation refused


def _fast_accum(device: torch.device, rowwise: bool, fast: bool | None) -> bool:
    if device.type != "cuda":
        return False
    if fast is not None:
        return fast
    index = device.index if device.index is not None else torch.cuda.current_device()
    return FAST_ACCUM and (f"cuda:{index}", rowwise) not in _NO_FAST_ACCUM


def fast_accum_in_use(device: torch.device, rowwise: bool = True) -> bool:
    """Does W8A8 on ``device`` accumulate fast (after the probe; False on the CPU)?"""
    return _fast_accum(device, rowwise, None)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool | None = None) -> torch.Tensor:
    """``torch._scaled_mm`` across the supported torch versions: 2.4 returns ``(out, amax)``, 2.5 and later
    the output alone. ``fast_accum``: the tensor cores' fast accumulation (None: on a GPU unless
    GPULAB_FP8_FAST_ACCUM=0 or the probe found it refused; never on the CPU)."""
    rowwise = scale_a.dim() > 0 or scale_b.dim() > 0  # tensor-wise scales are 0-d (as the probe's)
    kw = {"use_fast_accum": True} if _fast_accum(a.device, rowwise, fast_accum) else {}
    y = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kw)
    return y[0] if isinstance(y, (tuple, list)) else y


@functools.lru_cache(maxsize=8)
def _scaled_mm_probe(device: str, rowwise: bool) -> str | None:
    """Run ``torch._scaled_mm`` once on 16 x 32 zeros on ``device``: None when it works with tensor-wise
    (or row-wise) scales, else the reason. Some torch builds lack the row-wise kernel for sm_89 (L40S, RTX 40);
    some torch releases have no CPU kernel at all (2.4 and 2.7 seen) and 2.11's takes per-tensor scales only.
    On a GPU it first tries fast accumulation (see FAST_ACCUM), then, refused, plain accumulation, which this
    device and scale kind then keep."""
    dev = torch.device(device)
    a = torch.zeros(16, 32, device=dev).to(torch.float8_e4m3fn)
    sa = torch.ones(16, 1, device=dev) if rowwise else torch.ones((), device=dev)
    sb = torch.ones(1, 16, device=dev) if rowwise else torch.ones((), device=dev)
    out_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tries = [True, False] if dev.type == "cuda" and FAST_ACCUM else [None]
    for i, fast in enumerate(tries):
        try:
            y = scaled_mm(a, a.t(), sa, sb, out_dtype, fast_accum=fast)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if tuple(y.shape) != (16, 16):
                raise RuntimeError(f"unexpected output shape {tuple(y.shape)}")
        except (RuntimeError, TypeError) as e:  # NotImplementedError is a RuntimeError
            if i + 1 < len(tries):
                continue
            msg = str(e).strip().splitlines()
            return f"torch._scaled_mm with {'row' if rowwise else 'tensor'}-wise scales fails here ({msg[0][:240].strip() if msg else type(e).__name__})"
        if fast is False:
            _NO_FAST_ACCUM.add((device, rowwise))
        return None
    return None  # pragma: no cover


def w8a8_unavailable(device: torch.device, rowwise: bool) -> str | None:
    """Why W8A8 (``torch._scaled_mm``) cannot run on ``device``, or None (probed once per device and scale
    kind; the CPU runs it slowly where torch has a CPU kernel for it, e.g. 2.14)."""
    if device.type != "cuda":
        return _scaled_mm_probe(str(device.type), rowwise)
    if not fp8_tensor_cores(device):
        cc = torch.cuda.get_device_capability(device)
        return f"compute capability {cc[0]}.{cc[1]} has no FP8 tensor cores (8.9 or newer needed)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _scaled_mm_probe(f"cuda:{index}", rowwise)


def w8a16_fits(qw: QuantWeight) -> bool:
    """The Triton W8A16 kernel takes the weight's scales (block scales: a K tile of >= 16 must divide the block)."""
    if qw.strategy != "block":
        return True
    from gpulab.vajra.w8a16 import block_k_tile

    return block_k_tile(qw.block) is not None


# ---------------------------------------------------------------------------- FP8 ops with dispatch


def quantize(x: torch.Tensor, strategy: str, block=None):
    """Triton on CUDA, the torch reference elsewhere (same rounding)."""
    if x.is_cuda:
        from gpulab.vajra import fp8_kernels as K

        return K.quantize(x, strategy, block)
    return ref.quantize(x, strategy, block)


def dequantize(qw: QuantWeight, out_dtype: torch.dtype) -> torch.Tensor:
    if qw.q.is_cuda:
        from gpulab.vajra import fp8_kernels as K

        return K.dequantize(qw.q, qw.scale, qw.block, out_dtype=out_dtype)
    return ref.dequantize(qw.q, qw.scale, qw.block, out_dtype=out_dtype)


def requantize_rows(q: torch.Tensor, row_scale: torch.Tensor, new_scale: torch.Tensor) -> torch.Tensor:
    if q.is_cuda:
        from gpulab.vajra import fp8_kernels as K

        return K.requantize_rows(q, row_scale, new_scale)
    return ref.requantize_rows(q, row_scale, new_scale)


def cat_fp8(qs: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of FP8 tensors along dim 0 through their raw bytes: torch before 2.6 has no fp8 cat
    kernel ("cat_cuda" not implemented for 'Float8_e4m3fn'); concatenating bytes is the same thing."""
    return torch.cat([q.view(torch.uint8) for q in qs], 0).view(qs[0].dtype)


def fuse(parts: list, names: list[str]):
    """Concatenate shards along the output dim: dense tensors, or FP8 weights onto one layout.

    Per-tensor shards with different scales are requantized onto the largest scale (the error is at
    most half an FP8 step at that scale); block shards whose row count is not a multiple of the block
    are dequantized, concatenated and requantized per block.
    """
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, 0)
    if not all(isinstance(p, QuantWeight) for p in parts):
        dense = [n for n, p in zip(names, parts) if not isinstance(p, QuantWeight)]
        raise InputError(f"tensor {dense[0]!r} is not FP8 while the other shards of its fused layer are "
                         "(q/k/v and gate/up must share one format)")
    strat = {p.strategy for p in parts}
    if len(strat) != 1:
        raise InputError(f"tensor {names[0]!r}: shards {', '.join(names)} mix scale strategies {sorted(strat)}")
    p0 = parts[0]
    ks = {p.q.shape[1] for p in parts}
    if len(ks) != 1:
        raise InputError(f"tensor {names[0]!r}: shards have different input sizes {sorted(ks)}")
    if p0.input_scale is not None:
        in_scale = torch.stack([p.input_scale for p in parts]).amax()
    else:
        in_scale = None
    q = cat_fp8([p.q for p in parts])
    if p0.strategy == "channel":
        return QuantWeight(q, torch.cat([p.scale for p in parts]), "channel", None, p0.act, in_scale)
    if p0.strategy == "tensor":
        scales = torch.stack([p.scale.reshape(()) for p in parts])
        new = scales.amax()
        if bool((scales == new).all()):
            return QuantWeight(q, new, "tensor", None, p0.act, in_scale)
        rows = torch.cat([s.expand(p.q.shape[0]) for s, p in zip(scales, parts)])
        return QuantWeight(requantize_rows(q, rows, new), new, "tensor", None, p0.act, in_scale)
    bn, bk = p0.block
    if all(p.q.shape[0] % bn == 0 for p in parts[:-1]):
        return QuantWeight(q, torch.cat([p.scale for p in parts], 0), "block", p0.block, p0.act, in_scale)
    full = torch.cat([dequantize(p, torch.float32) for p in parts], 0)
    q2, s2 = quantize(full, "block", p0.block)
    return QuantWeight(q2, s2, "block", p0.block, p0.act, in_scale)


# ------------------------------------------------------------------------------------------ the layer


class Linear:
    """``y = x @ W^T (+ b)`` over a dense weight or a :class:`QuantWeight`."""

    def __init__(self, weight, bias: torch.Tensor | None, act_dtype: torch.dtype, backend: str = "auto"):
        if backend not in LINEAR_BACKENDS:
            raise InputError(f"linear backend {backend!r} is unknown (choose from {', '.join(LINEAR_BACKENDS)})")
        self.bias = bias
        self.act_dtype = act_dtype
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.qw: QuantWeight | None = None
        self.w: torch.Tensor | None = None
        self.w8a8_ok = False  # torch._scaled_mm runs with this weight's scales on its device (auto may pick w8a8)
        self.backend = backend
        if isinstance(weight, QuantWeight):
            dev = weight.q.device
            self.qw = weight
            if backend == "auto" and dev.type == "cpu":
                backend = "dequant"
            if backend in ("w8a16", "dequant-jit") and not triton_usable(dev):
                raise DeviceError(f"linear backend {backend!r} needs a CUDA GPU (Triton), or TRITON_INTERPRET=1 on the CPU")
            if backend == "w8a16" and not w8a16_fits(weight):
                raise InputError(f"linear backend 'w8a16' needs block scales whose K size has a power-of-two divisor "
                                 f">= 16, got blocks {list(weight.block)} (use auto or dequant-jit)")
            if backend == "w8a8" and weight.strategy == "block":
                raise InputError("linear backend 'w8a8' supports per-tensor and per-channel weight scales, not block "
                                 "scales (use auto, w8a16 or dequant)")
            if backend == "dequant":
                self.w = dequantize(weight, act_dtype)
                self.qw = None
            elif backend in ("auto", "w8a8") and weight.strategy != "block":
                # probed once here, at load: never first during a CUDA-graph capture
                why = w8a8_unavailable(dev, rowwise=not (weight.act == "static" and weight.strategy == "tensor"))
                if backend == "w8a8" and why:
                    raise DeviceError(f"linear backend 'w8a8' cannot run here: {why} (use auto, w8a16 or dequant-jit)")
                self.w8a8_ok = why is None
            self.backend = backend
        else:
            self.w = weight.to(act_dtype)
            self.backend = "dense"
        self.out_features = (self.w if self.w is not None else self.qw.q).shape[0]
        self.in_features = (self.w if self.w is not None else self.qw.q).shape[1]

    @property
    def weight_bytes(self) -> int:
        if self.qw is not None:
            return self.qw.q.numel() + self.qw.scale.numel() * 4
        return self.w.numel() * self.w.element_size()

    def choose(self, m: int) -> str:
        if self.qw is None:
            return "dense"
        if self.backend != "auto":
            return self.backend
        if m <= W8A16_MAX_M and w8a16_fits(self.qw):
            return "w8a16"
        # a weight-only checkpoint (no input_activations) keeps its activations unquantized unless w8a8 is asked for
        if self.w8a8_ok and self.qw.act is not None and self.qw.strategy in ("tensor", "channel") \
                and self.w8a8_aligned():
            return "w8a8"
        return "dequant-jit"

    def w8a8_aligned(self) -> bool:
        n, k = self.qw.q.shape
        return n % 16 == 0 and k % 16 == 0

    def __call__(self, x: torch.Tensor, partials: bool = False) -> torch.Tensor:
        """``partials=True`` (x 2-D): the W8A16 kernel's split-K partial sums [SPLIT, M, N] in fp32 may come back
        instead of y [M, N], for a fused consumer that sums them (fused_ops.py); never with a bias."""
        if self.observer is not None:
            self.observer(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        kind = self.choose(x2.shape[0])
        if kind == "dense" or kind == "dequant":
            y = F.linear(x2, self.w)
        elif kind == "w8a16":
            from gpulab.vajra.w8a16 import w8a16_matmul

            raw = partials and self.bias is None and x.dim() == 2
            y = w8a16_matmul(x2, self.qw.q, self.qw.scale, self.qw.strategy, self.qw.block, reduce=not raw)
            if y.dim() == 3:
                return y
        elif kind == "w8a8":
            y = self._w8a8(x2)
        elif kind == "dequant-jit":
            y = F.linear(x2, dequantize(self.qw, x2.dtype))
        else:  # pragma: no cover
            raise InputError(f"linear backend {kind!r} is unknown")
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.qw
        if qw.strategy == "block":
            raise InputError("linear backend 'w8a8' supports per-tensor and per-channel weight scales, not block scales")
        if not self.w8a8_aligned():
            raise InputError(f"linear backend 'w8a8' needs both weight dims to be multiples of 16, got {list(qw.q.shape)}")
        m = x.shape[0]
        n = qw.q.shape[0]
        if qw.act == "static":
            xs = qw.input_scale.reshape(())
            xq = ref.cast_fp8(x, xs, qw.q.dtype)
            sa = xs
        else:
            xq, xs = quantize(x, "token")
            sa = xs.reshape(m, 1)
        sb = qw.scale.reshape(()) if qw.strategy == "tensor" else qw.scale.reshape(1, n)
        if sa.dim() != sb.dim():  # row-wise on one side needs row-wise on both
            sa = sa.reshape(1, 1).expand(m, 1).contiguous() if sa.dim() == 0 else sa
            sb = sb.reshape(1, 1).expand(1, n).contiguous() if sb.dim() == 0 else sb
        out_dtype = x.dtype if (x.device.type == "cpu" or x.dtype == torch.bfloat16) else torch.bfloat16
        y = scaled_mm(xq, qw.q.t(), sa.float(), sb.float(), out_dtype)
        return y.to(x.dtype)


def small_and_large_backends(lin: Linear) -> tuple[str, str]:
    """The backends ``lin`` runs in steps of at most W8A16_MAX_M tokens and in larger ones."""
    return lin.choose(1), lin.choose(W8A16_MAX_M + 1)


def varies_with_m(lin: Linear) -> bool:
    """Does ``auto`` give ``lin`` another backend for small steps than for large ones (an FP8 weight on a GPU:
    W8A16 with bf16 activations at <= W8A16_MAX_M tokens, W8A8 with FP8 activations or dequant-jit above)?"""
    small, large = small_and_large_backends(lin)
    return small != large


@contextlib.contextmanager
def pinned_backends(linears: Iterable[Linear], m: int) -> Iterator[list[str]]:
    """Inside: every ``auto`` linear runs the backend ``auto`` picks for a step of ``m`` tokens, whatever a step's
    token count, so that a token's activation precision no longer depends on how many tokens share its step (its
    rounding still may: a backend's tiling and split-K follow the step's size). Eager calls only: a CUDA graph
    replays the kernels it captured. Yields the sorted backends pinned; restores ``auto``."""
    pinned = [lin for lin in linears if lin.backend == "auto"]
    for lin in pinned:
        lin.backend = lin.choose(m)
    try:
        yield sorted({lin.backend for lin in pinned})
    finally:
        for lin in pinned:
            lin.backend = "auto"
