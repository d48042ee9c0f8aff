"""``gpulab kvstitch eval``: ROUGE, reference NLL, TTFT/TPOT and KV bytes for small-only,
large-only, stitched after stage 1 and stitched after stage 2, plus the interpolation metrics.

Variants: ``small`` and ``large`` prefill and decode alone; ``stitched-warmup`` and
``stitched-lora``: the large model prefills and emits the first token, the stitched cache is
handed over, the small model (with its stage-2 LoRA for ``stitched-lora``) decodes the rest.
``small-lora`` (when the run trained the control): the small model alone with the control LoRA, trained
like stage 2 but without stitches; stitched-lora minus small-lora is what the stitched cache adds.
ROUGE-1/2/L are F-measures (rouge-score, Porter stemming) of the decoded continuation against the
reference text, averaged over prompts. ``ref_nll`` is the teacher-forced mean negative
log-likelihood per token of the reference continuation along the same path (a low-noise
companion of ROUGE). ``gap_recovered`` = (stitched - small) / (large - small). A paired bootstrap over
prompts gives 95% intervals of the large-minus-small ROUGE-L gap and of the fraction recovered: a gap
whose interval contains 0 is noise, and the goal check then fails rather than report a ratio of noise.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError
from gpulab.core.results import Record
from gpulab.core.stats import gap_fraction, paired_bootstrap


class _FallbackRouge:
    """rouge-score's RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True) re-implemented (same
    tokenizer, nltk's Porter stemmer when nltk is importable), for machines without the rouge-score
    package (the GPU test machine has no package index)."""

    def __init__(self) -> None:
        try:
            from nltk.stem import porter

            self.stem = porter.PorterStemmer().stem
        except ImportError:
            self.stem = None

    def _tokens(self, text: str) -> list[str]:
        import re

        toks = re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower()))
        if self.stem is not None:
            toks = [self.stem(t) if len(t) > 3 else t for t in toks]
        return [t for t in toks if re.match(r"^[a-z0-9]+$", t)]

    @staticmethod
    def _f(overlap: int, n_pred: int, n_ref: int) -> float:
        p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def score(self, ref: str, pred: str) -> dict[str, float]:
        from collections import Counter

        t, p = self._tokens(ref), self._tokens(pred)
        out = {}
        for n in (1, 2):
            ct = Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))
            cp = Counter(tuple(p[i:i + n]) for i in range(len(p) - n + 1))
            out[f"rouge{n}"] = self._f(sum((ct & cp).values()), sum(cp.values()), sum(ct.values()))
        if not t or not p:
            out["rougeL"] = 0.0
        else:
            prev = [0] * (len(p) + 1)
            for a in t:
                cur = [0]
                for j, b in enumerate(p):
                    cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
                prev = cur
            out["rougeL"] = self._f(prev[-1], len(p), len(t))
        return out


def _rouge_scorer() -> tuple[Any, Any, str]:
    """(scorer, fmeasure(score, key), name): rouge-score with stemming where it imports whole (rouge_scorer needs
    nltk and absl too), else the built-in equivalent; one choice for the scores and the name recorded with them."""
    try:
        from rouge_score import rouge_scorer

        return (rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True),
                lambda s, k: s[k].fmeasure, "rouge-score")
    except ImportError:  # e.g. the GPU test machine: same tokenizer and F-measures, built in
        fb = _FallbackRouge()
        return fb, (lambda s, k: s[k]), "built-in (" + ("nltk Porter stemmer" if fb.stem else
                                                         "no stemming: nltk missing") + ")"


def rouge_backend() -> str:
    """Which ROUGE implementation :func:`rouge_items` uses here (recorded with the results)."""
    return _rouge_scorer()[2]


def rouge_items(preds: list[str], refs: list[str]) -> dict[str, list[float]]:
    """Per-item ROUGE-1/2/L F-measures (rouge-score with stemming, or the built-in equivalent)."""
    if len(preds) != len(refs):
        raise ValueError(f"rouge_items: {len(preds)} predictions for {len(refs)} references")
    scorer, fmeasure, _ = _rouge_scorer()
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)
        for k in out:
            out[k].append(float(fmeasure(s, k)))
    return out


def rouge_scores(preds: list[str], refs: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures averaged over items."""
    return {k: sum(v) / max(len(v), 1) for k, v in rouge_items(preds, refs).items()}


def _nll_own(model: Any, prompt: Any, ref: Any) -> Any:
    """Teacher-forced NLL of ``ref`` [B, C] after ``prompt``, summed over the batch per position: [C]."""
    import torch
    import torch.nn.functional as F

    seq = torch.cat([prompt, ref], 1)
    logits = model(input_ids=seq[:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ref.reshape(-1), reduction="none")
    return nll.view(ref.shape).sum(0)


def _nll_stitched(large: Any, small: Any, bank: Any, prompt: Any, ref: Any, handover: Any = None) -> Any:
    """As :func:`_nll_own` for the stitched system: position 0 from the large model's prefill logits, the
    rest from the small model reading the stitched cache. [C] ``handover``: the (logits, K/V) a
    ``greedy_stitched(keep_handover=True)`` of the same prompt handed over (no second large prefill)."""
    import torch
    import torch.nn.functional as F

    from gpulab.stitchkv.models import cache_kwarg
    from gpulab.stitchkv.stitch import build_cache, stitched_cache

    if handover is not None:
        logits0, cache = handover[0], build_cache(handover[1])
    else:
        logits0, cache = stitched_cache(large, small, bank, prompt)
    first = F.cross_entropy(logits0.float(), ref[:, 0], reduction="none").sum(0, keepdim=True)
    if ref.shape[1] == 1:
        return first
    lg = small(input_ids=ref[:, :-1], use_cache=True, **{cache_kwarg(small): cache}).logits.float()
    rest = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ref[:, 1:].reshape(-1), reduction="none")
    return torch.cat([first, rest.view(ref.shape[0], -1).sum(0)])


def _batches(windows: list[tuple[Any, Any]], batch: int) -> list[tuple[Any, Any, list[int]]]:
    """Group equal-length windows into batches: (prompts [B, P], refs [B, C], window indices)."""
    import torch

    groups: dict[tuple[int, int], list[int]] = {}
    for i, (p, r) in enumerate(windows):
        groups.setdefault((len(p), len(r)), []).append(i)
    out = []
    for idx in groups.values():
        for j in range(0, len(idx), batch):
            sel = idx[j: j + batch]
            out.append((torch.stack([windows[i][0] for i in sel]), torch.stack([windows[i][1] for i in sel]), sel))
    return out


def run_variant(name: str, pair: Any, decoder: Any, bank: Any, batches: list, tok: Any, ref_texts: list[str],
                n_new: int, device: str) -> tuple[dict[str, Any], list, list[float], list[float]]:
    """(result row, three sample continuations, per-prompt ROUGE-L in prompt order, reference NLL per
    continuation position). Row: ``ref_nll`` over all positions, ``ref_nll_tok1`` of the first token
    (the stitched system's comes from the large model's prefill) and ``ref_nll_after`` of the rest (the
    small model reading the handed-over cache). ``decoder``: the model that decodes (the small one; the large one
    for the large-only variant), after the large model's prefill when ``bank`` is given."""
    import torch

    from gpulab.stitchkv.generate import decode_texts, eos_ids, greedy, greedy_stitched

    eos = eos_ids(tok, decoder, pair.large)
    preds: dict[int, str] = {}
    prefill, tpot, nbytes = [], [], 0
    nll_sum: list[float] = []  # per continuation position, summed over prompts (windows may differ in length)
    nll_cnt: list[int] = []
    with torch.no_grad():
        if str(device).startswith("cuda") and batches:  # untimed warm-up: cuBLAS/kernel loading stays out of TTFT
            p0 = batches[0][0].to(device)
            if bank is None:
                greedy(decoder, p0, 2)
            else:
                greedy_stitched(pair.large, decoder, bank, p0, 2)
        for prompts, refs, sel in batches:
            prompts, refs = prompts.to(device), refs.to(device)
            if bank is None:
                g = greedy(decoder, prompts, n_new)
                pos = _nll_own(decoder, prompts, refs)
            else:
                g = greedy_stitched(pair.large, decoder, bank, prompts, n_new, keep_handover=True)
                pos = _nll_stitched(pair.large, decoder, bank, prompts, refs, handover=g.handover)
                g.handover = None
            for j, s in enumerate(pos.double().cpu().tolist()):
                if j == len(nll_sum):
                    nll_sum.append(0.0)
                    nll_cnt.append(0)
                nll_sum[j] += s
                nll_cnt[j] += refs.shape[0]
            prefill.append(g.prefill_ms)
            tpot.extend(g.decode_ms)
            nbytes += g.kv_bytes
            for i, text in zip(sel, decode_texts(tok, g.tokens.tolist(), eos)):  # each cut at its first EOS
                preds[i] = text
    order = sorted(preds)
    items = rouge_items([preds[i] for i in order], [ref_texts[i] for i in order])
    r = {k: sum(v) / max(len(v), 1) for k, v in items.items()}
    curve = [s / c for s, c in zip(nll_sum, nll_cnt)]
    after = sum(nll_cnt[1:])
    row = {"variant": name, "rouge1": r["rouge1"], "rouge2": r["rouge2"], "rougeL": r["rougeL"],
           "ref_nll": sum(nll_sum) / max(sum(nll_cnt), 1), "ref_nll_tok1": curve[0] if curve else None,
           "ref_nll_after": sum(nll_sum[1:]) / after if after else None, "ttft_ms": statistics.median(prefill),
           "tpot_ms": statistics.median(tpot) if tpot else None,
           "kv_bytes_per_seq": nbytes // max(len(ref_texts), 1)}
    return row, [preds[i] for i in order[:3]], items["rougeL"], curve


def self_identity_check(small: Any, prompt: Any) -> tuple[bool, dict[str, Any]]:
    """The small model stitched to itself with identity maps must reproduce its own cache and logits."""
    import torch

    from gpulab.stitchkv.models import cache_kwarg, shape_of
    from gpulab.stitchkv.reference import own_cache
    from gpulab.stitchkv.stitch import alignment, build_cache, large_features, make_bank, prefill

    sh = shape_of(small)
    bank = make_bank(sh, sh, alignment("uniform-nearest", sh["layers"], sh["layers"]), "hidden").identity_()
    bank = bank.to(prompt.device)
    with torch.no_grad():
        hs = prefill(small, prompt).hidden_states
        pos = torch.arange(prompt.shape[1], device=prompt.device).unsqueeze(0).expand(prompt.shape[0], -1)
        kv = bank(large_features(small, hs, bank.align, "hidden"), small, pos)
        ref = own_cache(small, prompt)
        diff = max(float((a - b).abs().max()) for x, y in zip(kv, ref) for a, b in zip(x, y))
        scale = max(float(b.abs().max()) for y in ref for b in y)
        nxt = prompt[:, -1:]
        lg = small(input_ids=nxt, use_cache=True, **{cache_kwarg(small): build_cache(kv)}).logits[:, -1]
        lg_ref = small(input_ids=torch.cat([prompt, nxt], 1), use_cache=False).logits[:, -1]
        ldiff = float((lg - lg_ref).abs().max())
        lscale = float(lg_ref.abs().max())
    tol = 1e-5 if next(small.parameters()).dtype == torch.float32 else 2e-2
    ok = diff <= tol * scale and ldiff <= 10 * tol * max(lscale, 1.0)
    return ok, {"cache_max_abs_diff": diff, "logit_max_abs_diff": ldiff, "tol_rel": tol}


def cache_decode_check(model: Any, prompt: Any) -> tuple[bool, dict[str, Any]]:
    """One cached decode step equals the no-cache forward of the whole sequence (the reference). A one-token
    prompt is extended by the model's own greedy next token (the cached step needs a token before it)."""
    import torch

    from gpulab.stitchkv.models import cache_kwarg, output_cache

    with torch.no_grad():
        if prompt.shape[1] < 2:
            nxt = model(input_ids=prompt, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            prompt = torch.cat([prompt, nxt], 1)
        out = model(input_ids=prompt[:, :-1], use_cache=True)
        step = model(input_ids=prompt[:, -1:], use_cache=True, **{cache_kwarg(model): output_cache(out)}).logits[:, -1]
        ref = model(input_ids=prompt, use_cache=False).logits[:, -1]
    diff = float((step - ref).abs().max())
    tol = (1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2) * max(float(ref.abs().max()), 1.0)
    return diff <= tol, {"logit_max_abs_diff": diff, "tol": tol}


def interpolates(small: float, large: float, stitched: float) -> bool:
    """The stitched score lies between the two models' and there is a gap to lie in: all three equal (e.g. all
    0 at the CPU smoke size) is no evidence of interpolation."""
    return bool(small != large and min(small, large) <= stitched <= max(small, large))


def prompt_bos_note(cfg: dict[str, Any], bos: list[int]) -> str | None:
    """A note when the run was trained on prompts that start otherwise than eval's (and a served model's)
    do: ``bos``, the tokenizer's BOS prefix (:func:`gpulab.stitchkv.data.bos_prefix`)."""
    if "prompt_bos" not in cfg:
        if not bos:
            return None
        return (f"run.yaml does not record the prompts' BOS (trained before kvstitch started prompts with the "
                f"tokenizer's BOS token, id {bos[0]}): eval's prompts start with it, the stitches may have been "
                "trained without; retrain for a like-for-like result")
    if [int(x) for x in (cfg["prompt_bos"] or [])] != list(bos):
        return (f"the run's prompts started with {cfg['prompt_bos']!r}, eval's start with {bos!r} (another "
                "tokenizer?): the stitches are evaluated on prompts they were not trained on")
    return None


def control_mismatch(cfg: dict[str, Any], have_lora: bool) -> str | None:
    """Why the run folder's LoRA control cannot stand beside its stage 2 (None: it can): it must have been
    trained with stage 2's settings (run.yaml's ``trained`` records of both), e.g. not left over from an
    earlier stage 2 of other settings."""
    from gpulab.stitchkv.run_folder import STAGE_FIELDS, _same

    if not have_lora:
        return "stage 2 (lora) is not trained, there is nothing to compare the control with"
    trained = cfg.get("trained") if isinstance(cfg.get("trained"), dict) else {}
    lo, ctl = trained.get("lora"), trained.get("lora_control")
    if not isinstance(lo, dict) or not isinstance(ctl, dict):
        which = "stage 2's" if not isinstance(lo, dict) else "the control's"
        return f"run.yaml does not record {which} training settings (retrain with --stage lora)"
    for k in (*STAGE_FIELDS["lora_control"], "records_per_step"):
        if (k in lo or k in ctl) and not _same(k, ctl.get(k), lo.get(k)):
            return (f"it was trained with {k}={ctl.get(k)!r}, stage 2 with {k}={lo.get(k)!r} (retrain with "
                    "--stage lora)")
    return None


MIN_CI_PROMPTS = 8  # fewer prompts give a bootstrap interval of no width (one prompt) or no meaning: none is claimed


def _ci(items: dict[str, list[float]], stat) -> dict[str, Any]:
    """The paired-bootstrap interval over prompts, or lo/hi None below MIN_CI_PROMPTS prompts (then no gap is
    called significant, and no recovered share is claimed)."""
    r = paired_bootstrap(items, stat)
    n = len(next(iter(items.values()), []))
    return r if n >= MIN_CI_PROMPTS else {**r, "lo": None, "hi": None}


def check_eval_options(prompts: int, prompt_len: int | None, gen_len: int, batch: int) -> None:
    """The evaluation's own options (whether the text holds ``prompts`` windows needs the pair's tokenizer, later)."""
    if prompts < 1:
        raise InputError(f"--prompts must be >= 1, got {prompts}")
    if gen_len < 1 or batch < 1:
        raise InputError(f"--gen-len and --batch must be >= 1 (got {gen_len}, {batch})")
    if prompt_len is not None and prompt_len < 1:
        raise InputError(f"--prompt-len must be >= 1 (0: the run's), got {prompt_len}")


def evaluate(run: Path, device: str, prompts: int, prompt_len: int | None, gen_len: int, batch: int,
             data: Path | None = None, goal_gap: float | None = None, name: str = "kvstitch-eval",
             log: Any = print) -> Record:
    import torch

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import check_length, load_pair
    from gpulab.stitchkv.store import load_bank, load_stage2, run_config, stage2_stale, trained_stages

    run = Path(run)
    cfg = run_config(run)
    check_eval_options(prompts, prompt_len, gen_len, batch)
    have_w, have_l = trained_stages(run)
    if not have_w:
        raise InputError(f"--run {run}: no trained stitches (run 'gpulab kvstitch train' first)")
    pair = load_pair(cfg["large"], cfg["small"], device=device, dtype=cfg.get("dtype", "float32"))
    plen = prompt_len or int(cfg.get("prompt_len", 32))
    check_length(pair, plen + gen_len)
    src = data or cfg["data"]
    task = "continue" if Path(str(src)).suffix == ".jsonl" else cfg.get("task", "continue")  # .jsonl: its records
    corpus = D.load_corpus(src, pair.tokenizer, task=task)
    windows = D.eval_windows(corpus, prompts, plen, gen_len)
    if corpus.kind == "jsonl":
        ref_texts = [r for _, _, r in corpus.pairs[corpus.split:][:prompts]]
    else:
        ref_texts = [pair.tokenizer.decode(r.tolist(), skip_special_tokens=True) for _, r in windows]
    bt = _batches(windows, batch)
    bos_note = prompt_bos_note(cfg, corpus.bos)
    rec = Record(name=name, config={"run": str(run), "large": cfg["large"], "small": cfg["small"],
                                    "data": str(src), "task": task, "prompts": len(windows), "prompt_len": plen,
                                    "gen_len": gen_len, "batch": batch, "device": device,
                                    "alignment": cfg.get("alignment"), "stitch_input": cfg.get("stitch_input"),
                                    "dtype": cfg.get("dtype", "float32"), "rouge": rouge_backend(),
                                    "prompt_bos": list(corpus.bos)})
    if bos_note:
        rec.notes.append(bos_note)
    first = bt[0][0][: min(4, len(bt[0][0]))].to(device)
    ok, det = self_identity_check(pair.small, first)
    rec.check("self_stitch_identity_reproduces_cache", ok, det)
    ok, det = cache_decode_check(pair.small, first)
    rec.check("cached_decode_matches_no_cache_reference", ok, det)

    samples: dict[str, list] = {}
    items: dict[str, list[float]] = {}  # per-prompt ROUGE-L, for the paired bootstrap
    curves: dict[str, list[float]] = {}  # reference NLL per continuation position

    def add(variant: str, decoder: Any, bank: Any) -> None:
        log(f"eval: {variant}")
        row, samples[variant], items[variant], curves[variant] = run_variant(
            variant, pair, decoder, bank, bt, pair.tokenizer, ref_texts, gen_len, device)
        rec.rows.append(row)

    add("small", pair.small, None)
    add("large", pair.large, None)
    bank_w = load_bank(run / "warmup", device)
    with torch.no_grad():  # the stitched cache has exactly the small model's own cache layout
        from gpulab.stitchkv.reference import own_cache
        from gpulab.stitchkv.stitch import cache_tensors, stitched_cache

        _, c = stitched_cache(pair.large, pair.small, bank_w, first)
        got = [tuple(t.shape) for kv in cache_tensors(c) for t in kv]
        want = [tuple(t.shape) for kv in own_cache(pair.small, first) for t in kv]
    rec.check("stitched_cache_shapes_match_small", got == want, {"stitched": got[:2], "small": want[:2]})
    add("stitched-warmup", pair.small, bank_w)
    if have_l:
        add("stitched-lora", *load_stage2(pair.small, run / "lora", device))
    else:
        rec.notes.append("stage 2 (lora) not trained in this run folder: no stitched-lora row")
    if (run / "lora-control" / "adapter").is_dir():
        stale = control_mismatch(cfg, have_l)
        if stale:
            rec.notes.append(f"{run / 'lora-control'} left out (no small-lora row): {stale}")
        else:
            # the control: the same LoRA training on the small model alone (a fresh copy: the stage-2 adapter
            # above was applied to pair.small in place)
            from gpulab.stitchkv.models import load_model
            from gpulab.stitchkv.store import load_lora_control

            small_c = load_lora_control(load_model(pair.small_path, "small", device, cfg.get("dtype", "float32"),
                                                   checked=True), run / "lora-control", device)
            add("small-lora", small_c, None)

    by = {r["variant"]: r for r in rec.rows}
    large_bytes = by["large"]["kv_bytes_per_seq"]
    for r in rec.rows:
        r["kv_vs_large"] = r["kv_bytes_per_seq"] / large_bytes if large_bytes else None
    stale = stage2_stale(cfg) if "stitched-lora" in by else None
    if stale:  # its row stays (what lora/ holds), but it is not this run's result
        rec.notes.append(f"{stale}; the stitched result below is the warm-up's")
    best = "stitched-lora" if "stitched-lora" in by and not stale else "stitched-warmup"
    gaps = {}
    for metric in ("rougeL", "ref_nll", "ref_nll_tok1", "ref_nll_after"):
        for v in ("stitched-warmup", "stitched-lora", "small-lora"):
            if v in by and None not in (by["small"][metric], by["large"][metric], by[v][metric]):
                gaps[f"{v}:{metric}"] = gap_fraction(by["small"][metric], by["large"][metric], by[v][metric])
    # paired bootstrap over prompts (95%): is the small-to-large ROUGE-L gap real, and how much does the
    # stitched model recover?
    ci = {"large_minus_small": _ci(items, lambda m: m["large"] - m["small"]),
          f"{best}_minus_small": _ci(items, lambda m: m[best] - m["small"]),
          "gap_recovered": _ci(items, lambda m: gap_fraction(m["small"], m["large"], m[best]))}
    rec.metrics = {"gap_recovered": gaps, "rougeL_ci95": ci, "samples": samples, "references": ref_texts[:3],
                   "ref_nll_by_position": {v: [round(x, 5) for x in c] for v, c in curves.items()}}
    gap_l = gaps.get(f"{best}:rougeL")

    def nll_gap(metric: str) -> float | None:
        """The share of a reference-NLL gap recovered, only where the large model's NLL is below the small one's:
        otherwise there is no gap, and the ratio would credit a move towards the worse model (metrics keeps it)."""
        sm_v, lg_v = by["small"][metric], by["large"][metric]
        return gaps.get(f"{best}:{metric}") if None not in (sm_v, lg_v) and lg_v < sm_v else None

    no_nll_gap = [m for m in ("ref_nll", "ref_nll_tok1", "ref_nll_after")
                  if None not in (by["small"][m], by["large"][m]) and not by["large"][m] < by["small"][m]]
    if no_nll_gap:
        rec.notes.append(f"the large model's reference NLL is not below the small model's ({', '.join(no_nll_gap)}): "
                         "no gap to recover, the matching gap_recovered_nll* summaries are left out (the raw ratio, "
                         "not meaningful, is in metrics.gap_recovered)")
    gap_ci = ci["large_minus_small"]
    significant = gap_ci["lo"] is not None and gap_ci["lo"] > 0
    rnd = lambda pair: [None if x is None else round(x, 5) for x in pair]  # noqa: E731
    rec.summary = {"small_rougeL": by["small"]["rougeL"], "large_rougeL": by["large"]["rougeL"],
                   "stitched_rougeL": by[best]["rougeL"], "stitched": best,
                   # a share of a gap that is not clearly above 0 is noise (with large < small it even credits a
                   # move towards the worse model): none then; metrics.gap_recovered keeps the raw ratio
                   "gap_recovered_rougeL": gap_l if significant else None,
                   "gap_recovered_rougeL_ci95": rnd((ci["gap_recovered"]["lo"], ci["gap_recovered"]["hi"])),
                   "rougeL_large_minus_small_ci95": rnd((gap_ci["lo"], gap_ci["hi"])),
                   "gap_significant": significant, "gap_recovered_nll": nll_gap("ref_nll"),
                   # token 1 comes from the large model's own prefill logits; the rest is what the small
                   # model makes of the handed-over cache (the stitches' actual contribution)
                   "gap_recovered_nll_tok1": nll_gap("ref_nll_tok1"),
                   "gap_recovered_nll_after_tok1": nll_gap("ref_nll_after")}
    if "small-lora" in by and best == "stitched-lora":
        # what the stitched cache adds beyond the LoRA training itself (> 0: stitching helps), after token 1:
        # token 1 of the stitched system is the large model's own prediction, a gain the cache has no part in
        ctl, st_row = by["small-lora"], by[best]
        if None not in (ctl["ref_nll_after"], st_row["ref_nll_after"]):
            rec.summary["stitch_gain_nll_after_tok1_over_lora_control"] = (ctl["ref_nll_after"]
                                                                          - st_row["ref_nll_after"])
        if None not in (ctl["ref_nll_tok1"], st_row["ref_nll_tok1"]):
            rec.summary["stitch_gain_nll_tok1_over_lora_control"] = ctl["ref_nll_tok1"] - st_row["ref_nll_tok1"]
        ci["stitched-lora_minus_small-lora"] = _ci(items, lambda m: m["stitched-lora"] - m["small-lora"])
    rec.metrics["kv_handover_vs_large"] = by[best]["kv_vs_large"]
    sm, lg, st = by["small"]["rougeL"], by["large"]["rougeL"], by[best]["rougeL"]
    rec.metrics["interpolates_rougeL"] = interpolates(sm, lg, st)
    if not significant:
        lo, hi = gap_ci["lo"], gap_ci["hi"]
        span = (f"[{lo:+.4f}, {hi:+.4f}]" if lo is not None else
                f"undefined with fewer than {MIN_CI_PROMPTS} prompts" if len(ref_texts) < MIN_CI_PROMPTS else "undefined")
        rec.notes.append(f"the small-to-large ROUGE-L gap ({lg - sm:+.4f}; 95% paired-bootstrap interval {span} over "
                         f"{len(ref_texts)} prompts) is not clearly above 0: gap_recovered_rougeL is left out (the "
                         "raw ratio, not meaningful, is in metrics.gap_recovered; more --prompts, or a pair that "
                         "differs more)")
    if goal_gap is not None:
        rec.check(f"gap_recovered_rougeL>={goal_gap}", gap_l is not None and significant and gap_l >= goal_gap,
                  {"gap_recovered": gap_l, "gap_recovered_ci95": [ci["gap_recovered"]["lo"], ci["gap_recovered"]["hi"]],
                   "small": sm, "large": lg, "stitched": st, "gap_significant": significant})
    rec.notes.append("timings: ttft_ms = prefill of a whole batch incl. the first token (stitched: large prefill + "
                     f"stitches + hand-over), tpot_ms = median decode step of the batch, batch={batch}, on {device}")
    return rec
