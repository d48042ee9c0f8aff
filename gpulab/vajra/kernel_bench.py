"""Model-side benchmarks of vajra: per-GEMM times (bf16, W8A8 _scaled_mm, Triton W8A16, dequant+GEMM)
at Llama-3.1-8B shapes, a batch-1 decode step against the weight-streaming roofline, and the
attention backends. Run ``python -m gpulab.vajra.kernel_bench --out DIR [--size full|small]``.

GEMM rows: on a GPU each call (and each W8A16 tiling of the M = 1 sweep) is timed as CUDA-graph replays
of one call, each after an L2 flush, as in a decode step (device time: eager timing of the Python
wrappers, with their Triton launch and allocations, measured the host: ~0.145 ms for any W8A16 GEMM
on an H200 where 32 layers' decode step took 3.35 ms); where capture fails, eagerly (noted). The
``timed`` column says which (``graph`` | ``eager``; on the CPU always ``eager``).

Attention, decode only (rows ``gemm: attn decode``): the Triton split-KV decode kernel
(``triton-decode``, what the triton backend runs for a decode-only step), the general varlen
Triton kernel (``triton-varlen``, what decode ran on before) and flashinfer's decode wrapper, one
layer at Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, page 16), timed
as CUDA-graph replays (device time, no Python launch overhead). The decode-step rows time the whole
dummy FP8 8B model with each backend, eagerly and (triton) as a CUDA graph like the engine runs it.

On a machine without a GPU it runs the CPU baselines at a small size and reports the GPU
implementations as skipped (notes say why); under TRITON_INTERPRET=1 the attention rows run at a
tiny size as a functional check.
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
    ctx: typer.Context,
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
    gemms: bool = typer.Option(True, "--gemms/--no-gemms", help="Time the GEMMs."),
    attn_kernels: bool = typer.Option(True, "--attn-kernels/--no-attn-kernels",
                                      help="Time the decode attention kernels alone (one layer, several batch "
                                           "sizes and context lengths; runs first)."),
) -> None:
    """Benchmark vajra's kernels: FP8 GEMMs (W8A8/W8A16/bf16) at Llama-3.1-8B shapes, the decode attention
    kernels, and a batch-1 decode step against the weight-streaming roofline (CPU baselines without a GPU)."""
    from gpulab.core import options
    from gpulab.core.results import check_out

    if out is not None:  # this command's own --out: checked like the global one
        options.set_options(out=out)
    check_out()  # before any work: an --out that cannot take the result fails now

    import time

    import torch
    import torch.nn.functional as F

    from gpulab.core import ceilings, results
    from gpulab.core.errors import InputError, series
    from gpulab.vajra import reference as R
    from gpulab.vajra.linear import W8A16_MAX_M, scaled_mm, w8a8_unavailable

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
    if not budget_s >= 0:  # NaN too: no comparison with it holds, so it ran without a budget
        raise InputError(f"--budget-s must be a number of seconds >= 0 (0: none), got {budget_s}")
    backends = [b.strip() for b in attention.split(",") if b.strip()]
    if any(b not in ("triton", "flashinfer") for b in backends):
        raise InputError(f"--attention takes triton and/or flashinfer, got {attention!r}")
    # what this machine skips with a note: the attention kernels without a GPU or the interpreter, the decode step
    # without a GPU or at --size small; with the GEMMs off as well (or everything off), the record would measure
    # nothing
    attn_runs = attn_kernels
    if attn_kernels and dev != "cuda":  # (triton is imported where the attention kernels would import it)
        from gpulab.vajra.fp8_kernels import interpreted

        attn_runs = interpreted()
    decode_runs = decode and dev == "cuda" and size == "full"
    if not (gemms or attn_runs or decode_runs):
        why = [w for w, skipped in (("the decode attention kernels need a GPU (or TRITON_INTERPRET=1)", attn_kernels),
                                    ("the decode step needs a GPU and --size full", decode)) if skipped]
        off = [f for f, on in (("--no-gemms", gemms), ("--no-attn-kernels", attn_kernels), ("--no-decode", decode))
               if not on]
        raise InputError(f"{series(off, 'and')} leave{'s' if len(off) == 1 else ''} nothing to measure"
                         + (f" here: {'; '.join(why)}" if why else ""))
    from gpulab.core.clickcompat import refuse_unused

    # given for a part that is off, they would be ignored
    refuse_unused(ctx, {"tokens": "--tokens", **({"tilings": "--tilings"} if tilings else {})}, gemms, "--gemms")
    refuse_unused(ctx, {"attention": "--attention"}, attn_kernels or decode, "--attn-kernels or --decode")
    t_start = time.perf_counter()

    def left() -> float:
        return float("inf") if budget_s <= 0 else budget_s - (time.perf_counter() - t_start)

    skipped: list[str] = []
    gemm_shapes = GEMMS_8B if size == "full" else {k: (n // 16, kk // 16) for k, (n, kk) in GEMMS_8B.items()}
    rec = results.Record(name="vajra-kernels", config={"size": size, "tokens": ms, "reps": reps, "device": dev,
                                                       "gemms": gemms, "attn_kernels": attn_kernels,
                                                       "decode": decode, "attention": backends})
    cuda = dev == "cuda"
    act = torch.bfloat16 if cuda else torch.float32
    copy_gbs = ceilings.copy_bandwidth_gbs(dev) if cuda else None
    rec.metrics["copy_bandwidth_gbs"] = copy_gbs
    w8a8_why = w8a8_unavailable(torch.device("cuda"), rowwise=True) if cuda else None  # probed once
    if not cuda:
        rec.notes.append("no CUDA GPU: W8A8 (_scaled_mm), Triton W8A16 and dequant-jit skipped; CPU fp32 dense baseline only (timings on a shared CPU are noisy)")
    elif w8a8_why:
        rec.notes.append(f"W8A8 skipped: {w8a8_why}")
    else:
        from gpulab.vajra import linear as L

        rec.config["fp8_fast_accum"] = L.fast_accum_in_use(torch.device("cuda"))
    if attn_kernels:
        _attention_kernels(rec, dev, size, backends, reps, left)
    best_w8a16 = {}
    w8a16_m1 = []  # (weight bytes, ms) of the W8A16 rows at M=1, for the goal's fraction of the copy bandwidth
    w8a16_cast_m1 = []  # ... of the same GEMMs with Triton's e4m3 -> bf16 cast instead of the PTX recipe
    w8a8_large: dict[str, list[float]] = {}  # ms of the W8A8 rows at M > 64, with and without fast accumulation
    fast_accum = bool(rec.config.get("fp8_fast_accum"))
    for gname, (n, k) in (gemm_shapes.items() if gemms else ()):
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
                from gpulab.vajra.fp8_ptx import ptx_usable
                from gpulab.vajra.w8a16 import w8a16_matmul

                impls["w8a16"] = lambda: w8a16_matmul(x, q, s, "channel")
                if m == 1 and act == torch.bfloat16 and ptx_usable(x.device, "bf16"):  # the same with Triton's cast
                    impls["w8a16 triton-cast"] = lambda: w8a16_matmul(x, q, s, "channel", ptx=False)
                impls["dequant-jit"] = lambda: F.linear(x, K.dequantize(q, s, None, out_dtype=act))
                if not w8a8_why and n % 16 == 0 and k % 16 == 0:
                    def w8a8(fast=None):
                        xq, xs = K.quantize_rows(x)
                        return scaled_mm(xq, q.t(), xs[:, None], s[None, :], act, fast_accum=fast)
                    impls["w8a8"] = w8a8
                    if m > W8A16_MAX_M and fast_accum:  # where auto serves W8A8: the same, plain accumulation
                        impls["w8a8 fp32-accum"] = lambda: w8a8(False)
            for name, fn in impls.items():
                try:
                    got = fn().float()
                except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the other rows
                    rec.check(f"{gname} M={m} {name}", False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    continue
                ref = want if name != "dense" else x.float() @ w.t()
                err = float((got - ref).norm() / ref.norm())
                tol = 0.08 if name.startswith("w8a8") else 2e-2
                rec.check(f"{gname} M={m} {name}", err < tol, {"rel_err": round(err, 5)})
                # an L2 flush before each call: in a decode step no layer's weights are still in L2 (32 layers x
                # 218 MB), while one GEMM's weights (17-25 MB in FP8 for qkv and o) fit in an H100's 50 MB. On a
                # GPU the call is a CUDA-graph replay: eagerly, the wrappers' host work (Triton launch,
                # allocations) outlasts an M=1 kernel and the row would time the host
                t, how = _timed(rec, fn, dev, reps, f"{gname} M={m} {name}")
                wbytes = n * k * (1 if name != "dense" else wd.element_size())
                row = {"gemm": gname, "N x K": f"{n}x{k}", "M": m, "impl": name, "ms": round(t.median, 4),
                       "weight GB/s": round(wbytes / t.median / 1e6, 1), "timed": how}
                if name == "w8a16" and m == 1:
                    w8a16_m1.append((wbytes, t.median))
                if name == "w8a16 triton-cast":
                    w8a16_cast_m1.append((wbytes, t.median))
                if name.startswith("w8a8") and m > W8A16_MAX_M:
                    w8a8_large.setdefault(name, []).append(t.median)
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
                            tiled = lambda cfg=cfg: w8a16_matmul(x, q, s, "channel", config=cfg)  # noqa: E731
                            try:
                                tiled()  # a tiling that does not compile fails here
                            except Exception as e:  # noqa: BLE001
                                rec.notes.append(f"w8a16 {gname} {cfg}: {type(e).__name__}")
                                continue
                            tt, how = _timed(rec, tiled, dev, max(10, reps // 5), f"w8a16 {gname} {cfg}",
                                             warmup=3)
                            if best is None or tt.median < best[0]:
                                best = (tt.median, cfg, how)
                if best:
                    best_w8a16[gname] = {"ms": round(best[0], 4), "config": best[1],
                                         "weight_GBps": round(n * k / best[0] / 1e6, 1), "timed": best[2]}
        del w, q, wd
    if skipped:
        rec.notes.append(f"--budget-s {budget_s:g}: {', '.join(skipped)} skipped (out of time)")
    rec.metrics["w8a16_best_tiling_m1"] = best_w8a16
    if copy_gbs:
        if w8a16_m1:  # all four GEMMs' bytes over their time (not a mean of fractions: o and qkv are small)
            frac = sum(b for b, _ in w8a16_m1) / sum(ms for _, ms in w8a16_m1) / 1e6 / copy_gbs
            rec.summary["w8a16_m1_mean_fraction_of_copy"] = round(frac, 3)
            rec.metrics["goal_w8a16_ge_0.8_of_copy"] = bool(frac >= 0.8)
    fast, exact = w8a8_large.get("w8a8", []), w8a8_large.get("w8a8 fp32-accum", [])
    if fast and len(exact) == len(fast):  # > 1: fast accumulation (the default on a GPU) is faster
        rec.summary["w8a8_m_gt_64_fast_accum_speedup"] = round(sum(exact) / sum(fast), 3)
    if w8a16_cast_m1 and len(w8a16_cast_m1) == len(w8a16_m1):  # > 1: the PTX recipe (the default) is faster
        rec.summary["w8a16_m1_ptx_speedup_over_triton_cast"] = round(
            sum(ms for _, ms in w8a16_cast_m1) / sum(ms for _, ms in w8a16_m1), 3)
    if decode and cuda and size == "full":
        if left() < 20:  # loading the dummy 8B model and the Triton builds take ~15 s
            rec.notes.append(f"--budget-s {budget_s:g}: decode step skipped (out of time)")
        else:
            _decode_step(rec, copy_gbs, reps, backends)
    elif decode:
        rec.notes.append("decode-step roofline needs a GPU and --size full; skipped")
    rec.save()
    rec.print()


DECODE_CTX, DECODE_BATCHES, DECODE_PAGE = 512, (1, 32), 16


def decode_step_bytes(cfg: dict = LLAMA8B, ctx: int = DECODE_CTX, batch: int = max(DECODE_BATCHES)) -> int:
    """GPU memory the decode-step rows need: the dummy model (FP8 linears, bf16 embedding and lm_head), the KV
    cache of the largest batch, and 1.5 GiB for load-time temporaries and activations (~12 GiB at 8B: more
    than a 12 GB card has free)."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    linears = layers * (h * (q + 2 * kv) + q * h + 3 * h * i)
    head = vocab * h * 2 * (1 if cfg.get("tie_word_embeddings") else 2)
    blocks = batch * (ctx // DECODE_PAGE + 2)
    cache = blocks * 2 * DECODE_PAGE * kv * 2 * layers
    return linears + head + cache + (3 << 29)


def _decode_step(rec, copy_gbs, reps, wanted=("triton", "flashinfer")):
    import torch

    from gpulab.vajra.attention import flashinfer_available
    from gpulab.vajra.load import load_model

    need, free = decode_step_bytes(), torch.cuda.mem_get_info()[0]
    if free < need:  # a 12/16 GB card: keep the rows measured so far instead of dying in the load
        rec.notes.append(f"decode step skipped: the dummy FP8 8B model and its KV cache need about {need / 2**30:.1f} "
                         f"GiB, {free / 2**30:.1f} GiB of GPU memory is free")
        return

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
    ctx = DECODE_CTX
    for be in backends:
        from gpulab.vajra.attention import make_backend

        try:
            _decode_rows(rec, model, be, make_backend(be, device=model.device, num_heads=32, num_kv_heads=8,
                                                      head_dim=128, scale=128 ** -0.5, act_dtype=model.dtype),
                         wbytes, ctx, copy_gbs, reps)
        except Exception as e:  # noqa: BLE001 - keep the GEMM rows; say which backend failed
            rec.check(f"decode step attn={be} ran", False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


def decode_b1_goal_met(metrics: dict) -> bool:
    """Issue 6's batch-1 goal (<= 3.4 ms a graph step) on the fastest attention backend timed so far (each
    backend's step is ``decode_b1_<backend>_graph_ms``): the flag does not depend on the order of --attention."""
    steps = [v for k, v in metrics.items() if k.startswith("decode_b1_") and k.endswith("_graph_ms")]
    return bool(steps) and min(steps) <= 3.4


def _decode_rows(rec, model, be, backend, wbytes, ctx, copy_gbs, reps):
    import torch

    from gpulab.core import timing
    from gpulab.vajra.interface import ForwardBatch

    model.attention = backend
    label = "triton-decode" if be == "triton" else be  # the triton backend runs its split-KV decode kernel here
    kv_per_token = model.kv_bytes_per_block(1)
    for batch_size in DECODE_BATCHES:
        # what one step must read: every weight once, and each sequence's K/V of ctx + 1 positions (the new one
        # is written, then read); at B=32 (512-token context) the K/V is a fifth of it
        step_bytes = wbytes + batch_size * (ctx + 1) * kv_per_token
        kv = model.allocate_kv_cache(batch_size * (ctx // DECODE_PAGE + 2), DECODE_PAGE)
        bt = torch.arange(batch_size * (ctx // DECODE_PAGE + 2), dtype=torch.int32, device="cuda").view(batch_size, -1)
        slots = (bt[:, ctx // DECODE_PAGE].long() * DECODE_PAGE)
        b = ForwardBatch(torch.ones(batch_size, dtype=torch.long, device="cuda"),
                         torch.full((batch_size,), ctx, device="cuda"),
                         torch.ones(batch_size, dtype=torch.int32, device="cuda"),
                         torch.full((batch_size,), ctx + 1, dtype=torch.int32, device="cuda"),
                         slots, bt, is_decode_only=True)
        if be == "triton":
            q0 = torch.empty(batch_size, 1, 1, device="cuda")
            if not backend.uses_decode_kernel(q0, backend.begin(b, kv)):
                rec.check(f"decode step attn={be} B={batch_size} uses the decode kernel", False, "dispatch")
        with torch.inference_mode():
            t = timing.benchmark(lambda: model.forward(b, kv), device="cuda", warmup=3, reps=max(10, reps // 2))
        timings = {f"attn={label}": t.median}
        if getattr(backend, "graph_capturable", False):  # the engine runs decode steps as CUDA graphs
            try:
                with torch.inference_mode():
                    g = _graph_of(lambda: model.forward(b, kv))
                    tg = timing.benchmark(g.replay, device="cuda", warmup=2, reps=max(10, reps // 2))
                timings[f"attn={label}, graph"] = tg.median
                if batch_size == 1:
                    rec.metrics[f"decode_b1_{be}_graph_ms"] = round(tg.median, 4)
                    rec.metrics["goal_decode_b1_graph_le_3.4ms"] = decode_b1_goal_met(rec.metrics)
                del g
            except Exception as e:  # noqa: BLE001 - keep the eager row
                torch.cuda.synchronize()
                rec.notes.append(f"decode step attn={be} B={batch_size}: CUDA-graph capture failed "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if batch_size == 1 and model.fused_ops and getattr(backend, "graph_capturable", False):
            # the same step, as a CUDA graph, without the fused kernels
            _unfused_b1(rec, model, b, kv, label, timings, reps)
        for impl, ms in timings.items():  # "weight GB/s": the weights alone; "of copy": weights + K/V
            row = {"gemm": "decode step", "N x K": f"8B fp8, ctx {ctx}", "M": batch_size, "impl": impl,
                   "ms": round(ms, 4), "weight GB/s": round(wbytes / ms / 1e6, 1),
                   "step GB/s": round(step_bytes / ms / 1e6, 1)}
            if copy_gbs:
                row["of copy"] = round(step_bytes / ms / 1e6 / copy_gbs, 3)
            rec.rows.append(row)
        if copy_gbs and batch_size == 1:
            # the roofline of serve-bench's roofline_ms: weights + K/V read once at the copy bandwidth
            roof = step_bytes / (copy_gbs * 1e9) * 1e3
            rec.metrics[f"decode_b1_{be}_ms"] = round(t.median, 4)
            rec.metrics["decode_roofline_ms"] = round(roof, 4)
            rec.summary[f"decode_b1_{be}_eager_over_roofline"] = round(t.median / roof, 3)
            if f"decode_b1_{be}_graph_ms" in rec.metrics:
                graph_ms = rec.metrics[f"decode_b1_{be}_graph_ms"]
                rec.summary[f"decode_b1_{be}_graph_ms"] = graph_ms
                rec.summary[f"decode_b1_{be}_graph_over_roofline"] = round(graph_ms / roof, 3)
        del kv


def _unfused_b1(rec, model, b, kv, label, timings, reps):
    """Batch 1 with the unfused torch ops (RMSNorm, RoPE, SiLU) next to the fused kernels, as CUDA graphs, and
    the kernels each form launches per step (one profiled eager step)."""
    import torch

    from gpulab.core import timing

    step = lambda: model.forward(b, kv)  # noqa: E731
    fused = kernel_profile(step)
    rec.metrics[f"decode_b1_{label}_kernels_fused"] = fused and fused["kernels"]
    if fused:  # where the graph step's time goes: inside kernels (by kernel) or between them
        rec.metrics[f"decode_b1_{label}_kernel_us_fused"] = fused["kernel_us"]
        rec.metrics[f"decode_b1_{label}_top_kernels_fused"] = fused["top"]
        graph_ms = timings.get(f"attn={label}, graph")
        if graph_ms:
            rec.summary[f"decode_b1_{label}_in_kernels_frac"] = round(fused["kernel_us"] / 1e3 / graph_ms, 3)
    model.fused_ops = False
    try:
        unfused = kernel_profile(step)
        rec.metrics[f"decode_b1_{label}_kernels_unfused"] = unfused and unfused["kernels"]
        with torch.inference_mode():
            g = _graph_of(step)
            timings[f"attn={label}, graph, unfused"] = timing.benchmark(g.replay, device="cuda", warmup=2,
                                                                       reps=max(10, reps // 2)).median
        del g
    except Exception as e:  # noqa: BLE001 - keep the fused rows
        torch.cuda.synchronize()
        rec.notes.append(f"decode step attn={label} B=1 unfused: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        model.fused_ops = True


def kernel_profile(fn) -> dict | None:
    """The GPU kernels one eager call of ``fn`` launches (torch.profiler; memcpy/memset not counted), None
    where the profiler cannot say: see :func:`summarize_kernels`."""
    import torch

    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return summarize_kernels(prof.events())
    except Exception:  # noqa: BLE001 - no kineto, or a profiler already running (ncu)
        return None


def summarize_kernels(events, top: int = 8) -> dict:
    """Device kernels among profiler ``events`` -> {"kernels": launches, "kernel_us": their summed device time,
    "top": the ``top`` names by time, {name (80 chars): {"launches", "us"}}}. A kernel's device time does not
    depend on how it was launched, so kernel_us over a CUDA-graph step's time is the share of the step spent
    inside kernels; the rest is the gaps between them."""
    from torch.autograd import DeviceType

    by_name: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset")):
            by_name.setdefault(e.name[:80], []).append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return {"kernels": sum(len(v) for v in by_name.values()),
            "kernel_us": round(sum(sum(v) for v in by_name.values()), 1),
            "top": {name: {"launches": len(v), "us": round(sum(v), 1)} for name, v in ranked[:top]}}


def _timed(rec, fn, dev, reps, tag, *, warmup=5, graph_reps=None):
    """Time one call of ``fn`` -> (Timing, how). On a GPU: CUDA-graph replays of one call (``graph_reps``, default
    ``reps``), each after an L2 flush (device time; the replay's launch is all the host adds), or, where capture
    fails (noted in ``rec``), ``reps`` eager calls after the same flush (``eager``: the Python launch included).
    Elsewhere ``reps`` eager calls (``eager``)."""
    import torch

    from gpulab.core import timing

    if dev != "cuda":
        return timing.benchmark(fn, device=dev, warmup=warmup, reps=reps), "eager"
    try:
        g = _graph_of(fn)
        t = timing.benchmark(g.replay, device=dev, warmup=2, reps=graph_reps or reps, flush_l2=True)
        del g
        return t, "graph"
    except Exception as e:  # noqa: BLE001 - not capturable: eager (launch overhead included)
        torch.cuda.synchronize()
        rec.notes.append(f"{tag}: CUDA-graph capture failed ({type(e).__name__}), timed eagerly")
        return timing.benchmark(fn, device=dev, warmup=warmup, reps=reps, flush_l2=True), "eager"


def _graph_of(fn):
    """A CUDA graph of one call of ``fn`` (:func:`gpulab.core.timing.capture_graph`)."""
    from gpulab.core.timing import capture_graph

    return capture_graph(fn)[0]


# decode attention alone: (batch, context, block-table width in pages or None = just the context's pages).
# The wide table is what the engine's CUDA graphs pass (max_model_len / page columns: 8192 for Llama-3.1's
# 128k) while the sequences are short.
ATTN_CONFIGS_FULL = [(1, 2048, None), (1, 2048, 8192), (32, 2048, None), (256, 1024, None)]
ATTN_CONFIGS_SMALL = [(1, 16, None), (3, 24, 16)]


def _attention_kernels(rec, dev, size, wanted, reps, left):
    import torch

    from gpulab.vajra.fp8_kernels import interpreted

    cuda = dev == "cuda"
    if not cuda and not interpreted():
        rec.notes.append("attention decode kernels: Triton needs a GPU (or TRITON_INTERPRET=1 for a functional "
                         "run at a tiny size); skipped")
        return
    full = cuda and size == "full"
    hq, hkv, d, page = (32, 8, 128, 16) if full else (4, 2, 16, 4)
    scale = d ** -0.5
    act = torch.bfloat16 if cuda else torch.float32
    fi = None
    if "flashinfer" in wanted:
        from gpulab.vajra.attention import FlashInferAttention, flashinfer_available

        if cuda and flashinfer_available() and d in FlashInferAttention.HEAD_DIMS:
            fi = FlashInferAttention(hq, hkv, d, scale=scale, device=torch.device("cuda"), act_dtype=act)
        else:
            rec.notes.append("attention decode kernels: flashinfer not measured (needs a GPU and the package)")
    torch.manual_seed(0)
    results_us: dict = {}
    for b, ctx, width in (ATTN_CONFIGS_FULL if full else ATTN_CONFIGS_SMALL):
        if left() < (8 if cuda else 0):
            rec.notes.append(f"attention decode kernels: B={b} ctx={ctx} skipped (out of time)")
            continue
        key, times = _attention_config(rec, dev, b, ctx, width, (hq, hkv, d, page), act, wanted, fi, reps)
        results_us[key] = times
        if cuda:
            torch.cuda.empty_cache()
    rec.metrics["attn_decode_us"] = results_us  # one layer, microseconds
    for key, r in results_us.items():  # > 1: the Triton decode kernel is faster
        if "triton-decode" in r:
            for other in ("flashinfer", "triton-varlen"):
                if other in r:
                    ratio = round(r[other] / r["triton-decode"], 3)
                    rec.metrics[f"attn_{key}_{other}_over_triton_decode"] = ratio
                    if other == "flashinfer":
                        rec.summary[f"attn_{key}_flashinfer_over_triton_decode"] = ratio
            # what an FP8 cache buys the decode kernel (half the bytes: 2 at best)
            if r.get("triton-decode fp8") and r.get("triton-decode"):
                rec.summary[f"attn_{key}_fp8_kv_speedup"] = round(r["triton-decode"] / r["triton-decode fp8"], 3)


def _attention_config(rec, dev, b, ctx, width, shape, act, wanted, fi, reps):
    """One decode-attention configuration: check every implementation against the SDPA reference on a
    few sequences, time it (on a GPU: CUDA-graph replays of one call, each after an L2 flush), append its row.
    -> (key, {impl: us})."""
    import torch

    from gpulab.core import timing
    from gpulab.vajra import reference as R
    from gpulab.vajra.interface import ForwardBatch, KVCache
    from gpulab.vajra.paged_attention import (decode_num_splits, make_metadata, paged_attention,
                                              paged_decode_attention)

    cuda = dev == "cuda"
    hq, hkv, d, page = shape
    scale = d ** -0.5
    copy_gbs = rec.metrics.get("copy_bandwidth_gbs")
    need = -(-ctx // page)
    width = width or need
    nblocks = b * need + 1  # block 0: the null block the table is padded with
    cache = torch.randn(nblocks, 2, page, hkv, d, device=dev, dtype=act)
    bt = torch.zeros(b, width, dtype=torch.int32, device=dev)
    bt[:, :need] = (1 + torch.randperm(b * need, device=dev)).view(b, need).to(torch.int32)
    cl = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    ql = torch.ones(b, dtype=torch.int32, device=dev)
    q = torch.randn(b, hq, d, device=dev, dtype=act)
    meta = make_metadata(ql, cl, 1)
    cache8 = (cache.float() * 0.5).to(torch.float8_e4m3fn)  # stored = value / scale, scale = 2
    nchk = min(b, 4)
    want = R.paged_attention(q[:nchk].float(), cache, ql[:nchk], cl[:nchk], bt[:nchk], scale)
    want8 = R.paged_attention(q[:nchk].float(), cache8, ql[:nchk], cl[:nchk], bt[:nchk], scale, 2.0, 2.0)
    impls = {}
    if "triton" in wanted:
        impls["triton-decode"] = (lambda: paged_decode_attention(q, cache, bt, cl, scale), want, cache)
        impls["triton-varlen"] = (lambda: paged_attention(q, cache, bt, meta, scale), want, cache)
        impls["triton-decode fp8"] = (lambda: paged_decode_attention(q, cache8, bt, cl, scale, 2.0, 2.0),
                                      want8, cache8)
    if fi is not None:
        kvc = KVCache([cache], page, nblocks, cache.dtype)
        fb = ForwardBatch(torch.zeros(b, dtype=torch.long, device=dev), (cl - 1).long(), ql, cl,
                          torch.zeros(b, dtype=torch.long, device=dev), bt, is_decode_only=True)
        try:  # plan() on the host, outside the timed region; it also JIT-builds flashinfer's module on first use,
            state = fi.begin(fb, kvc)  # which fails where the GPU or the toolchain lacks it: keep the other rows
        except Exception as e:  # noqa: BLE001
            rec.check(f"attn decode flashinfer B={b} ctx={ctx} planned", False,
                      f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        else:
            impls["flashinfer"] = (lambda: state.run(q, cache), want, cache)
    wide = width != need
    key = f"b{b}_ctx{ctx}" + (f"_table{width}" if wide else "")
    times = {}
    for name, (fn, ref, c) in impls.items():
        tag = f"attn decode {name} B={b} ctx={ctx}" + (f" table={width}" if wide else "")
        try:
            got = fn()[:nchk].float()
            err = float((got - ref).abs().max())
            rec.check(tag, err < (3e-2 if cuda else 1e-4), {"max_abs_err": round(err, 6)})
            if cuda:  # one call per replay, after an L2 flush: at B=1 a layer's K/V (8 MB at 2k context) would
                # stay in L2 across back-to-back calls, which a decode step (32 layers) never sees
                t, how = _timed(rec, fn, dev, reps, tag, warmup=3, graph_reps=max(5, reps // 2))
                ms = t.median
            else:
                how = "interpreter"
                ms = timing.benchmark(fn, device=dev, warmup=0, reps=1).median
        except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the other rows
            rec.check(tag, False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        kv_bytes = b * ctx * hkv * d * 2 * c.element_size()
        row = {"gemm": "attn decode", "N x K": f"ctx {ctx}" + (f", table {width}" if wide else ""),
               "M": b, "impl": name, "ms": round(ms, 4), "KV GB/s": round(kv_bytes / ms / 1e6, 1), "timed": how}
        if copy_gbs:
            row["of copy"] = round(kv_bytes / ms / 1e6 / copy_gbs, 3)
        if name.startswith("triton-decode"):
            row["splits"] = decode_num_splits(b, hkv, width, page, q.device)
        rec.rows.append(row)
        times[name] = round(ms * 1e3, 2)
    return key, times


if __name__ == "__main__":
    app()
