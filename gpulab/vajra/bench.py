"""``gpulab serve-bench``: the vajra engine under a synthetic serving load, FP8 against BF16, HF as the floor.

For each entry of ``--compare``, a weight precision (``fp8``: the config's compressed-tensors FP8 scheme,
added when the folder has none; ``bf16``: no quantization, weights in the activation dtype, which is fp32
on the CPU) with an optional KV-cache suffix (``fp8+kvfp8``: an FP8 KV cache for that entry, ``+kvauto``
the activation dtype; without one, ``--kv-cache-dtype``), the model is loaded (``--load-format dummy``: random weights of the real shapes), warmed up,
and served ``--num-prompts`` requests of ``--input-len`` random token ids (or a prompts file) with
``--output-len`` greedy tokens each (EOS ignored; with ``--prefix-len P`` every random prompt begins with
the same P tokens, and ``--enable-prefix-caching`` shows what sharing their K/V saves; the run reports the
share of the admitted requests' tokens found cached), arriving as a Poisson process of ``--request-rate``
(``inf``: all at once) with at most ``--max-concurrency`` in flight. Per request: TTFT, TPOT, ITL and
end-to-end latency from its arrival; per run: output tok/s and requests/s. Then one request alone
measures the batch-1 decode step against the HBM roofline (weight bytes + KV bytes read, over the
copy bandwidth measured in the same run). A naive transformers ``generate`` loop gives the floor.
Between the two, a check that the outputs do not depend on the prefill chunking (:func:`rechunk_check`:
exact greedy tokens in fp32; in bf16/fp16, whose rounding depends on the batch, the first output token's
logprobs of a few prompts, prefilled in other chunks, against a full-budget pass of the same prompts).
An entry that fails (a kernel error, out of memory, no room for its KV cache) becomes a failed check with its
error, and the others still run (not after the GPU context itself failed); when every entry fails on bad
input, that input's one-line error is raised; ``--debug`` raises at once.
"""
from __future__ import annotations

import copy
import gc
import heapq
import json
import math
import random
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from gpulab.core.errors import GpulabError, InputError

FP8_SCHEME = {  # what llm-compressor writes for FP8_DYNAMIC (Llama-3.1-8B-Instruct-FP8 and friends)
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True,
                              "dynamic": True},
    }},
    "ignore": ["lm_head"],
}
# HBM bandwidth from the vendors' data sheets (bytes/s), for the spec roofline next to the measured one; keyed by
# torch's device name without "NVIDIA " (whole names only)
SPEC_HBM = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
            "H200": 4.8e12, "H200 NVL": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12,
            "A100-SXM4-40GB": 1.555e12, "L40S": 0.864e12}


def spec_hbm(gpu_name: str) -> float | None:
    """The data-sheet HBM bandwidth (bytes/s) of a GPU by torch's name, e.g. 'NVIDIA H200'; None if not listed."""
    return SPEC_HBM.get(gpu_name.removeprefix("NVIDIA ").strip())


ROW_COLUMNS = ["impl", "act_dtype", "kv_cache", "cuda_graphs", "output_tok_s", "requests_s", "ttft_median_ms", "ttft_p99_ms",
               "tpot_median_ms", "itl_p99_ms", "e2e_median_ms", "decode_b1_ms", "roofline_ms", "roofline_frac"]


def pct(values: list[float], q: float) -> float:
    from gpulab.core.timing import quantile

    return quantile(sorted(values), q) if values else float("nan")


def stats(name: str, values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {f"{name}_mean_ms": float("nan"), f"{name}_median_ms": float("nan"), f"{name}_p99_ms": float("nan")}
    return {f"{name}_mean_ms": sum(values_ms) / len(values_ms), f"{name}_median_ms": pct(values_ms, 0.5),
            f"{name}_p99_ms": pct(values_ms, 0.99)}


def parse_compare(text: str, default_kv: str) -> list[tuple[str, str, str]]:
    """``--compare`` as (entry name, weight precision, KV-cache dtype) triples, or a one-line InputError."""
    out: dict[str, tuple[str, str, str]] = {}
    for entry in (c.strip() for c in text.split(",")):
        if not entry:
            continue
        precision, plus, kv = entry.partition("+kv")
        if precision not in ("fp8", "bf16") or (plus and kv not in ("fp8", "auto")):
            raise InputError(f"--compare takes fp8 and/or bf16, each optionally with +kvfp8 (an FP8 KV cache) or "
                             f"+kvauto, got {text!r}")
        if entry in out:  # run once, it would be silently dropped from the comparison asked for
            raise InputError(f"--compare gives {entry} twice")
        kv = kv if plus else default_kv
        same = [name for name, p, k in out.values() if (p, k) == (precision, kv)]
        if same:  # fp8 and fp8+kvauto under --kv-cache-dtype auto: one set-up run twice under two names
            raise InputError(f"--compare gives {same[0]} and {entry}: the same set-up ({precision} weights, KV cache "
                             f"{kv}; an entry without +kv takes --kv-cache-dtype)")
        out[entry] = (entry, precision, kv)
    if not out:
        raise InputError(f"--compare takes fp8 and/or bf16, got {text!r}")
    return list(out.values())


def ratio_key(a: str, b: str) -> str:
    """The summary key of entry a's output tok/s over entry b's (``fp8_over_bf16`` for the plain pair)."""
    return f"{a}_over_{b}"


def variant_problem(model_dir: Path, precision: str, load_format: str) -> str:
    """Why ``precision`` cannot run from ``model_dir`` ("" when it can)."""
    has_q = bool(json.loads((model_dir / "config.json").read_text()).get("quantization_config"))
    if (precision == "fp8") == has_q or load_format == "dummy":
        return ""
    return (f"{precision} needs a {'quantized' if precision == 'fp8' else 'bf16'} checkpoint; "
            f"{model_dir} is {'FP8' if has_q else 'not quantized'} (use --load-format dummy to compare)")


def variant_dir(model_dir: Path, precision: str, load_format: str, tmp: Path) -> tuple[Optional[Path], str]:
    """A folder whose config.json asks for ``precision``; (None, reason) where that cannot be made."""
    cfg = json.loads((model_dir / "config.json").read_text())
    has_q = bool(cfg.get("quantization_config"))
    if (precision == "fp8") == has_q:
        return model_dir, ""
    why = variant_problem(model_dir, precision, load_format)
    if why:
        return None, why
    d = tmp / precision
    d.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            (d / f.name).symlink_to(f.resolve())
    new = copy.deepcopy(cfg)
    if precision == "fp8":
        new["quantization_config"] = FP8_SCHEME
    else:
        new.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(new))
    return d, ""


def prompt_texts(p: Path) -> list[str]:
    """The prompts of a --prompts-file: one a line, plain text or JSON ``{"prompt": "..."}``."""
    from gpulab.core.files import read_utf8_text

    lines = [ln for ln in read_utf8_text(p, f"--prompts-file {p}").splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"{p}: no prompts (one per line, plain text or JSON {{\"prompt\": ...}})")
    out = []
    for i, ln in enumerate(lines):
        text = ln
        if ln.lstrip().startswith("{"):
            try:
                text = json.loads(ln)["prompt"]
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):  # 5, null or a list would reach the tokenizer
                raise InputError(f"{p}: line {i + 1} is not JSON with a 'prompt' string")
        out.append(text)
    return out


def make_prompts(args: dict[str, Any], vocab: int, tokenizer) -> list[list[int]]:
    rng = random.Random(args["seed"])
    if args.get("prompts_file"):
        p = Path(args["prompts_file"])
        texts = prompt_texts(p)
        if tokenizer is None:
            raise InputError(f"{p}: text prompts need the model folder's tokenizer")
        out = [tokenizer.encode(text)[: args["input_len"]] for text in texts]
        return [out[i % len(out)] for i in range(args["num_prompts"])]
    # --prefix-len: every prompt begins with the same random tokens (a shared system prompt), then its own
    shared = [rng.randrange(vocab) for _ in range(args.get("prefix_len") or 0)]
    return [shared + [rng.randrange(vocab) for _ in range(args["input_len"] - len(shared))]
            for _ in range(args["num_prompts"])]


def drive(engine, prompts: list[list[int]], output_len: int, request_rate: float, max_concurrency: Optional[int],
          seed: int, deadline: Optional[float] = None) -> dict[str, Any]:
    """Serve ``prompts`` in-process with Poisson arrivals; per-request latencies and throughput. At ``deadline``
    (a ``time.perf_counter()`` value) the run stops: requests not yet admitted are dropped, those in flight are
    aborted, and the figures cover what was produced until then (``time_boxed``)."""
    from gpulab.vajra.sampling import SamplingParams

    rng = random.Random(seed + 1)
    t, arrivals = 0.0, []
    for _ in prompts:
        arrivals.append(t)
        if math.isfinite(request_rate):
            t += rng.expovariate(request_rate)
    pending = deque(zip(arrivals, prompts))
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    seqs, inflight = [], 0
    start = time.perf_counter()
    # a request's latencies start when a client would have sent it: at its Poisson arrival, or with
    # --max-concurrency when a slot of the C became free after that (times each slot became free, earliest first)
    slot_free = [start] * (max_concurrency or 0)
    engine.step_log = []
    boxed = False
    while pending or engine.has_unfinished():
        if deadline is not None and time.perf_counter() >= deadline:
            boxed = True
            pending.clear()
            for s in seqs:
                engine.abort(s.request_id)
            break
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now and (max_concurrency is None or inflight < max_concurrency):
            arrival, ids = pending.popleft()
            sent = start + arrival
            if max_concurrency is not None:
                sent = max(sent, heapq.heappop(slot_free))
            seqs.append(engine.add_request(ids, sp, arrival_time=sent))
            inflight += 1
        if not engine.has_unfinished():
            if pending:
                time.sleep(max(0.0, min(pending[0][0] - (time.perf_counter() - start), 0.05)))
            continue
        for o in engine.step():
            if o.finished:
                inflight -= 1
                if max_concurrency is not None:
                    heapq.heappush(slot_free, time.perf_counter())
    duration = time.perf_counter() - start
    ttft, tpot, itl, e2e = [], [], [], []
    for s in seqs:
        tt = s.token_times
        if not tt:  # admitted, aborted at the time box before its first token
            continue
        ttft.append((tt[0] - s.arrival_time) * 1e3)
        if s.finish_reason == "length":  # a request cut off by the time box has no end to end
            e2e.append((tt[-1] - s.arrival_time) * 1e3)
        if len(tt) > 1:
            tpot.append((tt[-1] - tt[0]) / (len(tt) - 1) * 1e3)
            itl += [(b - a) * 1e3 for a, b in zip(tt, tt[1:])]
    n_out = sum(s.num_output for s in seqs)
    completed = sum(1 for s in seqs if s.finish_reason == "length")
    # as vLLM's benchmark: completed requests per second; prompt tokens of the requests that were prefilled (a
    # time box can abort requests before or during their prefill)
    res = {"duration_s": duration, "completed": completed,
           "output_tokens": n_out, "output_tok_s": n_out / duration, "requests_s": completed / duration,
           "total_tok_s": (n_out + sum(s.prompt_len for s in seqs if s.token_times)) / duration,
           "preemptions": engine.scheduler.num_preemptions, "steps": len(engine.step_log),
           "outputs": [s.output_token_ids for s in seqs], "lengths_ok": all(s.num_output == output_len for s in seqs),
           "time_boxed": boxed, "num_prompts_asked": len(prompts), **engine.prefix_cache_stats()}
    # the engine's CPU work per step (schedule, batch building, bookkeeping): on a GPU it is not overlapped
    # with the model, so it adds to every step; host_share = its part of the whole run
    host_dec = [st["host_ms"] for st in engine.step_log if st["decode_only"]]
    res["host_ms_decode_median"] = pct(host_dec, 0.5) if host_dec else None
    # the detokenization the engine does while the device runs the step's model call (off the critical path)
    drain_dec = [st["drain_ms"] for st in engine.step_log if st["decode_only"]]
    res["drain_ms_decode_median"] = pct(drain_dec, 0.5) if drain_dec and engine.defer_output else None
    res["host_share"] = sum(st["host_ms"] for st in engine.step_log) / (duration * 1e3) if duration > 0 else None
    res.update(stats("ttft", ttft))
    res.update(stats("tpot", tpot))
    res.update(stats("itl", itl))
    res.update(stats("e2e", e2e))
    return res


RECHUNK_TOPK = 5  # logprobs asked per token in the rechunk passes (the first token's top-5 are compared)
RECHUNK_INFO_TOKENS = 16  # bf16/fp16: tokens the rechunked pass generates (position-wise agreement, information)
RECHUNK_DLOGPROB_TOL = 0.25  # nats: bf16/fp16 bound on the first token's top-5 logprob differences (set before any
#                              GPU run; BF16 serving on an H200 on 2026-11-29 showed 0.094)


def first_tokens(engine, prompts, params) -> list[tuple[list[int], Any]]:
    """Serve ``prompts`` with ``params`` (logprobs asked): per prompt (its output token ids, the logprob entry
    of its first output token: ``(logprob of the sampled token, [(id, logprob)] of the k most likely)``)."""
    ids = [engine.add_request(p, params).request_id for p in prompts]
    first: dict[str, Any] = {}
    final: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id not in first and o.logprobs:
                first[o.request_id] = o.logprobs[0]
            if o.finished:
                final[o.request_id] = list(o.output_token_ids)
    return [(final[i], first.get(i)) for i in ids]


def _top2_gap(lps: dict[int, float]) -> float:
    top = sorted(lps.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else math.inf


def compare_first_tokens(ref: list[tuple[int, Any]], got: list[tuple[int, Any]],
                         tol: float = RECHUNK_DLOGPROB_TOL) -> dict[str, Any]:
    """The first output token of each prompt in two runs, each as (token id, its logprob entry). Per prompt: the
    tokens agree, or their flip is a near-tie: each run has the other's token in its top-k and each run's top-2
    gap is at most the difference the two runs show on the two tokens (|d logprob| of one + of the other), so
    that difference alone explains the flip. ``max_abs_dlogprob``: the largest |logprob difference| over the ids
    in both runs' top-k (over all prompts). ``passed``: every flip a near-tie and max_abs_dlogprob <= ``tol``."""
    agree, flips, ok, worst = 0, [], True, 0.0
    for i, ((ta, ea), (tb, eb)) in enumerate(zip(ref, got)):
        ra, rb = dict(ea[1]), dict(eb[1])
        ra.setdefault(ta, ea[0])
        rb.setdefault(tb, eb[0])
        common = ra.keys() & rb.keys()
        d = max((abs(ra[t] - rb[t]) for t in common), default=math.inf)
        worst = max(worst, d)
        if ta == tb:
            agree += 1
            continue
        both = ta in rb and tb in ra
        explained = abs(ra[ta] - rb[ta]) + abs(ra[tb] - rb[tb]) if both else 0.0
        gaps = [_top2_gap(ra), _top2_gap(rb)]
        tie = both and max(gaps) <= explained
        ok = ok and tie
        flips.append({"prompt": i, "tokens": [ta, tb], "near_tie": tie, "top2_gaps": [round(g, 4) for g in gaps],
                      "explained": round(explained, 4)})
    return {"agreement": agree / max(1, len(ref)), "max_abs_dlogprob": worst, "flips": flips,
            "flips_near_ties": ok, "passed": ok and worst <= tol}


def rechunk_check(rec, engine, cfg, prompts, res, output_len: int, precision: str) -> None:
    """Are the outputs independent of how the prompts are chunked? The first k = min(8, n) prompts again, with
    a quarter of the token budget per step (at most half the shortest of them, so that each one is prefilled in
    several chunks), logprobs asked.

    In fp32 (the CPU, or fp32 on a GPU where no linear changes backend with the step size) the rule is exact: all
    ``output_len`` greedy tokens, position by position, equal the run's. In bf16/fp16 the numerics depend on the
    batch (the rerun has k sequences, the run had n: other GEMM shapes, other CUDA graphs, other rounding), and a
    deep random-weight model is chaotic: one flipped near-tie makes every later position differ, so position-wise
    agreement says nothing about chunked prefill. There the first output token, which depends on the prompt alone,
    is compared between two passes of the same k prompts that differ only in chunking (and so in batch
    composition): the full budget and the small one, one token each (no decode steps in between). Per prompt
    the first tokens agree or flip on a near-tie (:func:`compare_first_tokens`), with the first token's top-5
    logprobs within RECHUNK_DLOGPROB_TOL.

    Both compared passes pin every ``auto`` linear to the backend it takes at the full budget
    (:func:`linear.pinned_backends`) and run eagerly (no CUDA graph, whose kernels were captured under auto).
    Unpinned, an FP8 linear switches with the step's token count (W8A16 with bf16 activations at <= 64 tokens,
    W8A8 with FP8 activations above where the checkpoint quantizes activations, else dequant-jit), so a prompt whose
    last chunk shares a small step can get its first token at another activation precision: a property of the
    serving numerics (``--linear-backend`` fixes the activation precision), not of chunking. A third pass serves
    the prompts as the engine does, unpinned, at the small budget, RECHUNK_INFO_TOKENS tokens: its position-wise
    agreement with the run, and its first tokens against the reference, are recorded as information
    (``auto_backends_*``); so is the main run's first-token agreement with the (pinned) reference."""
    import torch

    from gpulab.vajra.linear import pinned_backends, varies_with_m
    from gpulab.vajra.sampling import SamplingParams

    k = min(8, len(prompts))
    ps = prompts[:k]
    budget = cfg.max_num_batched_tokens
    linears = list(engine.model.linears().values())
    switching = any(varies_with_m(lin) for lin in linears)
    exact = engine.model.info.dtype == torch.float32 and not switching
    small = max(1, min(budget // 4, min(len(p) for p in ps) // 2))
    n_again = output_len if exact else min(output_len, RECHUNK_INFO_TOKENS)
    sp = dict(temperature=0.0, ignore_eos=True, logprobs=RECHUNK_TOPK)

    def served(n_tokens: int, step_budget: int):
        engine.scheduler.max_num_batched_tokens = step_budget
        try:
            return first_tokens(engine, ps, SamplingParams(max_tokens=n_tokens, **sp))
        finally:
            engine.scheduler.max_num_batched_tokens = budget
            engine.reset_prefix_cache()  # the next pass prefills the prompts again, in its own chunks

    again = served(n_again, small)
    pinned: list[str] = []
    if exact:
        ref = served(1, budget)
        chunked = again
    else:
        # CUDA graphs off meanwhile: a prompt's last chunk of one token, alone in its step, is a "decode-only"
        # step, and a graph replays the kernels it captured under auto, not the pinned ones
        graphs, engine.graphs = engine.graphs, None
        try:
            with pinned_backends(linears, budget) as pinned:
                chunked = served(1, small)
                ref = served(1, budget)
        finally:
            engine.graphs = graphs
    pairs = [(a, b) for (toks, _), out in zip(again, res["outputs"][:k]) for a, b in zip(toks, out)]
    positionwise = sum(a == b for a, b in pairs) / max(1, len(pairs))
    firsts = lambda run: [(t[0], e) for t, e in run]  # noqa: E731
    cmp = compare_first_tokens(firsts(ref), firsts(chunked))
    main_first = sum(out[:1] == t[:1] for (t, _), out in zip(ref, res["outputs"][:k])) / k
    res.update({"rechunk_prompts": k, "rechunk_budget": small, "rechunk_token_agreement": positionwise,
                "rechunk_token_agreement_tokens": n_again,
                "rechunk_first_token_agreement": cmp["agreement"],
                "rechunk_first_token_max_abs_dlogprob": cmp["max_abs_dlogprob"],
                "rechunk_main_first_token_agreement": main_first})
    if exact:
        rec.check(f"vajra-{precision}: greedy tokens independent of chunking", positionwise == 1.0,
                  {"agreement": positionwise, "prompts": k, "tokens": n_again, "budgets": [budget, small],
                   "first_token_max_abs_dlogprob": cmp["max_abs_dlogprob"], "rule": "exact (fp32)"})
        return
    auto = compare_first_tokens(firsts(ref), firsts(again))
    res.update({"rechunk_auto_backends_first_token_agreement": auto["agreement"],
                "rechunk_auto_backends_first_token_max_abs_dlogprob": auto["max_abs_dlogprob"]})
    dt = str(engine.model.info.dtype).replace("torch.", "")
    detail = {"first_token_agreement": cmp["agreement"], "first_token_max_abs_dlogprob": cmp["max_abs_dlogprob"],
              "prompts": k, "budgets": [budget, small], "linear_backends_pinned": pinned,
              "positionwise_agreement_information_only": positionwise, "positionwise_tokens": n_again,
              "main_run_first_token_agreement_information_only": main_first,
              "auto_backends_first_token_agreement_information_only": auto["agreement"],
              "auto_backends_first_token_max_abs_dlogprob_information_only": auto["max_abs_dlogprob"],
              "rule": (f"{dt} numerics depend on the batch: per prompt the first output token agrees between two "
                       "passes that differ only in chunking (full budget, small budget; linear backends pinned "
                       "to the full budget's, one token each), or flips on a near-tie (each run's top-2 gap within "
                       "the two tokens' |d logprob|); and max |d logprob| over the first token's "
                       f"top-{RECHUNK_TOPK} ids in both <= {RECHUNK_DLOGPROB_TOL} nats (set before any GPU run; "
                       "bf16 serving on an H200, 2026-11-29: 0.094)")}
    if cmp["flips"]:
        detail["flips"] = cmp["flips"]
    if switching:
        from gpulab.vajra.linear import W8A16_MAX_M, small_and_large_backends

        switches = sorted({small_and_large_backends(lin) for lin in linears if varies_with_m(lin)})
        detail["auto_backends_note"] = (
            f"unpinned (as served), FP8 linears run {' / '.join(f'{a} up to {W8A16_MAX_M} tokens a step, {b} above' for a, b in switches)}"
            " (w8a8 quantizes the activations to FP8, w8a16 and dequant-jit keep them in the model's dtype), so a "
            "prompt whose last chunk shares a small step is computed by another backend; the auto_backends_* "
            "figures compare that pass with the reference: information, not checked (--linear-backend fixes one "
            "backend)")
    rec.check(f"vajra-{precision}: first-token logprobs independent of chunking", cmp["passed"], detail)


def decode_batch1(engine, input_len: int, steps: int, vocab: int, seed: int) -> dict[str, Any]:
    """Median decode-step time of one sequence alone (the engine's whole step, wall clock: what a client waits per
    token, host work included; serve-kernels times the GPU's step alone), its host part, and the KV bytes a step
    reads."""
    from gpulab.vajra.sampling import SamplingParams

    rng = random.Random(seed + 2)
    ids = [rng.randrange(vocab) for _ in range(input_len)]
    engine.step_log = []
    # steps + 1 tokens: the first comes from the prefill's step, each of the other ``steps`` from a decode step
    engine.add_request(ids, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    dec = [s["ms"] for s in engine.step_log if s["decode_only"]]
    host = [s["host_ms"] for s in engine.step_log if s["decode_only"]]
    info = engine.model.info
    kv_token = engine.model.kv_bytes_per_block(1, engine.config.kv_cache_dtype)
    ctx = input_len + (steps + 1) / 2  # decode step j (1..steps) reads the K/V of input_len + j tokens
    return {"decode_b1_ms": pct(dec, 0.5) if dec else float("nan"), "decode_b1_steps": len(dec),
            "decode_b1_host_ms": pct(host, 0.5) if host else float("nan"),
            "kv_bytes_read": kv_token * ctx, "num_layers": info.num_layers}


def hf_floor(model_dir: Path, load_format: str, device: str, prompts: list[list[int]], output_len: int
             ) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpulab.core.device import bf16_native

    dev = torch.device(device)
    dtype = (torch.bfloat16 if bf16_native(dev) else torch.float16) if dev.type == "cuda" else torch.float32
    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    if getattr(cfg, "quantization_config", None):
        if load_format != "dummy":
            raise RuntimeError("an FP8 checkpoint needs the compressed-tensors package in transformers")
        cfg.quantization_config = None
        del cfg.quantization_config
    def load(fn, *a, **kw):  # transformers < 4.56 calls it torch_dtype
        try:
            return fn(*a, dtype=dtype, **kw)
        except TypeError:
            return fn(*a, torch_dtype=dtype, **kw)

    if load_format == "dummy":
        with torch.device(device):
            model = load(AutoModelForCausalLM.from_config, cfg)
    else:
        model = load(AutoModelForCausalLM.from_pretrained, str(model_dir), local_files_only=True).to(device)
    model.eval()
    # every prompt at its own length: left-padded to the longest, the padding masked (as a static batch is served)
    n = max(len(p) for p in prompts)
    pad = cfg.pad_token_id  # any id in the vocabulary does (its positions are masked); -1 or None is none
    if not isinstance(pad, int) or not 0 <= pad < cfg.vocab_size:
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) and cfg.eos_token_id else cfg.eos_token_id
        pad = eos if isinstance(eos, int) and 0 <= eos < cfg.vocab_size else 0
    batch = torch.tensor([[pad] * (n - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        w = min(len(prompts[0]), 8)  # warm-up on the first prompt's last tokens (no padding among them)
        model.generate(batch[:1, -w:], attention_mask=mask[:1, -w:], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(batch, attention_mask=mask, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    produced = int((out.shape[1] - n) * out.shape[0])
    del model
    return {"output_tok_s": produced / dt, "requests_s": out.shape[0] / dt, "duration_s": dt,
            "num_prompts": int(out.shape[0]), "e2e_mean_ms": dt * 1e3, "act_dtype": str(dtype).replace("torch.", "")}


def w8a8_accumulation(model) -> bool | None:
    """Whether this model's W8A8 GEMMs accumulate fast (see linear.FAST_ACCUM), None where no linear can run W8A8
    (BF16 weights, no FP8 tensor cores, block scales, a backend asked for that is not w8a8, the CPU)."""
    from gpulab.vajra.linear import fast_accum_in_use

    lins = list(model.linears().values()) if hasattr(model, "linears") else []
    w8 = next((lin for lin in lins if lin.qw is not None and lin.w8a8_ok and lin.backend in ("auto", "w8a8")), None)
    if w8 is None or w8.qw.q.device.type != "cuda":
        return None
    return fast_accum_in_use(w8.qw.q.device, rowwise=not (w8.qw.act == "static" and w8.qw.strategy == "tensor"))


def run_variant(rec, args: dict[str, Any], device: str, vdir: Path, cfg, name: str, prompts, share, bw, spec_bw):
    """Load, warm up and serve one --compare entry; checks go to ``rec``. Returns (its row, the prompts)."""
    from gpulab.vajra.engine import load_engine
    from gpulab.vajra.sampling import SamplingParams

    t_variant = time.perf_counter()
    engine = load_engine(vdir, device=device, config=cfg, load_format=args["load_format"],
                         attention_backend=args["attention_backend"],
                         linear_backend=args.get("linear_backend", "auto"))
    try:
        rec.notes += [f"vajra-{name}: {n}" for n in engine.notes]
        w8a8_fast_accum = w8a8_accumulation(engine.model)
        vocab = engine.vocab_size
        if prompts is None:
            prompts = make_prompts(args, vocab, engine.tokenizer)
        # warm-up: compile / autotune every path once (prefill chunks and decodes)
        warm = [prompts[0][: max(1, min(len(prompts[0]), 64))]]
        engine.generate(warm * 2, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        if engine.block_manager.prefix_caching:  # and a first chunk that starts after cached blocks
            engine.generate(warm, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        engine.reset_prefix_cache()  # the run finds cached only what its own requests computed
        # the run's own box: its share less what loading took, less ~15% for the checks after it
        run_deadline = None if share is None else t_variant + share - 0.15 * share
        res = drive(engine, prompts, args["output_len"], args["request_rate"], args["max_concurrency"],
                    args["seed"], deadline=run_deadline)
        if res["time_boxed"]:
            rec.notes.append(f"vajra-{name}: time-boxed by --budget-s: {res['completed']} of {len(prompts)} "
                             f"requests completed in {res['duration_s']:.1f} s; its tok/s covers that window "
                             "(ramp-up included, no drain)")
        else:
            rec.check(f"vajra-{name}: every request completed with --output-len tokens",
                      res["lengths_ok"] and res["completed"] == len(prompts))
        rec.check(f"vajra-{name}: KV blocks all returned", engine.block_manager.num_used == 0,
                  {"used": engine.block_manager.num_used})
        # the first prompts again in other chunks (budget 1/4, at most half a prompt): the same outputs? (Not after
        # a time box: the extra passes would overrun it.)
        if res["time_boxed"]:
            rec.notes.append(f"vajra-{name}: chunking check skipped (time-boxed)")
        else:  # (without the run's cached blocks: the prompts are prefilled again, in other chunks)
            engine.reset_prefix_cache()
            rechunk_check(rec, engine, cfg, prompts, res, args["output_len"], name)
        dec = decode_batch1(engine, args["input_len"], args["decode_steps"], vocab, args["seed"])
        wbytes = engine.model.weight_bytes() if hasattr(engine.model, "weight_bytes") else None
        row = {"impl": f"vajra-{name}", "act_dtype": str(engine.model.info.dtype).replace("torch.", ""),
               "kv_cache": cfg.kv_cache_dtype, "cuda_graphs": engine.graphs is not None,
               "w8a8_fast_accum": w8a8_fast_accum,
               "num_blocks": engine.num_blocks, **{k2: v for k2, v in res.items() if k2 != "outputs"}, **dec}
        if wbytes:
            moved = wbytes + dec["kv_bytes_read"]
            row["weight_bytes"] = wbytes
            row["roofline_ms"] = moved / (bw * 1e9) * 1e3
            row["roofline_frac"] = row["roofline_ms"] / dec["decode_b1_ms"]
            if spec_bw:
                row["spec_roofline_ms"] = moved / spec_bw * 1e3
                row["spec_roofline_frac"] = row["spec_roofline_ms"] / dec["decode_b1_ms"]
        return row, prompts
    finally:
        del engine


def run(model_dir: Path, args: dict[str, Any]):
    import torch

    from gpulab.core import ceilings, options, results
    from gpulab.core.device import probe
    from gpulab.vajra.engine import EngineConfig

    device = options.resolve_device()
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise InputError(f"model folder not found or without config.json: {model_dir}")
    compare = parse_compare(args["compare"], args["kv_cache_dtype"])
    for k in ("input_len", "output_len", "num_prompts", "decode_steps", "hf_num_prompts"):
        if args[k] < 1:
            raise InputError(f"--{k.replace('_', '-')} must be >= 1, got {args[k]}")
    if not (args["request_rate"] > 0):
        raise InputError(f"--request-rate must be > 0 or inf, got {args['request_rate']}")
    if args["max_concurrency"] is not None and args["max_concurrency"] < 1:
        raise InputError(f"--max-concurrency must be >= 1, got {args['max_concurrency']}")
    prefix_len = args.get("prefix_len") or 0
    if not (0 <= prefix_len <= args["input_len"]):
        raise InputError(f"--prefix-len must be in 0..--input-len ({args['input_len']}), got {prefix_len}")
    if prefix_len and args.get("prompts_file"):
        raise InputError("--prefix-len shapes the random prompts; it does not apply to --prompts-file")
    if args.get("prompts_file"):
        prompt_texts(Path(args["prompts_file"]))  # a malformed file fails now, not after each model has loaded

    why = [w for w in (variant_problem(model_dir, p, args["load_format"]) for _, p, _ in compare) if w]
    if len(why) == len(compare):  # no precision asked for can run from this folder
        raise InputError("; ".join(why))
    rec = results.Record(name="serve-bench", config={"model_dir": str(model_dir), "device": device, **args})
    if device != "cuda":
        how = ("FP8 weights dequantized on the CPU" if args.get("linear_backend", "auto") in ("auto", "dequant")
               else f"FP8 weights through the {args['linear_backend']} backend")
        rec.notes.append(f"no GPU: CPU run at small size (fp32 activations; {how}); "
                         "CUDA graphs, Triton/FlashInfer attention and the H100 goals are not measured here")
    bw = ceilings.copy_bandwidth_gbs(device, nbytes=(1 << 30) if device == "cuda" else (64 << 20))
    rec.metrics["copy_bandwidth_gbs"] = bw
    gpu_name = ((probe() or {}).get("gpu") or {}).get("name", "") if device == "cuda" else ""
    spec_bw = spec_hbm(gpu_name)
    rec.metrics["spec_hbm_bandwidth_gbs"] = spec_bw / 1e9 if spec_bw else None

    cfg = EngineConfig(max_num_seqs=args["max_num_seqs"], max_num_batched_tokens=args["max_num_batched_tokens"],
                       block_size=args["block_size"], num_blocks=args["num_blocks"],
                       gpu_memory_utilization=args["gpu_memory_utilization"], kv_cache_dtype=args["kv_cache_dtype"],
                       cuda_graphs=args["cuda_graphs"],
                       enable_prefix_caching=bool(args.get("enable_prefix_caching"))).validate()
    from gpulab.core.files import read_model_config

    limit = read_model_config(model_dir).get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool):  # found now, not after the main run
        for what, n in (("--input-len + --output-len", args["input_len"] + args["output_len"]),
                        ("--input-len + --decode-steps + 1", args["input_len"] + args["decode_steps"] + 1)):
            if n > limit:
                raise InputError(f"{what} = {n} is longer than the model's context ({limit} tokens, "
                                 "max_position_embeddings)")
    columns = ROW_COLUMNS + (["prefix_hit_rate"] if cfg.enable_prefix_caching else [])
    per_variant: dict[str, dict[str, Any]] = {}
    prompts = None
    deadline = None if args.get("budget_s") is None else time.perf_counter() + float(args["budget_s"])
    with tempfile.TemporaryDirectory(prefix="vajra-bench-") as tmp:
        first_error: Exception | None = None
        broken = False
        for vi, (name, precision, kv) in enumerate(compare):
            share = None
            if deadline is not None:  # this entry's share of what is left (the HF floor counts as one more)
                parts = len(compare) - vi + (1 if args["hf_baseline"] else 0)
                share = (deadline - time.perf_counter()) / parts
                if share < 5:  # asked for and not run: the comparison is incomplete
                    why = f"skipped: --budget-s {args['budget_s']:g} is spent"
                    rec.check(f"vajra-{name}: ran", False, why)
                    rec.notes.append(f"vajra-{name} {why}")
                    continue
            vdir, why = variant_dir(model_dir, precision, args["load_format"], Path(tmp))
            if vdir is None:
                rec.notes.append(f"vajra-{name} skipped: {why}")
                continue
            vcfg = copy.deepcopy(cfg)
            vcfg.kv_cache_dtype = kv
            try:
                row, prompts = run_variant(rec, args, device, vdir, vcfg, name, prompts, share, bw, spec_bw)
            except Exception as e:  # noqa: BLE001 - one failing entry must not lose the others' rows
                if options.get().debug:
                    raise
                # re-raised below when no entry ran (e.g. a broken checkpoint); without its traceback, whose frames
                # would keep this entry's tensors on the GPU
                first_error = first_error or e.with_traceback(None)
                msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                rec.check(f"vajra-{name}: ran", False, msg)
                rec.notes.append(f"vajra-{name} failed: {msg}")
                row = None
            try:
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: the context is gone, keep what ran
                rec.notes.append(f"the entries after vajra-{name} were not run: the GPU context failed "
                                 f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
                broken = True
            if row is not None:
                per_variant[name] = row
                rec.metrics.setdefault("variants", {})[row["impl"]] = row
                rec.rows.append({c: row.get(c) for c in columns})
            if broken:
                break
    if not per_variant and isinstance(first_error, GpulabError):  # bad input for every entry: the one-line error
        raise first_error
    if args["hf_baseline"] and prompts and not broken and deadline is not None and deadline - time.perf_counter() < 5:
        rec.notes.append(f"hf-generate skipped: --budget-s {args['budget_s']:g} is spent")
    elif args["hf_baseline"] and prompts and not broken:
        hp = prompts[: min(args["hf_num_prompts"], len(prompts))]
        try:
            hf = hf_floor(model_dir, args["load_format"], device, hp, args["output_len"])
            hrow = {"impl": "hf-generate", **hf}
            rec.metrics.setdefault("variants", {})["hf-generate"] = hrow
            rec.rows.append({c: hrow.get(c) for c in columns})
            padded = " (left-padded to the longest, the padding masked)" if len({len(p) for p in hp}) > 1 else ""
            rec.notes.append(f"hf-generate: one static batch of {hf['num_prompts']} prompts{padded} through "
                             "transformers generate (no continuous batching, no paged cache): the floor")
        except Exception as e:  # noqa: BLE001 - the floor is optional; say why it is missing
            rec.notes.append(f"hf-generate skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for p, row in per_variant.items():
        rec.summary[f"{p}_output_tok_s"] = round(row["output_tok_s"], 2)
        rec.summary[f"{p}_decode_b1_ms"] = round(row["decode_b1_ms"], 4)
        if "roofline_frac" in row:
            rec.summary[f"{p}_roofline_frac"] = round(row["roofline_frac"], 3)
    boxed = [p for p, row in per_variant.items() if row.get("time_boxed")]
    if boxed:  # their tok/s covers the box only (no drain of the last requests): compare with care
        rec.summary["time_boxed"] = ",".join(boxed)
    precision_of = {name: precision for name, precision, _ in compare}
    ratios = []
    for a, ra in per_variant.items():  # every FP8 entry over every BF16 entry
        for b, rb in per_variant.items():
            if precision_of[a] == "fp8" and precision_of[b] == "bf16" and rb["output_tok_s"]:
                # not a figure on the CPU (both compute in fp32 there), where either entry was time-boxed, or at a
                # finite request rate (output tok/s then follows the arrivals, and the ratio tends to 1)
                fair = (device == "cuda" and not (ra.get("time_boxed") or rb.get("time_boxed"))
                        and math.isinf(args["request_rate"]))
                rec.summary[ratio_key(a, b)] = round(ra["output_tok_s"] / rb["output_tok_s"], 3) if fair else None
                ratios.append(ratio_key(a, b))
    if ratios and device != "cuda":
        rec.notes.append(f"{', '.join(ratios)}: none on the CPU (no GPU kernels: the ratio would not say what FP8 "
                         "serving is worth)")
    elif any(rec.summary[k] is None for k in ratios):
        rec.notes.append("FP8-over-BF16 ratios are left out where an entry was time-boxed (its tok/s covers the box "
                         "only) or the request rate is finite (tok/s then follows the arrivals)")
    hf_row = next((r for r in rec.rows if r["impl"] == "hf-generate"), None)
    if hf_row and per_variant:
        best = max(r["output_tok_s"] for r in per_variant.values())
        rec.summary["best_over_hf"] = round(best / hf_row["output_tok_s"], 2)
        rec.summary["hf_batch"] = rec.metrics["variants"]["hf-generate"]["num_prompts"]  # the batch it ran
        rec.notes.append(f"best_over_hf: vajra's best output tok/s ({args['num_prompts']} requests, continuous "
                         f"batching) over transformers' generate on one batch of {rec.summary['hf_batch']} prompts: "
                         "it measures the engine and its concurrency together, not the engine alone")
    if not per_variant:
        rec.check("at least one vajra variant ran", False, "; ".join(rec.notes))
    return rec
