"""Model-side benchmarks of vajra: per-GEMM times (bf16, W8A8 _scaled_mm, Triton W8A16, dequant+GEMM)
at Llama-3.1-8B shapes, a batch-1 decode step against the weight-streaming roofline, and the
attention backends. Run ``python -m gpulab.vajra.kernel_bench --out DIR [--size full|small]``.

On a machine without a GPU it runs the CPU baselines at a small size and reports the GPU
implementations as skipped (notes say why).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)

LLAMA8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, "eos_token_id": [128001, 128009]}
GEMMS_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@app.command()
def bench(
    out: Path = typer.Option(None, "--out", help="Folder for the result YAML (default: gpulab's global --out)."),
    size: str = typer.Option("auto", "--size", help="full (8B shapes) | small | auto (full on a GPU)"),
    tokens: str = typer.Option("1,16,64,512", "--tokens", help="Token counts M for the GEMMs."),
    reps: int = typer.Option(50, "--reps"),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Batch-1 decode step of a dummy FP8 8B model."),
    attention: str = typer.Option("triton,flashinfer", "--attention",
                                  help="Attention backends for the decode step (flashinfer only where installed)."),
    budget_s: float = typer.Option(0.0, "--budget-s", help="Wall-time budget in seconds (0: none): parts that "
                                   "would start past it are skipped (noted) and the result is still saved."),
    tilings: bool = typer.Option(True, "--tilings/--no-tilings", help="Sweep W8A16 tilings at M = 1."),
) -> None:
    import time

    import torch
    import torch.nn.functional as F

    from gpulab.core import ceilings, options, results, timing
    from gpulab.core.errors import InputError
    from gpulab.vajra import reference as R
    from gpulab.vajra.linear import fp8_tensor_cores

    if out is not None:
        options.set_options(out=out)
    dev = options.resolve_device(what="vajra kernel bench")
    if size == "auto":
        size = "full" if dev == "cuda" else "small"
    if size not in ("full", "small"):
        raise InputError(f"--size must be full, small or auto, got {size!r}")
    try:
        ms = [int(t) for t in tokens.split(",")]
        assert ms and all(m > 0 for m in ms)
    except (ValueError, AssertionError):
        raise InputError(f"--tokens must be positive integers separated by commas, got {tokens!r}") from None
    if reps <= 0:
        raise InputError(f"--reps must be > 0, got {reps}")
    backends = [b.strip() for b in attention.split(",") if b.strip()]
    if any(b not in ("triton", "flashinfer") for b in backends):
        raise InputError(f"--attention takes triton and/or flashinfer, got {attention!r}")
    t_start = time.perf_counter()

    def left() -> float:
        return float("inf") if budget_s <= 0 else budget_s - (time.perf_counter() - t_start)

    skipped: list[str] = []
    gemms = GEMMS_8B if size == "full" else {k: (n // 16, kk // 16) for k, (n, kk) in GEMMS_8B.items()}
    rec = results.Record(name="vajra-kernels", config={"size": size, "tokens": ms, "reps": reps, "device": dev})
    cuda = dev == "cuda"
    act = torch.bfloat16 if cuda else torch.float32
    copy_gbs = ceilings.copy_bandwidth_gbs(dev) if cuda else None
    rec.metrics["copy_bandwidth_gbs"] = copy_gbs
    if not cuda:
        rec.notes.append("no CUDA GPU: W8A8 (_scaled_mm), Triton W8A16 and dequant-jit skipped; CPU fp32 dense baseline only (timings on a shared CPU are noisy)")
    elif not fp8_tensor_cores(torch.device("cuda")):
        rec.notes.append("GPU compute capability < 8.9: W8A8 skipped (no FP8 tensor cores)")
    best_w8a16 = {}
    for gname, (n, k) in gemms.items():
        if left() < (25 if decode and cuda and size == "full" else 0):  # keep time for the decode step
            skipped.append(gname)
            continue
        w = torch.randn(n, k, device=dev) * 0.02
        q, s = R.quantize_rows(w)
        wd = w.to(act)
        reserve = 25 if decode and cuda and size == "full" else 0
        for m in ms:
            if left() < reserve:
                skipped.append(f"{gname} M={m}")
                continue
            x = torch.randn(m, k, device=dev).to(act)
            want = R.linear_w8a16(x.float(), q, s)
            impls = {"dense": lambda: F.linear(x, wd)}
            if cuda:
                from gpulab.vajra import fp8_kernels as K
                from gpulab.vajra.w8a16 import w8a16_matmul

                impls["w8a16"] = lambda: w8a16_matmul(x, q, s, "channel")
                impls["dequant-jit"] = lambda: F.linear(x, K.dequantize(q, s, None, out_dtype=act))
                if fp8_tensor_cores(torch.device("cuda")) and n % 16 == 0 and k % 16 == 0:
                    def w8a8():
                        xq, xs = K.quantize_rows(x)
                        return torch._scaled_mm(xq, q.t(), scale_a=xs[:, None], scale_b=s[None, :], out_dtype=act)
                    impls["w8a8"] = w8a8
            for name, fn in impls.items():
                try:
                    got = fn().float()
                except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the other rows
                    rec.check(f"{gname} M={m} {name}", False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    continue
                ref = want if name != "dense" else x.float() @ w.t()
                err = float((got - ref).norm() / ref.norm())
                tol = 0.08 if name == "w8a8" else 2e-2
                rec.check(f"{gname} M={m} {name}", err < tol, {"rel_err": round(err, 5)})
                t = timing.benchmark(fn, device=dev, warmup=5, reps=reps)
                wbytes = n * k * (1 if name != "dense" else wd.element_size())
                row = {"gemm": gname, "N x K": f"{n}x{k}", "M": m, "impl": name, "ms": round(t.median, 4),
                       "weight GB/s": round(wbytes / t.median / 1e6, 1)}
                if copy_gbs:
                    row["of copy"] = round(wbytes / t.median / 1e6 / copy_gbs, 3)
                rec.rows.append(row)
            if cuda and m == 1 and tilings and left() > 40:  # a small sweep of W8A16 tilings at decode
                from gpulab.vajra.w8a16 import w8a16_matmul

                best = None
                for bn in (32, 64, 128):
                    for split in (1, 2, 4):
                        for warps in (4,):
                            cfg = {"BN": bn, "SPLIT_K": split, "num_warps": warps}
                            try:
                                tt = timing.benchmark(lambda: w8a16_matmul(x, q, s, "channel", config=cfg),
                                                      device=dev, warmup=3, reps=max(10, reps // 5)).median
                            except Exception as e:  # a tiling that does not compile
                                rec.notes.append(f"w8a16 {gname} {cfg}: {type(e).__name__}")
                                continue
                            if best is None or tt < best[0]:
                                best = (tt, cfg)
                if best:
                    best_w8a16[gname] = {"ms": round(best[0], 4), "config": best[1],
                                         "weight_GBps": round(n * k / best[0] / 1e6, 1)}
        del w, q, wd
    if skipped:
        rec.notes.append(f"--budget-s {budget_s:g}: {', '.join(skipped)} skipped (out of time)")
    rec.metrics["w8a16_best_tiling_m1"] = best_w8a16
    if copy_gbs:
        m1 = [r for r in rec.rows if r["M"] == 1 and r["impl"] == "w8a16"]
        if m1:
            frac = sum(r["of copy"] for r in m1) / len(m1)
            rec.summary["w8a16_m1_mean_fraction_of_copy"] = round(frac, 3)
            rec.metrics["goal_w8a16_ge_0.8_of_copy"] = bool(frac >= 0.8)
    if decode and cuda and size == "full":
        if left() < 20:  # loading the dummy 8B model and the Triton builds take ~15 s
            rec.notes.append(f"--budget-s {budget_s:g}: decode step skipped (out of time)")
        else:
            _decode_step(rec, copy_gbs, reps, backends)
    elif decode:
        rec.notes.append("decode-step roofline needs a GPU and --size full; skipped")
    rec.save()
    rec.print()


def _decode_step(rec, copy_gbs, reps, wanted=("triton", "flashinfer")):
    import torch

    from gpulab.vajra.attention import flashinfer_available
    from gpulab.vajra.load import load_model

    d = Path(tempfile.mkdtemp(prefix="vajra-8b-"))
    cfg = dict(LLAMA8B, quantization_config={"quant_method": "compressed-tensors", "format": "float-quantized",
               "config_groups": {"g": {"targets": ["Linear"],
                                       "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                       "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                             "dynamic": True}}}, "ignore": ["lm_head"]})
    (d / "config.json").write_text(json.dumps(cfg))
    backends = [b for b in wanted if b != "flashinfer" or flashinfer_available()]
    if "flashinfer" in wanted and "flashinfer" not in backends:
        rec.notes.append("flashinfer is not installed: the flashinfer attention backend was not measured")
    if not backends:
        return
    model = load_model(d, device="cuda", load_format="dummy", attention_backend="triton", max_model_len=4096)
    wbytes = model.weight_bytes() + model.embed.shape[1] * 2  # + one embedding row
    rec.metrics["decode_weight_bytes"] = wbytes
    ctx = 512
    for be in backends:
        from gpulab.vajra.attention import make_backend

        try:
            _decode_rows(rec, model, be, make_backend(be, device=model.device, num_heads=32, num_kv_heads=8,
                                                      head_dim=128, scale=128 ** -0.5, act_dtype=torch.bfloat16),
                         wbytes, ctx, copy_gbs, reps)
        except Exception as e:  # noqa: BLE001 - keep the GEMM rows; say which backend failed
            rec.check(f"decode step attn={be} ran", False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


def _decode_rows(rec, model, be, backend, wbytes, ctx, copy_gbs, reps):
    import torch

    from gpulab.core import timing
    from gpulab.vajra.interface import ForwardBatch

    model.attention = backend
    for batch_size in (1, 32):
        kv = model.allocate_kv_cache(batch_size * (ctx // 16 + 2), 16)
        bt = torch.arange(batch_size * (ctx // 16 + 2), dtype=torch.int32, device="cuda").view(batch_size, -1)
        slots = (bt[:, ctx // 16].long() * 16)
        b = ForwardBatch(torch.ones(batch_size, dtype=torch.long, device="cuda"),
                         torch.full((batch_size,), ctx, device="cuda"),
                         torch.ones(batch_size, dtype=torch.int32, device="cuda"),
                         torch.full((batch_size,), ctx + 1, dtype=torch.int32, device="cuda"),
                         slots, bt, is_decode_only=True)
        with torch.inference_mode():
            t = timing.benchmark(lambda: model.forward(b, kv), device="cuda", warmup=3, reps=max(10, reps // 2))
        row = {"gemm": "decode step", "N x K": f"8B fp8, ctx {ctx}", "M": batch_size, "impl": f"attn={be}",
               "ms": round(t.median, 4), "weight GB/s": round(wbytes / t.median / 1e6, 1)}
        if copy_gbs:
            row["of copy"] = round(wbytes / t.median / 1e6 / copy_gbs, 3)
            if batch_size == 1:
                roof = wbytes / (copy_gbs * 1e9) * 1e3
                rec.metrics[f"decode_b1_{be}_ms"] = round(t.median, 4)
                rec.metrics["decode_roofline_ms"] = round(roof, 4)
                rec.summary[f"decode_b1_{be}_over_roofline"] = round(t.median / roof, 3)
        rec.rows.append(row)
        del kv


if __name__ == "__main__":
    app()
