"""``gpulab perplexity MODEL_DIR [MODEL_DIR ...]``: what FP8 costs in quality, on a text.

The text (``--text``, tinyshakespeare by default) is tokenized once and cut into non-overlapping windows
of ``--context`` tokens; every model scores each token of a window after its first (teacher forcing)
with vajra's own forward: the paged, flattened (varlen) prefill the engine runs, ``--batch`` windows per
forward, the log-softmax taken in float32 over chunks of rows. A window starts cold (nothing carried
over from the one before, as the usual evaluation with stride = context). With ``--bos`` (the default
where the tokenizer has a BOS token, as the models saw in training and as lm-eval's rolling loglikelihood)
each window begins with BOS and every text token is scored; with ``--no-bos`` a window's first text token
is context only.

Per model: mean negative log-likelihood (nats per token), perplexity ``exp(nll)``, tokens scored and
tokens/s. With several models, each is set against the first (e.g. an FP8 checkpoint of ``gpulab
quantize`` against its bf16 source): the NLL difference with a 95% paired-bootstrap interval over
windows, and the top-1 agreement (how often both predict the same next token). The models must share
the tokenizer (the same token ids for the text).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import typer

from gpulab.core.errors import InputError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Perplexity of one or more models on a text, each against the first.")

BLOCK_SIZE = 16
LOGITS_ROWS = 1024  # rows of [rows, vocab] float32 logits at a time (128k vocab: 0.5 GB)


def make_windows(ids: list[int], context: int, max_tokens: int = 0, bos: Optional[int] = None) -> list[list[int]]:
    """Non-overlapping windows of ``context`` tokens from the first ``max_tokens`` (0: all); a tail shorter
    than 2 tokens predicts nothing and is dropped. With ``bos``, each window is ``bos`` then ``context - 1``
    text tokens, so that every text token is scored, the first of a window after ``bos`` alone."""
    if context < 2:
        raise InputError(f"--context must be >= 2, got {context}")
    if max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (0: the whole text), got {max_tokens}")
    if max_tokens:
        ids = ids[:max_tokens]
    if bos is not None:
        step = context - 1
        return [[bos] + ids[i:i + step] for i in range(0, len(ids), step)]
    wins = [ids[i:i + context] for i in range(0, len(ids), context)]
    return [w for w in wins if len(w) >= 2]


def score_windows(model: Any, windows: list[list[int]], batch: int) -> tuple[list[float], list[int], Any]:
    """(NLL sum per window, tokens scored per window, top-1 predictions as one int64 CPU tensor in window
    order) for ``windows`` scored by ``model`` (a vajra LlamaModel), ``batch`` windows per forward."""
    import torch

    from gpulab.vajra.interface import ForwardBatch

    dev = model.device
    per_seq = -(-max(len(w) for w in windows) // BLOCK_SIZE)  # KV blocks a window needs
    kv = model.allocate_kv_cache(per_seq * min(batch, len(windows)), BLOCK_SIZE)
    sums: list[float] = []
    counts: list[int] = []
    preds = []
    for start in range(0, len(windows), batch):
        group = windows[start:start + batch]
        lens = [len(w) for w in group]
        flat = torch.tensor([t for w in group for t in w], dtype=torch.long)
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        # row r of the flattened step predicts token r + 1 of the same window
        src = torch.cat([torch.arange(o, o + n - 1) for o, n in zip(offsets, lens)])
        owner = torch.cat([torch.full((n - 1,), j, dtype=torch.long) for j, n in enumerate(lens)])
        fb = ForwardBatch(
            input_ids=flat.to(dev),
            positions=torch.cat([torch.arange(n) for n in lens]).to(dev),
            query_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.cat([j * per_seq * BLOCK_SIZE + torch.arange(n) for j, n in enumerate(lens)]).to(dev),
            block_tables=torch.arange(len(group) * per_seq, dtype=torch.int32, device=dev).view(len(group), per_seq),
        )
        nll = torch.zeros(len(group), dtype=torch.float64)
        with torch.inference_mode():
            _, states = model.forward_rows(fb, kv, src.to(dev))  # the rows' normed states, as the engine's echo
            for r0 in range(0, src.numel(), LOGITS_ROWS):
                lp = torch.log_softmax(model.logits(states[r0:r0 + LOGITS_ROWS]), dim=-1)
                tgt = flat[src[r0:r0 + LOGITS_ROWS] + 1].to(dev)
                tok_nll = -lp.gather(1, tgt[:, None])[:, 0]
                nll.index_add_(0, owner[r0:r0 + LOGITS_ROWS], tok_nll.double().cpu())
                preds.append(lp.argmax(dim=-1).cpu())
            del states
        sums += nll.tolist()
        counts += [n - 1 for n in lens]
    return sums, counts, torch.cat(preds)


def nll_difference_ci(first_sums: list[float], sums: list[float], counts: list[int], reps: int = 2000,
                      seed: int = 0) -> dict[str, float | None]:
    """95% paired-bootstrap interval of the token-weighted NLL difference (the one reported: summed NLL over
    summed tokens), resampling windows: each resample's summed difference over its summed tokens, so a short
    tail window weighs as little as its tokens. ``{"lo", "hi"}``, None with fewer than 2 windows."""
    from gpulab.core.stats import paired_bootstrap

    if len(counts) < 2:
        return {"lo": None, "hi": None}
    ci = paired_bootstrap({"first": first_sums, "this": sums, "tokens": counts},
                          lambda mean: (mean["this"] - mean["first"]) / mean["tokens"], reps=reps, seed=seed)
    return {"lo": ci["lo"], "hi": ci["hi"]}


def _encode(tok: Any, text: str) -> list[int]:
    """Token ids of a whole text, no special tokens (the Rust tokenizer where there is one: transformers'
    encode warns about texts longer than the model's context)."""
    fast = getattr(tok, "_fast", None)
    if fast is not None:
        return list(fast.encode(text, add_special_tokens=False).ids)
    return tok.encode(text, add_special_tokens=False)


def _label(model_dir: Path, used: set[str]) -> str:
    base = model_dir.resolve().name or "model"
    name, i = base, 2
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


def run(models: list[Path], text_file: Path, context: int, max_tokens: int, batch: int, load_format: str,
        attention_backend: str, bootstrap_reps: int = 2000, bos: Optional[bool] = None) -> Any:
    """``bos``: None, each window begins with the tokenizer's BOS when it has one; True, it must have one;
    False, no BOS."""
    import torch

    from gpulab.core import options, results
    from gpulab.core.files import read_model_config
    from gpulab.vajra.detokenizer import load_tokenizer
    from gpulab.vajra.load import load_model

    if not models:
        raise InputError("give at least one MODEL_DIR")
    make_windows([], context, max_tokens)  # --context and --max-tokens checked before the text is read
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    if bootstrap_reps < 1:
        raise InputError(f"--bootstrap-reps must be >= 1, got {bootstrap_reps}")
    for m in models:
        cfg = read_model_config(m)
        limit = cfg.get("max_position_embeddings")
        if isinstance(limit, int) and context > limit:
            raise InputError(f"--context {context} is longer than {m}'s max_position_embeddings ({limit})")
    from gpulab.core.files import read_utf8_text

    text = read_utf8_text(text_file, f"--text {text_file}")
    ids = None
    bos_ids = set()
    for m in models:
        tok = load_tokenizer(m)
        mine = _encode(tok, text)
        if ids is not None and mine != ids:
            raise InputError(f"{m}: its tokenizer gives other token ids for the text than {models[0]}'s; "
                             "perplexities are comparable only under one tokenizer")
        ids = mine
        bos_ids.add(getattr(tok.hf, "bos_token_id", None))
    if len(bos_ids) > 1 and bos is not False:  # --no-bos: no BOS is used, only the text's ids must agree
        raise InputError(f"the models' tokenizers have different BOS tokens ({sorted(map(str, bos_ids))})")
    bos_id = bos_ids.pop() if bos is not False else None
    if bos and bos_id is None:
        raise InputError(f"--bos: {models[0]}'s tokenizer has no BOS token (use --no-bos)")
    for m in models:  # an id past a model's vocabulary: an index error on the CPU, a device assert on a GPU
        vocab = read_model_config(m).get("vocab_size")
        top = max([*ids, *([bos_id] if bos_id is not None else [])], default=-1)
        if isinstance(vocab, int) and top >= vocab:
            raise InputError(f"{m}: the tokenizer gives token id {top}, outside the model's vocabulary [0, {vocab})")
    windows = make_windows(ids, context, max_tokens, bos_id)
    if not windows:
        raise InputError(f"--text {text_file}: {len(ids)} token(s), too few to score (a window needs 2)")
    device = options.resolve_device(what="gpulab perplexity")
    rec = results.Record(name="perplexity", config={
        "models": [str(m) for m in models], "text": str(text_file), "context": context, "max_tokens": max_tokens,
        "batch": batch, "load_format": load_format, "attention_backend": attention_backend, "device": device,
        "windows": len(windows), "text_tokens": len(ids), "bos": bos_id})
    used: set[str] = set()
    window_sums: dict[str, list[float]] = {}  # NLL summed over each window's tokens, per model
    first_preds = None
    first = None
    for m in models:
        label = _label(m, used)
        t0 = time.perf_counter()
        model = load_model(m, device=device, load_format=load_format, attention_backend=attention_backend,
                           max_model_len=context)
        load_s = time.perf_counter() - t0
        if device.startswith("cuda"):  # kernel builds and autotuning out of the timed pass
            score_windows(model, windows[:1], 1)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sums, counts, preds = score_windows(model, windows, batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        n = sum(counts)
        nll = sum(sums) / n
        finite = math.isfinite(nll)
        rec.check(f"{label}: every token scored, NLL finite", finite and n == sum(len(w) - 1 for w in windows),
                  None if finite else f"nll={nll}")
        window_sums[label] = sums
        ppl = math.exp(nll) if finite and nll < 700 else None
        m_rec: dict[str, Any] = {"quant": _quant_name(model), "tokens": n, "nll": nll, "ppl": ppl,
                                 "load_s": load_s, "score_s": secs, "tok_s": n / secs if secs > 0 else None}
        row: dict[str, Any] = {"model": label, "quant": m_rec["quant"], "tokens": n, "nll": round(nll, 5),
                               "ppl": None if ppl is None else round(ppl, 4),
                               "tok/s": None if m_rec["tok_s"] is None else int(round(m_rec["tok_s"]))}
        if first is None:
            first, first_preds = label, preds
        else:
            ci = nll_difference_ci(window_sums[first], sums, counts, bootstrap_reps)
            agree = float((preds == first_preds).double().mean())
            m_rec.update(nll_vs_first=nll - rec.metrics[first]["nll"], nll_vs_first_ci95=[ci["lo"], ci["hi"]],
                         top1_agreement=agree)
            lo_hi = "-" if ci["lo"] is None else f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}]"
            row.update({"dNLL vs first": f"{m_rec['nll_vs_first']:+.5f}", "95% CI": lo_hi,
                        "top-1 agree": round(agree, 4)})
        rec.metrics[label] = m_rec
        rec.rows.append(row)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for label, m_rec in rec.metrics.items():
        rec.summary[f"ppl_{label}"] = None if m_rec["ppl"] is None else round(m_rec["ppl"], 4)
        if "nll_vs_first" in m_rec:
            rec.summary[f"nll_vs_first_{label}"] = round(m_rec["nll_vs_first"], 5)
            rec.summary[f"top1_agreement_{label}"] = round(m_rec["top1_agreement"], 4)
    fp8 = [label for label, m_rec in rec.metrics.items() if str(m_rec["quant"]).startswith("fp8")]
    if fp8 and device == "cpu":  # the CPU dequantizes FP8 weights and computes in fp32 (no W8A8 there)
        rec.notes.append(f"{', '.join(fp8)}: on the CPU FP8 weights are dequantized and activations are not "
                         "quantized, so the NLL differences are of the weights alone (input scales are not exercised)")
    if len(windows) < 2 and len(models) > 1:
        rec.notes.append("one window: no interval for the NLL differences (the bootstrap resamples windows)")
    elif len(windows) < 10 and len(models) > 1:
        rec.notes.append(f"only {len(windows)} windows: the bootstrap interval over windows is rough")
    return rec


def _quant_name(model: Any) -> str:
    """e.g. 'fp8 channel/dynamic' or 'none' (the weights as stored)."""
    q = model.quant
    if not q:
        return "none"
    blk = f" {q['block'][0]}x{q['block'][1]}" if q.get("block") else ""
    return f"fp8 {q['weights']}{blk}/{q['activations'] or 'w-only'}"


@app.command()
def perplexity(
    models: list[Path] = typer.Argument(..., metavar="MODEL_DIR", help="Model folders (Hugging Face layout); the first is the baseline."),
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file (default: tinyshakespeare in the "
                                                             "shared data)."),
    context: int = typer.Option(512, "--context", help="Tokens per window (windows do not overlap)."),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Score the first N tokens of the text (0: all)."),
    batch: int = typer.Option(4, "--batch", help="Windows per forward."),
    load_format: str = typer.Option("auto", "--load-format", help="auto | dummy (random weights of the config)."),
    attention_backend: str = typer.Option("auto", "--attention-backend", help="auto | flashinfer | triton | torch"),
    bootstrap_reps: int = typer.Option(2000, "--bootstrap-reps", help="Resamples of the windows for the interval."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Begin each window with the BOS token and score "
                                       "every text token (default: when the tokenizer has one)."),
) -> None:
    """Perplexity of each model on a text, and each against the first (NLL difference, top-1 agreement)."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    from gpulab.core.paths import shared_data

    rec = run(list(models), text or shared_data("tinyshakespeare.txt"), context, max_tokens, batch, load_format,
              attention_backend, bootstrap_reps, bos)
    rec.save()
    rec.print()
