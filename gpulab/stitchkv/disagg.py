"""``gpulab kvstitch serve-disagg``: prefill and decode in two processes over torch.distributed.

Rank 0 (prefill node) holds the large model and the stitches; rank 1 (decode node) holds the small
model (with its stage-2 LoRA adapter for ``--stage lora``). For each batch of prompts:

1. rank 0 prefills on the large model, emits the first token (TTFT) and builds the stitched cache;
2. rank 0 sends the first tokens and the stitched cache (all layers' K and V, stacked into two
   tensors) to rank 1, which answers with a one-element ack: ``handover_ms`` is rank 0's clock from
   the first token to the ack (packing + transfer + the ack's latency), one clock, no cross-host skew;
3. rank 1 decodes the remaining tokens greedily from that cache (TPOT: its median decode step) and
   sends the tokens and its step times back, so rank 0 alone writes the record.

The batches are handled one after the other (no overlap of the next prefill with the current
decode): each phase is measured alone.

What is handed over, and why: the *stitched small-model cache* (K after the small model's RoPE, V),
not the large model's states. (a) It is the smallest candidate: per token, 2 x L_small x H_kv,small x
D_small values, against (distinct aligned layers) x d_large for the ``hidden`` stitch input, or the
same count x 2 x H_kv,large x D_large for ``kv``; for Llama-3.2-3B -> 1B (uniform-nearest alignment,
16 distinct layers) that is 32 KiB against 96 KiB (hidden) or 64 KiB (kv) per token in bf16. The
record carries the measured bytes of both (``handover_bytes_per_seq`` and
``states_bytes_per_seq``). (b) The decode node then runs an unmodified small model over a standard
cache, so any decode engine can take it, and the stitches' compute stays on the prefill node, off
the TPOT path. The price: the prefill node needs the small model's k/v projections (+ LoRA), k_norm
and RoPE for the ``hidden`` input; this implementation loads the whole small model there (it also
serves ``--check``: the same prompts decoded in one process, which must give the same tokens).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError
from gpulab.core.results import Record
from gpulab.stitchkv.store import load_small, pick_stage, run_config

PREFILL, DECODE = 0, 1


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def validate(run: Path, stage: str, prompts: int, gen_len: int, batch: int,
             prompt_len: int | None = None, check_data: bool = True) -> tuple[dict[str, Any], str]:
    """Every check that needs no model, the data's included (``check_data``: the run's data holds the windows
    asked for): done before any process is started, so that a bad option is a one-line error, not one per
    rank followed by the process group's and torchrun's own errors."""
    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import check_lengths, load_config, load_tokenizer

    run = Path(run)
    cfg = run_config(run)
    if prompts < 1 or gen_len < 2 or batch < 1:
        raise InputError(f"--prompts and --batch must be >= 1 and --gen-len >= 2 (got {prompts}, {gen_len}, {batch})")
    if prompt_len is not None and prompt_len < 1:
        raise InputError(f"--prompt-len must be >= 1 (0: the run's), got {prompt_len}")
    stage = pick_stage(run, stage, cfg)
    if not check_data:
        return cfg, stage
    plen = prompt_len or int(cfg.get("prompt_len", 32))
    check_lengths([(role, load_config(Path(cfg[role]), role)) for role in ("large", "small")], plen + gen_len)
    corpus = D.load_corpus(cfg["data"], load_tokenizer(Path(cfg["large"]), "large"), task=cfg.get("task", "continue"))
    D.eval_windows(corpus, prompts, plen, gen_len)
    return cfg, stage


def _decode_rank(ctx: Any, cfg: dict[str, Any], run: Path, stage: str) -> None:
    import torch

    from gpulab.stitchkv.distributed import recv_tensors, send_tensors
    from gpulab.stitchkv.generate import decode_loop
    from gpulab.stitchkv.stitch import build_cache

    dev = ctx.device
    small, _ = load_small(cfg, run, stage, dev)
    ctx.barrier()  # both ranks loaded: the first hand-over does not wait for this rank's loading
    with torch.no_grad():
        while True:
            (ctrl,) = recv_tensors(PREFILL, ctx)
            n_new = int(ctrl[0])
            if n_new == 0:
                break
            first, keys, values = recv_tensors(PREFILL, ctx)
            send_tensors([torch.ones(1, dtype=torch.int64, device=dev)], PREFILL, ctx)  # ack: cache is here
            cache = build_cache([(keys[l], values[l]) for l in range(keys.shape[0])])
            toks, times = decode_loop(small, cache, first, n_new)
            _sync(dev)
            send_tensors([torch.stack(toks, 1), torch.tensor(times, dtype=torch.float64, device=dev)], PREFILL, ctx)


def _prefill_rank(ctx: Any, cfg: dict[str, Any], run: Path, stage: str, prompts: int, prompt_len: int | None,
                  gen_len: int, batch: int, check: bool, log: Any) -> Record:
    import torch

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.distributed import recv_tensors, send_tensors
    from gpulab.stitchkv.evaluate import _batches, rouge_backend, rouge_scores
    from gpulab.stitchkv.generate import decode_texts, eos_ids, greedy_stitched
    from gpulab.stitchkv.models import load_model, load_tokenizer
    from gpulab.stitchkv.stitch import cache_tensors, stitched_cache

    dev = ctx.device
    tok = load_tokenizer(Path(cfg["large"]), "large")
    large = load_model(cfg["large"], "large", dev, cfg.get("dtype", "float32"))
    small, bank = load_small(cfg, run, stage, dev)
    plen = prompt_len or int(cfg.get("prompt_len", 32))
    corpus = D.load_corpus(cfg["data"], tok, task=cfg.get("task", "continue"))
    windows = D.eval_windows(corpus, prompts, plen, gen_len)
    if corpus.kind == "jsonl":
        ref_texts = [r for _, _, r in corpus.pairs[corpus.split:][:prompts]]
    else:
        ref_texts = [tok.decode(r.tolist(), skip_special_tokens=True) for _, r in windows]
    bt = _batches(windows, batch)
    ctx.barrier()

    ttft, handover, tpot, e2e, hbytes, sbytes = [], [], [], [], 0, 0
    tokens: dict[int, list[int]] = {}
    # The first batch runs once more, untimed, before the timed ones: the whole round (prefill at the batch's own
    # size, hand-over, decode on the other rank), so that kernel loading, library heuristics and a lazily made
    # communicator (NCCL's point-to-point pair) stay out of TTFT, the hand-over and TPOT
    rounds = [(True, bt[0])] + [(False, b) for b in bt]
    with torch.no_grad():
        for warm, (prompt, _, sel) in rounds:
            prompt = prompt.to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            logits, cache = stitched_cache(large, small, bank, prompt)
            first = logits.argmax(-1)
            _sync(dev)
            t1 = time.perf_counter()
            kv = cache_tensors(cache)
            send_tensors([torch.tensor([gen_len], dtype=torch.int64)], DECODE, ctx)
            keys = torch.stack([k for k, _ in kv])  # [L, B, H, P, D]
            values = torch.stack([v for _, v in kv])
            sent = send_tensors([first, keys, values], DECODE, ctx)
            recv_tensors(DECODE, ctx)  # ack
            t2 = time.perf_counter()
            toks, times = recv_tensors(DECODE, ctx)
            if warm:
                continue
            hbytes += sent
            e2e.append((time.perf_counter() - t0) * 1e3)
            ttft.append((t1 - t0) * 1e3)
            handover.append((t2 - t1) * 1e3)
            tpot.extend(times.tolist())
            for row, i in enumerate(sel):
                tokens[i] = toks[row].tolist()
            # the alternative hand-over: what the stitches read at the distinct aligned large layers
            ls = bank.large_shape
            width = 2 * ls["kv_heads"] * ls["head_dim"] if bank.mode == "kv" else ls["hidden"]
            sbytes += len(set(bank.align)) * prompt.numel() * width * keys.element_size()
        send_tensors([torch.tensor([0], dtype=torch.int64)], DECODE, ctx)  # stop

        rec = Record(name="kvstitch-disagg", config={
            "run": str(run), "stage": stage, "large": cfg["large"], "small": cfg["small"], "data": cfg["data"],
            "task": corpus.task, "prompts": len(windows), "prompt_len": plen, "gen_len": gen_len, "batch": batch,
            "ranks": {"prefill": PREFILL, "decode": DECODE}, "world_size": ctx.world, "backend": ctx.backend, "device": dev, "host_staged": ctx.staged,
            "alignment": cfg.get("alignment"), "stitch_input": cfg.get("stitch_input"),
            "dtype": cfg.get("dtype", "float32"), "rouge": rouge_backend(), "prompt_bos": list(corpus.bos)})
        order = sorted(tokens)
        preds = decode_texts(tok, [tokens[i] for i in order], eos_ids(tok, small, large))  # cut at EOS
        r = rouge_scores(preds, [ref_texts[i] for i in order])
        n = len(windows)
        med_h = statistics.median(handover)
        row = {"variant": f"disagg-{stage}",
               "ttft_ms": statistics.median(ttft), "handover_ms": med_h,
               # all bytes over all hand-over time (batches may differ in size: a short last one)
               "handover_gbs": hbytes / (sum(handover) * 1e6) if sum(handover) > 0 else None,
               "tpot_ms": statistics.median(tpot), "e2e_ms": statistics.median(e2e),
               "handover_bytes_per_seq": hbytes // n, "states_bytes_per_seq": sbytes // n,
               "rouge1": r["rouge1"], "rouge2": r["rouge2"], "rougeL": r["rougeL"]}
        rec.rows.append(row)
        rec.metrics = {"handover_bytes_total": hbytes, "states_bytes_total": sbytes, "batches": len(bt),
                       "ttft_ms_samples": ttft, "handover_ms_samples": handover, "e2e_ms_samples": e2e,
                       "samples": preds[:3]}
        if n * gen_len <= 8192:
            rec.metrics["tokens"] = [tokens[i] for i in order]
        rec.summary = {"ttft_ms": row["ttft_ms"], "tpot_ms": row["tpot_ms"], "handover_ms": med_h,
                       "handover_kib_per_seq": row["handover_bytes_per_seq"] / 1024, "rougeL": r["rougeL"]}
        if check:
            log("serve-disagg: single-process reference decode on rank 0")
            same, single_ttft, single_tpot, first_bad = True, [], [], None
            for prompt, _, sel in bt:
                g = greedy_stitched(large, small, bank, prompt.to(dev), gen_len)
                single_ttft.append(g.prefill_ms)
                single_tpot.extend(g.decode_ms)
                for row_i, i in enumerate(sel):
                    if g.tokens[row_i].tolist() != tokens[i]:
                        same = False
                        first_bad = i if first_bad is None else first_bad
            rec.check("disagg_tokens_equal_single_process", same, {"prompts": n, "first_mismatch": first_bad})
            rec.rows.append({"variant": f"single-{stage}", "ttft_ms": statistics.median(single_ttft),
                             "handover_ms": None, "handover_gbs": None, "tpot_ms": statistics.median(single_tpot),
                             "e2e_ms": None, "handover_bytes_per_seq": None, "states_bytes_per_seq": None,
                             "rouge1": None, "rouge2": None, "rougeL": None})
        sh = bank.small_shape
        # each prompt's own length: .jsonl prompts may be shorter than plen
        prompt_tokens = sum(len(p) for p, _ in windows)
        want = 2 * sh["layers"] * sh["kv_heads"] * sh["head_dim"] * prompt_tokens * next(small.parameters()).element_size()
        want += n * 8  # first tokens (int64)
        rec.check("handover_bytes_equal_stitched_cache", hbytes == want, {"sent": hbytes, "expected": want})
        rec.notes.append("ttft_ms: rank 0 prefill + stitches + first token of a batch; handover_ms: rank 0 from the "
                         "first token to rank 1's ack (packing + transfer + ack latency); tpot_ms: rank 1's median "
                         "decode step; e2e_ms: a batch from prefill start to its tokens back on rank 0; batches "
                         "run one after the other (no prefill/decode overlap)")
        if ctx.staged:
            rec.notes.append("fewer GPUs than ranks: gloo, the cache staged through host memory (D2H + H2D in handover_ms)")
        rec.notes.append(f"states_bytes_per_seq: what the stitches read ({bank.mode} input at {len(set(bank.align))} "
                         f"distinct aligned large layers, the weights' dtype), the alternative hand-over; not sent")
    return rec


def serve(run: Path, stage: str, prompts: int, prompt_len: int | None, gen_len: int, batch: int, check: bool,
          device: str, log: Any = print) -> Record | None:
    """One rank's part (under torchrun with 2 ranks); returns the record on rank 0, None on rank 1."""
    from gpulab.stitchkv import distributed

    run = Path(run)
    # the data was checked before the ranks were started (cli.serve_disagg); rank 0 reads it again below
    cfg, stage = validate(run, stage, prompts, gen_len, batch, prompt_len, check_data=False)
    ctx = distributed.setup(device, min_world=2, max_world=2, what="kvstitch serve-disagg")
    try:
        if ctx.rank == DECODE:
            _decode_rank(ctx, cfg, run, stage)
            ctx.close(sync=True)  # (both ranks leave the group together: see Ctx.close)
            return None
        rec = _prefill_rank(ctx, cfg, run, stage, prompts, prompt_len, gen_len, batch, check, log)
        ctx.close(sync=True)
        return rec
    finally:
        ctx.close()
