"""Stitch layers: the large model's prefill states -> the small model's KV cache.

RoPE choice (why the stitches never see rotated keys)
-----------------------------------------------------
A Hugging Face cache holds keys *after* RoPE, rotated with the model's own ``rope_theta``,
scaling (Llama-3 ``rope_type: llama3``) and head_dim. Two models of a pair differ in all three,
so a linear map between their cached keys would have to undo one position-dependent rotation
and apply another: no fixed matrix does that. The stitches therefore read *pre-RoPE* states of
the large model at the aligned layer ``a(l)``, produce the small model's *pre-RoPE* K and V of
layer ``l``, and the small model's own rotary embedding (its ``model.rotary_emb`` at the
prompt positions) rotates the keys before they enter the cache. Values carry no RoPE. Two input
modes:

- ``hidden`` (default): ``x = input_layernorm_a(h_a)`` (the large model's attention input at layer
  ``a``) -> ``y = W_l x + b_l`` (d_large -> d_small) -> the small model's own ``k_proj``/``v_proj``
  (and ``k_norm`` where the family has one) -> small RoPE. The small model's projections stay in
  the loop, so stage-2 LoRA on ``k_proj``/``v_proj`` acts on stitched caches too.
- ``kv``: the large model's pre-RoPE ``k_proj``/``v_proj`` outputs at layer ``a`` (all its KV heads,
  flattened; before any ``k_norm``) -> ``W^K_l``, ``W^V_l`` -> the small model's pre-RoPE K/V heads
  (then its ``k_norm`` where the family has one) -> small RoPE.

- ``residual``: the small model's *own* attention input at layer ``l`` (from its own prefill of the
  prompt) plus ``W_l x_a + b_l`` of the large model's attention input, then the small model's
  projections as in ``hidden``. The maps start at zero, so the stitched cache starts as exactly the
  small model's own (nothing to regress in stage 1) and stage 2 can only add what the large model's
  states carry beyond it. It costs the small model's prefill on the prefill side too.

``hidden`` and ``kv`` are exact when the models are identical and the maps are identities, ``residual``
when its maps are zero (tests check this).
Since RoPE is a per-position rotation, MSE between stitched and actual keys is the same before and
after it; the warm-up loss is computed on the actual (post-RoPE) cache tensors anyway.
"""
from __future__ import annotations

from typing import Any

from gpulab.core.errors import InputError
from gpulab.stitchkv.models import decoder_layers, rotary, shape_of

ALIGNMENTS = ("uniform-nearest", "last-aligned", "first-aligned")
MODES = ("hidden", "kv", "residual")


def alignment(kind: str, n_large: int, n_small: int) -> list[int]:
    """Large-model layer feeding each small-model layer.

    ``uniform-nearest``: small layer l sits at relative depth (l + 0.5) / n_small; take the large
    layer whose relative depth (a + 0.5) / n_large is nearest (equal depths: the identity). ``last-aligned``: the small model's
    layers read the large model's last n_small layers (l -> n_large - n_small + l, clamped at 0).
    ``first-aligned``: l -> min(l, n_large - 1). Or an explicit comma list such as ``0,3,5``.
    """
    if n_large < 1 or n_small < 1:
        raise InputError(f"layer counts must be >= 1 (large {n_large}, small {n_small})")
    if kind == "uniform-nearest":
        # centre of small layer l at relative depth (l + 0.5) / n_small; nearest large-layer centre, half up
        return [min(n_large - 1, max(0, int((l + 0.5) * n_large / n_small))) for l in range(n_small)]
    if kind == "last-aligned":
        return [max(0, n_large - n_small + l) for l in range(n_small)]
    if kind == "first-aligned":
        return [min(l, n_large - 1) for l in range(n_small)]
    parts = [p.strip() for p in kind.split(",")]
    try:
        out = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--alignment must be one of {', '.join(ALIGNMENTS)} or a comma list of "
                         f"{n_small} large-layer indices, got {kind!r}") from None
    if len(out) != n_small:
        raise InputError(f"--alignment lists {len(out)} layers, the small model has {n_small}")
    bad = [a for a in out if not 0 <= a < n_large]
    if bad:
        raise InputError(f"--alignment index {bad[0]} is out of range for a {n_large}-layer large model")
    return out


def rotate_half(x: Any) -> Any:
    import torch

    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(k: Any, cos: Any, sin: Any) -> Any:
    """Rotate keys [B, H, T, D] with the model's cos/sin [B, T, R] (Hugging Face rotate-half convention).

    Partial RoPE (nemotron: R = head_dim x partial_rotary_factor < D): only the first R dims of each head
    rotate, the rest pass through, as transformers' own ``apply_rotary_pos_emb`` does (R = D: all of them)."""
    import torch

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == k.shape[-1]:
        return (k * cos) + (rotate_half(k) * sin)
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    return torch.cat(((k_rot * cos) + (rotate_half(k_rot) * sin), k_pass), dim=-1)


def _heads(x: Any, head_dim: int) -> Any:
    return x.view(*x.shape[:-1], -1, head_dim)  # [B, T, H, D]


def pre_rope_kv(model: Any, layer: int, x: Any) -> tuple[Any, Any]:
    """A model's own pre-RoPE K and V ([B, T, H, D]) of ``layer`` from its attention input ``x``."""
    attn = decoder_layers(model)[layer].self_attn
    hd = shape_of(model)["head_dim"]
    k = _heads(attn.k_proj(x), hd)
    if hasattr(attn, "k_norm"):  # qwen3: per-head RMSNorm before RoPE
        k = attn.k_norm(k)
    v = _heads(attn.v_proj(x), hd)
    return k, v


def attention_inputs(model: Any, hidden_states: tuple, layers: list[int]) -> dict[int, Any]:
    """``input_layernorm_a(h_a)`` for each layer a; ``hidden_states[a]`` is the input of layer a."""
    dl = decoder_layers(model)
    return {a: dl[a].input_layernorm(hidden_states[a]) for a in sorted(set(layers))}


def large_features(large: Any, hidden_states: tuple, align: list[int], mode: str) -> dict[int, Any]:
    """What the stitches read of the large model: attention inputs (hidden, residual) or pre-RoPE K/V
    flattened over heads (kv)."""
    xs = attention_inputs(large, hidden_states, align)
    if mode in ("hidden", "residual"):
        return xs
    # raw k_proj/v_proj outputs (before any k_norm): the bank applies the small model's k_norm after its
    # map, so a family with k_norm (qwen3) would otherwise normalise twice (identity stitches not exact)
    return {a: pre_rope_raw(large, a, x) for a, x in xs.items()}


def stitch_inputs(large: Any, small: Any, bank: Any, prompt: Any, hidden_states: tuple | None = None,
                  with_own: bool = True) -> dict:
    """Everything the bank reads for ``prompt``: the large model's features (``hidden_states``: its prefill's,
    when already computed) and, in residual mode, the small model's own attention inputs under key "own"
    (``with_own=False`` leaves them to the caller: see :func:`own_features`)."""
    if hidden_states is None:
        hidden_states = large_prefill(large, prompt)[1]
    feats: dict = large_features(large, hidden_states, bank.align, bank.mode)
    if bank.mode == "residual" and with_own:
        feats["own"] = own_features(small, bank, prompt)
    return feats


def own_features(small: Any, bank: Any, prompt: Any) -> dict[int, Any]:
    """The small model's own attention inputs over ``prompt`` (what residual stitches add the large model's map to)."""
    return attention_inputs(small, prefill(small, prompt).hidden_states, list(range(len(bank.align))))


def small_rope(small: Any, like: Any, position_ids: Any) -> tuple[Any, Any]:
    return rotary(small)(like, position_ids)


def build_cache(kv: list[tuple[Any, Any]]) -> Any:
    """A DynamicCache holding these (K, V) [B, H, T, D] per layer."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]  # older transformers


def kv_bytes(kv: list[tuple[Any, Any]]) -> int:
    return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv))


def _define() -> type:
    import torch
    from torch import nn

    class _StitchBank(nn.Module):
        """One learned map per small-model layer (see the module docstring for the two modes)."""

        def __init__(self, large_shape: dict[str, int], small_shape: dict[str, int], align: list[int],
                     mode: str = "hidden") -> None:
            super().__init__()
            if mode not in MODES:
                raise InputError(f"--stitch-input must be one of {', '.join(MODES)}, got {mode!r}")
            if len(align) != small_shape["layers"]:
                raise InputError(f"alignment has {len(align)} entries, the small model has {small_shape['layers']} layers")
            self.mode, self.align = mode, list(align)
            self.large_shape, self.small_shape = dict(large_shape), dict(small_shape)
            if mode in ("hidden", "residual"):
                self.maps = nn.ModuleList(nn.Linear(large_shape["hidden"], small_shape["hidden"]) for _ in align)
            else:
                din = large_shape["kv_heads"] * large_shape["head_dim"]
                dout = small_shape["kv_heads"] * small_shape["head_dim"]
                self.kmaps = nn.ModuleList(nn.Linear(din, dout) for _ in align)
                self.vmaps = nn.ModuleList(nn.Linear(din, dout) for _ in align)
            self.reset_random()

        def meta(self) -> dict[str, Any]:
            return {"mode": self.mode, "align": self.align, "large_shape": self.large_shape,
                    "small_shape": self.small_shape}

        def linears(self) -> list[Any]:
            return [*self.kmaps, *self.vmaps] if self.mode == "kv" else list(self.maps)

        @torch.no_grad()
        def reset_random(self, seed: int = 0) -> None:
            """Random maps (scaled by fan-in); residual maps start at zero instead (the small model's own cache)."""
            g = torch.Generator().manual_seed(seed)
            for lin in self.linears():
                fan_in = lin.in_features
                if self.mode == "residual":
                    lin.weight.zero_()
                else:
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / fan_in ** 0.5)
                lin.bias.zero_()

        @torch.no_grad()
        def identity_(self) -> "_StitchBank":
            """Identity maps (needs equal dimensions: e.g. a model stitched to itself)."""
            for lin in self.linears():
                if lin.in_features != lin.out_features:
                    raise InputError(f"identity stitches need equal widths, got {lin.in_features} -> {lin.out_features}")
                lin.weight.copy_(torch.eye(lin.in_features))
                lin.bias.zero_()
            return self

        def pre_rope(self, feats: dict[int, Any], small: Any) -> list[tuple[Any, Any]]:
            """Stitched pre-RoPE (K, V) per small layer, [B, T, H_small, D_small]."""
            hd = self.small_shape["head_dim"]
            wdt = self.linears()[0].weight.dtype  # stitches keep their own (fp32) weights
            sdt = next(small.parameters()).dtype  # ... and hand the small model its dtype
            out = []
            for l, a in enumerate(self.align):
                if self.mode == "hidden":
                    out.append(pre_rope_kv(small, l, self.maps[l](feats[a].to(wdt)).to(sdt)))
                elif self.mode == "residual":
                    x = feats["own"][l].to(wdt) + self.maps[l](feats[a].to(wdt))
                    out.append(pre_rope_kv(small, l, x.to(sdt)))
                else:
                    fk, fv = (f.to(wdt) for f in feats[a])
                    k = _heads(self.kmaps[l](fk).to(sdt), hd)
                    attn = decoder_layers(small)[l].self_attn
                    if hasattr(attn, "k_norm"):
                        k = attn.k_norm(k)
                    out.append((k, _heads(self.vmaps[l](fv).to(sdt), hd)))
            return out

        def forward(self, feats: dict[int, Any], small: Any, position_ids: Any) -> list[tuple[Any, Any]]:
            """Stitched cache tensors per small layer: (K after the small model's RoPE, V), [B, H, T, D]."""
            kv = self.pre_rope(feats, small)
            cos, sin = small_rope(small, kv[0][1], position_ids)
            return [(apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)) for k, v in kv]

    return _StitchBank


_BANK = None


def make_bank(large_shape: dict[str, int], small_shape: dict[str, int], align: list[int], mode: str = "hidden") -> Any:
    global _BANK
    if _BANK is None:
        _BANK = _define()
    return _BANK(large_shape, small_shape, align, mode)


# --------------------------------------------------------------------------- prefill -> stitched cache
def prefill(model: Any, prompt: Any) -> Any:
    """One model's forward over ``prompt`` with every hidden state and the last position's logits (no cache)."""
    return model(input_ids=prompt, output_hidden_states=True, use_cache=False, logits_to_keep=1)


def large_prefill(large: Any, prompt: Any) -> tuple[Any, tuple]:
    """The large model's prefill: last-position logits and all hidden states (no cache kept)."""
    out = prefill(large, prompt)
    return out.logits[:, -1], out.hidden_states


def stitched_cache(large: Any, small: Any, bank: Any, prompt: Any) -> tuple[Any, Any]:
    """Prefill ``prompt`` [B, P] on the large model; return (its last logits, the stitched small cache)."""
    import torch

    logits, hs = large_prefill(large, prompt)
    feats = stitch_inputs(large, small, bank, prompt, hs)
    pos = torch.arange(prompt.shape[1], device=prompt.device).unsqueeze(0).expand(prompt.shape[0], -1)
    return logits, build_cache(bank(feats, small, pos))


# --------------------------------------------------------------------------- closed-form init
def least_squares_init(bank: Any, large: Any, small: Any, batches: list[Any], ridge: float = 1e-3) -> dict[str, float]:
    """Ridge least squares per stitch over prompts ``batches`` ([B, P] each), the ridge on the weights and not
    on the bias; returns the fit's R^2.

    kv mode: large pre-RoPE K (V) -> small pre-RoPE K (V), exact least squares on the warm-up
    objective (before any k_norm). hidden mode: large attention input -> small attention input
    of the same layer (a proxy target: the small k/v projections then map it to K/V). Not for
    residual stitches (they start at zero, the exact warm-up optimum).
    """
    import torch

    if bank.mode == "residual":
        raise InputError("--init ls does not apply to --stitch-input residual (its stitches start at zero)")
    n = len(bank.align)
    acc: dict[str, list] = {}
    with torch.no_grad():
        for prompt in batches:
            feats = large_features(large, large_prefill(large, prompt)[1], bank.align, bank.mode)
            xs_small = attention_inputs(small, prefill(small, prompt).hidden_states, list(range(n)))
            for l, a in enumerate(bank.align):
                if bank.mode == "hidden":
                    pairs = [("h", feats[a], xs_small[l])]
                else:
                    k, v = pre_rope_raw(small, l, xs_small[l])
                    pairs = [("k", feats[a][0], k), ("v", feats[a][1], v)]
                for name, x, y in pairs:
                    x = x.reshape(-1, x.shape[-1]).double()
                    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
                    y = y.reshape(-1, y.shape[-1]).double()
                    key = f"{name}{l}"
                    if key not in acc:
                        acc[key] = [x.T @ x, x.T @ y, (y * y).sum(0), y.sum(0), x.shape[0]]
                    else:
                        s = acc[key]
                        s[0] += x.T @ x
                        s[1] += x.T @ y
                        s[2] += (y * y).sum(0)
                        s[3] += y.sum(0)
                        s[4] += x.shape[0]
        r2 = {}
        for key, (xtx, xty, yy, ys, count) in acc.items():
            # the ridge on the weights only, scaled by the features' mean energy: the bias (the ones column) is
            # free, so a constant offset of the targets moves only the bias, exactly
            reg = torch.full((xtx.shape[0],), ridge * float(torch.diagonal(xtx)[:-1].mean()), dtype=xtx.dtype,
                             device=xtx.device)
            reg[-1] = 0.0
            w = torch.linalg.solve(xtx + torch.diag(reg), xty)  # [din+1, dout]
            l = int(key[1:])
            lin = bank.maps[l] if key[0] == "h" else (bank.kmaps[l] if key[0] == "k" else bank.vmaps[l])
            lin.weight.copy_(w[:-1].T.to(lin.weight.dtype))
            lin.bias.copy_(w[-1].to(lin.bias.dtype))
            sse = float((yy - 2 * (w * xty).sum(0) + (w * (xtx @ w)).sum(0)).sum())
            sst = float((yy - ys * ys / count).sum())
            r2[key] = 1.0 - sse / sst if sst > 0 else float("nan")
    return r2


def pre_rope_raw(model: Any, layer: int, x: Any) -> tuple[Any, Any]:
    """A model's pre-RoPE K/V *before* any k_norm, flattened over heads: the kv-mode stitch input (large)
    and the linear-map target of the kv-mode fit (small)."""
    attn = decoder_layers(model)[layer].self_attn
    hd = shape_of(model)["head_dim"]
    return _heads(attn.k_proj(x), hd).flatten(-2), _heads(attn.v_proj(x), hd).flatten(-2)
