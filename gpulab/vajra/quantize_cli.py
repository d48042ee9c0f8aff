"""``gpulab quantize SRC DST --scheme fp8-tensor|fp8-channel|fp8-block``: write an FP8 checkpoint.

Reads a bf16/fp16/fp32 Llama-family Hugging Face folder tensor by tensor, quantizes every decoder
linear weight (q/k/v/o, gate/up/down; ``lm_head`` and embeddings stay as they are) and writes a
compressed-tensors ``float-quantized`` checkpoint (or vLLM's ``fp8`` layout with ``--format fp8``)
into a temporary folder that is renamed to DST at the end. Static activation scales come from a
calibration pass of the unquantized model over ``--calib-text`` (tokenized with SRC's
tokenizer.json). Writes a result record with the per-tensor round-trip error.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import typer

from gpulab.core.errors import InputError
from gpulab.core.files import blocking_file

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Write a compressed-tensors FP8 checkpoint from a bf16/fp16 one.")

SCHEMES = {"fp8-tensor": "tensor", "fp8-channel": "channel", "fp8-block": "block"}
LINEAR_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
E4M3_REL_STEP = 2.0 ** -4  # half an ulp of a 3-bit mantissa, relative
E4M3_SUBNORMAL_HALF = 2.0 ** -10  # half the subnormal spacing (2^-9), in units of the scale


def parse_block(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise InputError(f"--block must look like 128x128, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def quant_config(fmt: str, strategy: str, block, activations: str, ignore: list[str]) -> dict:
    if fmt == "fp8":
        qc = {"quant_method": "fp8", "fmt": "e4m3",
              "activation_scheme": "static" if activations == "static" else "dynamic",
              "ignored_layers": ignore}
        if strategy == "block":
            qc["weight_block_size"] = list(block)
        return qc
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
               "block_structure": list(block) if block else None, "group_size": None, "observer": "minmax"}
    acts = None
    if activations == "dynamic" and strategy == "block":  # as compressed-tensors' FP8_BLOCK preset (and vLLM, which
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",  # quantizes 1 x block_k)
                "group_size": int(block[1]), "dynamic": True}
    elif activations == "dynamic":
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    elif activations == "static":
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}},
            "ignore": ignore, "kv_cache_scheme": None}


def calibrate(src: Path, text_file: Path, samples: int, seq_len: int, device: str) -> dict[str, float]:
    """amax of every linear's input over the calibration text -> {checkpoint module name: amax}."""
    import torch

    from gpulab.vajra.interface import ForwardBatch
    from gpulab.vajra.load import load_model

    tok_file = src / "tokenizer.json"
    if not tok_file.is_file():
        raise InputError(f"{src}: static activation scales need SRC's tokenizer.json to tokenize --calib-text")
    from gpulab.core.files import read_utf8_text

    text = read_utf8_text(text_file, f"--calib-text {text_file}")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise InputError(f"{tok_file}: not a readable tokenizer ({str(e).splitlines()[0]})") from None
    ids = tok.encode(text).ids
    if len(ids) < 2:
        raise InputError(f"--calib-text {text_file}: fewer than 2 tokens")
    # auto: triton on a GPU where its kernels take the head_dim (not flashinfer, whose prefill module is a ~75 s
    # JIT build for one pass), else the torch reference
    model = load_model(src, device=device, attention_backend="auto")
    seq_len = min(seq_len, len(ids), model.info.max_model_len)
    amax: dict[str, float] = {}

    def obs(name):
        def f(x):
            amax[name] = max(amax.get(name, 0.0), float(x.detach().abs().amax()))
        return f

    for name, lin in model.linears().items():
        lin.observer = obs(name)
    bs = 16
    nblk = (seq_len + bs - 1) // bs
    kv = model.allocate_kv_cache(nblk, bs)
    dev = model.device
    for s in range(min(samples, max(1, len(ids) // seq_len))):
        chunk = torch.tensor(ids[s * seq_len:(s + 1) * seq_len], device=dev)
        n = chunk.numel()
        batch = ForwardBatch(input_ids=chunk, positions=torch.arange(n, device=dev),
                             query_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                             context_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                             slot_mapping=torch.arange(n, device=dev),
                             block_tables=torch.arange(nblk, dtype=torch.int32, device=dev)[None])
        with torch.inference_mode():
            model.forward(batch, kv)
    out = {}
    for name, a in amax.items():
        if name.endswith("qkv_proj"):
            for s in ("q_proj", "k_proj", "v_proj"):
                out[name.replace("qkv_proj", s)] = a
        elif name.endswith("gate_up_proj"):
            for s in ("gate_proj", "up_proj"):
                out[name.replace("gate_up_proj", s)] = a
        else:
            out[name] = a
    return out


@app.command()
def quantize(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="A bf16/fp16/fp32 Hugging Face Llama-family folder."),
    dst: Path = typer.Argument(..., help="Output folder (must not exist unless --overwrite)."),
    scheme: str = typer.Option(..., "--scheme", help="fp8-tensor | fp8-channel | fp8-block"),
    activations: str = typer.Option("dynamic", "--activations", help="dynamic (per token) | static (per tensor, calibrated) | none"),
    block: str = typer.Option("128x128", "--block", help="Block shape (out x in) for fp8-block."),
    fmt: str = typer.Option("compressed-tensors", "--format", help="compressed-tensors | fp8 (vLLM's layout)"),
    scale_shape: str = typer.Option("2d", "--scale-shape", help="Per-channel scales of shape (out, 1) (2d, what "
                                    "vLLM and transformers load) or (out,) (1d: only gpulab's loader reads it; for "
                                    "testing loaders)."),
    calib_text: Optional[Path] = typer.Option(None, "--calib-text", help="Text for static activation scales."),
    calib_samples: int = typer.Option(16, "--calib-samples", help="Calibration sequences."),
    calib_len: int = typer.Option(256, "--calib-len", help="Tokens per calibration sequence."),
    shard_mb: int = typer.Option(4096, "--shard-mb", help="Largest output shard in MiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    """Quantize SRC's decoder linear weights to FP8 and write DST."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    if scheme not in SCHEMES:
        raise InputError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if activations not in ("dynamic", "static", "none"):
        raise InputError(f"--activations must be dynamic, static or none, got {activations!r}")
    if fmt not in ("compressed-tensors", "fp8"):
        raise InputError(f"--format must be compressed-tensors or fp8, got {fmt!r}")
    if scale_shape not in ("2d", "1d"):
        raise InputError(f"--scale-shape must be 2d or 1d, got {scale_shape!r}")
    if fmt == "fp8" and activations == "none":
        raise InputError("--format fp8 always quantizes activations; use --activations dynamic or static")
    if fmt == "fp8" and scheme == "fp8-channel":  # vLLM reads one scale per shard or block scales in that layout
        raise InputError("vLLM's fp8 layout has per-tensor or block weight scales; use --format compressed-tensors "
                         "for --scheme fp8-channel")
    if shard_mb <= 0 or calib_samples <= 0 or calib_len <= 0:
        raise InputError("--shard-mb, --calib-samples and --calib-len must be > 0")
    if scheme == "fp8-block" and activations == "static":  # vLLM refuses the pair (block-wise: dynamic only)
        raise InputError("--scheme fp8-block takes --activations dynamic (per token, per block of K) or none: "
                         "block-wise FP8 with static activation scales is not a format vLLM reads")
    if activations == "static" and calib_text is None:
        raise InputError("--activations static needs --calib-text FILE for calibration")
    from gpulab.core.clickcompat import refuse_unused

    # options of another scheme or of static activations would be ignored: say so instead
    refuse_unused(ctx, {"block": "--block"}, scheme == "fp8-block", "--scheme fp8-block")
    refuse_unused(ctx, {"scale_shape": "--scale-shape"}, scheme == "fp8-channel", "--scheme fp8-channel")
    refuse_unused(ctx, {"calib_text": "--calib-text", "calib_samples": "--calib-samples", "calib_len": "--calib-len"},
                  activations == "static", "--activations static")
    strategy = SCHEMES[scheme]
    blk = parse_block(block) if strategy == "block" else None
    if dst.exists() and not overwrite:
        raise InputError(f"{dst} exists (pass --overwrite to replace it)")
    if src.resolve() == dst.resolve():
        raise InputError("SRC and DST are the same folder")
    if src.resolve().is_relative_to(dst.resolve()):  # --overwrite would delete the source with the folder
        raise InputError(f"DST {dst} holds SRC {src}; choose a new folder for the checkpoint")
    if (above := blocking_file(dst)) is not None:  # refused before the work, not an OSError when DST is created
        raise InputError(f"DST {dst}: {above} is not a folder")
    if overwrite and dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "config.json").is_file())):
        raise InputError(f"DST {dst} holds files that are not a model folder; --overwrite replaces only a model "
                         "folder (choose a new or empty folder)")
    run(src, dst, strategy, blk, activations, fmt, scale_shape, calib_text, calib_samples, calib_len, shard_mb)


FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def shared_tensor_scales(reader, device) -> dict[str, "torch.Tensor"]:
    """module -> the per-tensor scale its fused group shares: max(amax of the group's weights) / 448."""
    import torch

    from gpulab.vajra import reference as ref

    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m.group(1)) for n in reader.names() if (m := LINEAR_RE.match(n))})
    for i in layers:
        for block, parts in FUSED_GROUPS:
            mods = [f"model.layers.{i}.{block}.{p}" for p in parts if reader.has(f"model.layers.{i}.{block}.{p}.weight")]
            if len(mods) < 2:
                continue
            amax = max(float(reader.get(f"{m}.weight", device).float().abs().amax()) for m in mods)
            s = torch.clamp(ref.true_div(torch.tensor(amax, device=device), ref.fp8_max()), min=ref._min_scale(
                torch.float8_e4m3fn)).reshape(())
            out.update({m: s for m in mods})
    return out


def block_misfits(reader, blk) -> list[str]:
    """Linear weights whose rows or columns are not whole blocks (vLLM refuses fused layers of such parts)."""
    bn, bk = blk
    return [n for n in reader.names() if LINEAR_RE.match(n)
            and (reader.shape(n)[0] % bn or reader.shape(n)[1] % bk)]


def run(src: Path, dst: Path, strategy: str, blk, activations: str, fmt: str, scale_shape: str,
        calib_text: Path | None, calib_samples: int, calib_len: int, shard_mb: int):
    import torch
    from safetensors.torch import save_file

    from gpulab.core import atomic, options, results
    from gpulab.vajra import reference as ref
    from gpulab.vajra.checkpoint import FLOAT_NAMES, CheckpointReader
    from gpulab.vajra.config import read_config
    from gpulab.vajra.linear import quantize as quantize_t

    cfg = read_config(src)
    if cfg.quantization_config:
        qc = cfg.quantization_config
        method = qc.get('quant_method') if isinstance(qc, dict) else qc
        raise InputError(f"{src}: already quantized ({method!r}); give a bf16/fp16 checkpoint")
    reader = CheckpointReader(src)
    for name in reader.names():  # a malformed weight: one line naming it, before any work (not an IndexError)
        if LINEAR_RE.match(name) and (len(shape := reader.shape(name)) != 2 or 0 in shape):
            raise InputError(f"tensor {name!r}: expected a 2-D weight, got shape {list(shape)}")
    device = options.resolve_device(what="gpulab quantize")
    amax = calibrate(src, calib_text, calib_samples, calib_len, device) if activations == "static" else {}
    ignore = ["lm_head"]
    rec = results.Record(name="vajra-quantize", config={
        "src": str(src), "dst": str(dst), "strategy": strategy, "block": list(blk) if blk else None,
        "activations": activations, "format": fmt, "scale_shape": scale_shape, "device": device})
    if scale_shape == "1d" and strategy == "channel":
        rec.notes.append("--scale-shape 1d: per-channel scales of shape (out,), which gpulab's loader reads and vLLM "
                         "and transformers refuse (they expect (out, 1)): a checkpoint for testing loaders")
    # per tensor: the shards that one fused layer will run (q/k/v, gate/up) share one scale, the largest, so that
    # vLLM serves them without requantizing and transformers (which keeps each scale) computes the same weights
    group_scale = shared_tensor_scales(reader, device) if strategy == "tensor" else {}
    if strategy == "block":
        ragged = block_misfits(reader, blk)
        if ragged:
            rec.notes.append(f"fp8-block {blk[0]}x{blk[1]}: {ragged[0]} (and {len(ragged) - 1} more) is not a "
                             "whole number of blocks: gpulab and transformers load this checkpoint, vLLM refuses "
                             "fused layers whose parts are not multiples of block_n and K not a multiple of block_k")
    with atomic.build_folder(dst) as tmp:
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, shards, weight_map = 0, [], {}
        limit = shard_mb << 20
        n_quant, bytes_in, bytes_out, worst = 0, 0, 0, 0.0
        bad: list[str] = []

        def flush():
            nonlocal shard, shard_bytes
            if not shard:
                return
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            for k in shard:
                weight_map[k] = name
            shard, shard_bytes = {}, 0

        def add(name: str, t: torch.Tensor):
            nonlocal shard_bytes, bytes_out
            t = t.detach().to("cpu").contiguous()
            nb = t.numel() * t.element_size()
            if shard and shard_bytes + nb > limit:
                flush()
            shard[name] = t
            shard_bytes += nb
            bytes_out += nb

        for name in reader.names():
            dt = reader.dtype_name(name)
            if dt not in FLOAT_NAMES and LINEAR_RE.match(name):
                raise InputError(f"tensor {name!r}: expected a bf16/fp16/fp32 weight, got {dt}")
            w = reader.get(name, device)
            bytes_in += w.numel() * w.element_size()
            if not LINEAR_RE.match(name):
                add(name, w)
                continue
            module = name[: -len(".weight")]
            wf = w.float()
            if not bool(torch.isfinite(wf).all()):  # its scale would be NaN/inf (and NaN passes the error check)
                raise InputError(f"tensor {name!r}: holds NaN or infinite values, which FP8 with a finite scale "
                                 "cannot represent (a corrupt source?)")
            if module in group_scale:  # the fused layer's shared per-tensor scale (a tensor of its own on disk)
                s = group_scale[module].clone()
                q = ref.cast_fp8(wf, s)
            else:
                q, s = quantize_t(wf, strategy, blk)
            deq = ref.dequantize(q, s, blk)
            sfull = ref.scale_for(s, tuple(wf.shape), blk)
            bound = wf.abs() * E4M3_REL_STEP + sfull * E4M3_SUBNORMAL_HALF
            err = (deq - wf).abs()
            if bool((err > bound * (1 + 1e-6)).any()):
                bad.append(name)
            worst = max(worst, float((err / (wf.abs().amax() + 1e-30)).amax()))
            del wf, deq, sfull, bound, err
            n_quant += 1
            add(name, q)
            if strategy == "tensor":
                s = s.reshape(1)
            elif strategy == "channel":
                s = s.reshape(-1, 1) if scale_shape == "2d" else s.reshape(-1)
            add(f"{module}.weight_scale_inv" if (fmt == "fp8" and strategy == "block") else f"{module}.weight_scale",
                s.float())
            if activations == "static":
                a = amax.get(module)
                if a is None:
                    raise InputError(f"calibration saw no input for {module!r}")
                add(f"{module}.input_scale", torch.tensor([max(a, 1e-12) / ref.fp8_max()], dtype=torch.float32))
            del w
        flush()
        if n_quant == 0:
            raise InputError(f"{src}: no decoder linear weights (model.layers.N.*_proj.weight) to quantize")
        raw = dict(cfg.raw)
        raw["quantization_config"] = quant_config(fmt, strategy, blk, activations, ignore)
        results.atomic_write_text(tmp / "config.json", json.dumps(raw, indent=2) + "\n")
        results.atomic_write_text(tmp / "model.safetensors.index.json", json.dumps(
            {"metadata": {"total_size": bytes_out}, "weight_map": weight_map}, indent=2) + "\n")
        for f in src.iterdir():  # tokenizer and generation files; never another copy of the weights
            if (f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
                    and f.name not in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")):
                shutil.copy2(f, tmp / f.name)
    rec.metrics.update({"tensors_quantized": n_quant, "shards": len(shards), "bytes_in": bytes_in,
                        "bytes_out": bytes_out, "max_abs_err_over_amax": worst})
    rec.summary.update({"compression": round(bytes_in / max(bytes_out, 1), 3), "tensors": n_quant})
    rec.check("round-trip error within half an fp8 step", not bad, bad[:5] if bad else None)
    rec.rows.append({"tensors": n_quant, "MiB in": round(bytes_in / 2**20, 2), "MiB out": round(bytes_out / 2**20, 2),
                     "max |err|/amax": f"{worst:.3g}"})
    rec.save()
    rec.print()
