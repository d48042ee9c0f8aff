"""Reading Hugging Face safetensors checkpoints: single or sharded (index file), memory-mapped,
tensor by tensor, and the FP8 quantization formats vajra understands.

Formats (``quantization_config`` in config.json):

* none: bf16/fp16/fp32 weights.
* ``compressed-tensors`` with ``format: float-quantized`` (or the older ``naive-quantized``): FP8 (e4m3)
  weights with ``weight_scale`` per tensor, channel or block (``block_structure``); input activations dynamic
  per token, or static per tensor with ``input_scale``; an ``ignore`` list (names or ``re:`` patterns).
* vLLM's ``fp8``: ``weight_scale`` (per tensor) with ``activation_scheme`` dynamic|static
  (``input_scale``), or ``weight_scale_inv`` with ``weight_block_size`` (DeepSeek-V3 style).

Per-channel scales may be stored as ``[out, 1]`` or ``[out]``. Anything unknown or inconsistent
is a one-line :class:`InputError` naming the tensor.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpulab.core.errors import InputError
from gpulab.vajra.config import json_object

FP8_NAMES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOAT_NAMES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SCALE_NAMES = (*FLOAT_NAMES, "F64")  # scales are read as fp32 whatever float they are stored as


class CheckpointReader:
    """Name -> tensor access over one or more memory-mapped safetensors files."""

    def __init__(self, model_dir: Path | str):
        from safetensors import safe_open  # noqa: F401  (fail early if missing)

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise InputError(f"{index}: malformed index (expected a JSON object with a 'weight_map')") from None
            for name, fname in wm.items():
                p = self.dir / str(fname)
                if not p.is_file():
                    raise InputError(f"{index}: shard {fname!r} (holding {name!r}) is missing")
                self.where[name] = p
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise InputError(f"{self.dir}: no *.safetensors files (and no model.safetensors.index.json)")
            for p in files:
                for name in self._open(p).keys():
                    if name in self.where:  # which one is meant? (a stale shard left beside the new ones)
                        raise InputError(f"{self.dir}: tensor {name!r} is in both {self.where[name].name} and {p.name} "
                                         "(and there is no model.safetensors.index.json to say which is meant)")
                    self.where[name] = p

    def _open(self, p: Path):
        from safetensors import safe_open

        h = self._handles.get(p)
        if h is None:
            try:
                h = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError, OSError
                raise InputError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            self._handles[p] = h
        return h

    def names(self) -> list[str]:
        return list(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def _slice(self, name: str):
        if name not in self.where:
            raise InputError(f"{self.dir}: tensor {name!r} is missing")
        f = self._open(self.where[name])
        try:
            return f.get_slice(name)
        except InputError:
            raise
        except Exception as e:  # e.g. an index that names a shard without the tensor
            raise InputError(f"{self.where[name].name}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return str(self._slice(name).get_dtype())

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read from the memory map and moved to ``device`` (one host copy at a time)."""
        if name not in self.where:
            raise InputError(f"{self.dir}: tensor {name!r} is missing")
        try:
            t = self._open(self.where[name]).get_tensor(name)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{self.where[name].name}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None
        return t.to(device, non_blocking=False) if str(device) != "cpu" else t


@dataclass
class QuantScheme:
    method: str  # "compressed-tensors" | "fp8"
    strategy: str | None  # "tensor" | "channel" | "block" | None (infer from the scale's shape)
    block: tuple[int, int] | None = None
    act: str | None = None  # "dynamic" | "static" | None (weight-only)
    ignore: list[str] = field(default_factory=list)
    scale_name: str = "weight_scale"

    def is_ignored(self, module: str) -> bool:
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module):
                    return True
            elif module == pat or module.endswith("." + pat):
                return True
        return False


def _bits(d: dict[str, Any], what: str, where: str) -> int:
    v = d.get("num_bits", 0)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError(f"{where}: {what}.num_bits must be an integer, got {v!r}")
    return v


def _ignore_list(v: Any, key: str, where: str) -> list[str]:
    """The modules left unquantized: names, or ``re:`` patterns (checked to compile here, once)."""
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise InputError(f"{where}: {key} must be a list of module names or 're:' patterns, got {v!r}"[:300])
    for e in v:
        if e.startswith("re:"):
            try:
                re.compile(e[3:])
            except re.error as err:
                raise InputError(f"{where}: {key} entry {e!r} is not a valid regular expression ({err})") from None
    return list(v)


def parse_quant_config(qc: dict[str, Any] | None, where: str = "config.json") -> QuantScheme | None:
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise InputError(f"{where}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        # naive-quantized: what older llm-compressor wrote for FP8 (e.g. neuralmagic's Llama-3.1-8B-Instruct-FP8);
        # the same tensors as float-quantized (vLLM and transformers read both); the group checks refuse int weights
        if fmt not in ("float-quantized", "naive-quantized"):
            raise InputError(f"{where}: compressed-tensors format {fmt!r} is not supported (only FP8: "
                             "'float-quantized' or 'naive-quantized')")
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise InputError(f"{where}: compressed-tensors config has no config_groups")
        schemes = []
        for gname, g in groups.items():
            g = json_object(g, f"config group {gname!r}", where)
            w = json_object(g.get("weights"), f"config group {gname!r}: weights", where)
            if w.get("type") != "float" or _bits(w, f"config_groups.{gname}.weights", where) != 8:
                raise InputError(f"{where}: config group {gname!r}: weights must be 8-bit float, got "
                                 f"{w.get('num_bits')}-bit {w.get('type')!r}")
            if w.get("symmetric", True) is False:
                raise InputError(f"{where}: config group {gname!r}: asymmetric FP8 weights are not supported")
            strat = w.get("strategy")
            if strat not in ("tensor", "channel", "block"):
                raise InputError(f"{where}: config group {gname!r}: weight strategy {strat!r} is not supported "
                                 "(tensor, channel, block)")
            block = None
            if strat == "block":
                bs = w.get("block_structure")
                if isinstance(bs, str):  # older "128x128"
                    try:
                        bs = [int(v) for v in bs.lower().split("x")]
                    except ValueError:
                        pass  # refused just below, with the value
                if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs)):
                    raise InputError(f"{where}: config group {gname!r}: block strategy needs block_structure [n, k], got {bs!r}")
                block = (int(bs[0]), int(bs[1]))
            a = json_object(g.get("input_activations"), f"config group {gname!r}: input_activations", where)
            act = None
            if a:
                if a.get("type") != "float" or _bits(a, f"config_groups.{gname}.input_activations", where) != 8:
                    raise InputError(f"{where}: config group {gname!r}: input activations must be 8-bit float")
                if a.get("dynamic"):
                    if a.get("strategy", "token") not in ("token", "tensor", "group"):
                        raise InputError(f"{where}: config group {gname!r}: activation strategy {a.get('strategy')!r} is not supported")
                    act = "dynamic"
                else:
                    if a.get("strategy", "tensor") != "tensor":
                        raise InputError(f"{where}: config group {gname!r}: static activations must be per tensor")
                    act = "static"
            targets = g.get("targets", ["Linear"])
            if not isinstance(targets, list):
                raise InputError(f"{where}: config group {gname!r}: targets must be a list, got {targets!r}")
            if not any(t == "Linear" or "proj" in str(t) for t in targets):
                raise InputError(f"{where}: config group {gname!r}: targets {targets!r} name no Linear layers")
            schemes.append((strat, block, act))
        if len(set(schemes)) != 1:
            raise InputError(f"{where}: {len(set(schemes))} different config groups; vajra supports one scheme per checkpoint")
        strat, block, act = schemes[0]
        if strat == "block" and act == "static":
            raise InputError(f"{where}: block-wise weights with static activation scales are not supported "
                             "(vLLM refuses them too: block-wise FP8 takes dynamic activations)")
        ignore = _ignore_list(qc.get("ignore"), "ignore", where)
        return QuantScheme("compressed-tensors", strat, block, act, ignore)
    if method == "fp8":
        act = qc.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise InputError(f"{where}: fp8 activation_scheme {act!r} is not supported (dynamic, static)")
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise InputError(f"{where}: fp8 fmt {fmt!r} is not supported (e4m3)")
        wbs = qc.get("weight_block_size")
        key = "ignored_layers" if qc.get("ignored_layers") else "modules_to_not_convert"
        ignore = _ignore_list(qc.get(key), key, where)
        if wbs is not None:
            if not (isinstance(wbs, (list, tuple)) and len(wbs) == 2 and all(isinstance(v, int) and v > 0 for v in wbs)):
                raise InputError(f"{where}: weight_block_size must be [n, k], got {wbs!r}")
            if act == "static":
                raise InputError(f"{where}: weight_block_size with activation_scheme 'static' is not supported "
                                 "(vLLM refuses it too: block-wise FP8 takes dynamic activations)")
            return QuantScheme("fp8", "block", (int(wbs[0]), int(wbs[1])), act, ignore, scale_name="weight_scale_inv")
        return QuantScheme("fp8", None, None, act, ignore)
    raise InputError(f"{where}: quant_method {method!r} is not supported (compressed-tensors, fp8)")


@dataclass
class QuantWeight:
    """An FP8 weight [N, K] with its dequantization scale (real = q * scale)."""

    q: torch.Tensor
    scale: torch.Tensor  # fp32: [] tensor, [N] channel, [ceil(N/bn), ceil(K/bk)] block
    strategy: str
    block: tuple[int, int] | None = None
    act: str | None = None
    input_scale: torch.Tensor | None = None  # fp32 [] (static activations)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def _check_scale_dtype(reader: CheckpointReader, name: str) -> None:
    """A weight or input scale stored as an integer (or FP8) type: a one-line error naming the tensor."""
    if (dt := reader.dtype_name(name)) not in SCALE_NAMES:
        raise InputError(f"tensor {name!r}: scales must be floating point ({', '.join(SCALE_NAMES)}), got {dt}")


def read_linear(reader: CheckpointReader, module: str, scheme: QuantScheme | None, device, dense_dtype: torch.dtype):
    """Read ``module.weight`` (+ scales) -> a dense tensor in ``dense_dtype`` or a :class:`QuantWeight`."""
    wname = f"{module}.weight"
    shape = reader.shape(wname)
    if len(shape) != 2:
        raise InputError(f"tensor {wname!r}: expected 2 dims, got shape {list(shape)}")
    dt = reader.dtype_name(wname)
    quantized = scheme is not None and not scheme.is_ignored(module)
    if dt in FLOAT_NAMES:
        if quantized:
            raise InputError(f"tensor {wname!r} is {dt}, but quantization_config ({scheme.method}) says it is FP8 "
                             "(add it to the ignore list if it is meant to stay unquantized)")
        return reader.get(wname, device).to(dense_dtype)
    if dt not in FP8_NAMES:
        raise InputError(f"tensor {wname!r}: unsupported dtype {dt}")
    if scheme is None:
        raise InputError(f"tensor {wname!r} is {dt}, but config.json has no quantization_config")
    if FP8_NAMES[dt] != torch.float8_e4m3fn:
        raise InputError(f"tensor {wname!r}: FP8 weights must be e4m3 (F8_E4M3), got {dt}")
    sname = f"{module}.{scheme.scale_name}"
    if not reader.has(sname):
        alt = f"{module}.weight_scale_inv" if scheme.scale_name == "weight_scale" else f"{module}.weight_scale"
        hint = f" (found {alt.rsplit('.', 1)[1]!r}, which this format does not use)" if reader.has(alt) else ""
        raise InputError(f"tensor {wname!r} is FP8 but its scale {sname!r} is missing{hint}")
    n, k = shape
    sshape = reader.shape(sname)
    numel = math.prod(sshape) if sshape else 1
    strategy, block = scheme.strategy, scheme.block
    if strategy is None:  # vLLM fp8 without blocks: infer from the scale's shape
        strategy = "tensor" if numel == 1 else "channel"
    if strategy == "tensor":
        ok = numel == 1
        want = "[] or [1]"
    elif strategy == "channel":
        ok = tuple(sshape) in ((n,), (n, 1))
        want = f"[{n}, 1] or [{n}]"
    else:
        assert block is not None
        want_shape = (math.ceil(n / block[0]), math.ceil(k / block[1]))
        ok = tuple(sshape) == want_shape
        want = str(list(want_shape))
    if not ok:
        raise InputError(f"tensor {sname!r}: shape {list(sshape)} does not fit {strategy} scales for weight "
                         f"[{n}, {k}] (expected {want})")
    _check_scale_dtype(reader, sname)
    scale = reader.get(sname, device).float()
    scale = scale.reshape(()) if strategy == "tensor" else scale.reshape(n) if strategy == "channel" else scale
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise InputError(f"tensor {sname!r}: scales must be finite and > 0")
    input_scale = None
    if scheme.act == "static":
        iname = f"{module}.input_scale"
        if not reader.has(iname):
            raise InputError(f"tensor {iname!r} is missing (static activation scales were declared)")
        if math.prod(reader.shape(iname) or (1,)) != 1:
            raise InputError(f"tensor {iname!r}: expected one per-tensor scale, got shape {list(reader.shape(iname))}")
        _check_scale_dtype(reader, iname)
        input_scale = reader.get(iname, device).float().reshape(())
        if not (bool(torch.isfinite(input_scale)) and float(input_scale) > 0):  # 0 would turn x / 0 into NaN
            raise InputError(f"tensor {iname!r}: the input scale must be finite and > 0, got {float(input_scale)}")
    q = reader.get(wname, device)
    return QuantWeight(q, scale, strategy, block, scheme.act, input_scale)
