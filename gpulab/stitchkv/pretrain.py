"""Train a tiny Llama pair (large, small) from scratch on a text file with one shared tokenizer.

The tokenizer (byte-level BPE) is trained on the training split of the text; both models get a
copy of it, so the pair shares the vocabulary exactly. Both models see the same token windows
(same seed) for the same number of steps; the larger one should reach a clearly lower validation
loss, which is what makes the small-to-large ROUGE gap that stitching should recover.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from gpulab.core.device import bf16_native
from gpulab.core.errors import InputError
from gpulab.core.files import blocking_file
from gpulab.stitchkv.step_losses import StepLosses


def lm_batches(ids: Any, lo: int, hi: int, batch: int, seq: int, seed: int, repeat_frac: float = 0.0):
    """Endless [batch, seq + 1] windows of ``ids[lo:hi]``; with ``repeat_frac`` > 0 that share of the rows
    (drawn per row) ends in a passage followed by itself again (a passage of a quarter to a half of the window,
    drawn per row, so the distance back varies): what teaches in-context copying by content (the recall task of
    :mod:`gpulab.stitchkv.data`). The passage is the window's own text with its tokens shuffled (as the recall
    task's passages are): text tokens in an order found nowhere in the text, so that only copying from the
    context predicts its repeat. (Repeating the text itself taught no copying: a 4-layer model that had
    memorized the training text predicted the repeat from memory; 6,000 CPU steps: training-text loss 0.92
    against 4.66 on held-out text. Half shuffled, half natural passages formed no copying in 4,000 CPU steps;
    shuffled ones alone: 99.5% of held-out shuffled repeats predicted after 4,000 steps, BENCHMARKS.md.)"""
    import torch

    if hi - lo < seq + 2:
        raise InputError(f"the text split has {hi - lo} tokens, fewer than one --seq-len window of {seq + 1}")
    if not 0.0 <= repeat_frac <= 1.0:
        raise InputError(f"--repeat-frac must be in [0, 1], got {repeat_frac}")
    g = torch.Generator().manual_seed(seed)
    n = seq + 1
    while True:
        starts = torch.randint(lo, hi - seq - 1, (batch,), generator=g)
        w = torch.stack([ids[s: s + n] for s in starts.tolist()])
        if repeat_frac > 0:
            rep = torch.rand(batch, generator=g) < repeat_frac
            lens = torch.randint(max(1, n // 4), n // 2 + 1, (batch,), generator=g)
            for r in torch.nonzero(rep).flatten().tolist():
                h = int(lens[r])
                passage = w[r, n - 2 * h: n - h][torch.randperm(h, generator=g)]
                w[r, n - 2 * h: n - h] = passage
                w[r, n - h:] = passage
        yield w


def val_loss(model: Any, ids: Any, lo: int, hi: int, seq: int, device: str, n_windows: int = 32) -> float:
    import torch
    import torch.nn.functional as F

    n = min(n_windows, max(1, (hi - lo - 1) // (seq + 1)))
    starts = [lo + i * ((hi - lo - seq - 1) // n) for i in range(n)]
    w = torch.stack([ids[s: s + seq + 1] for s in starts]).to(device)
    with torch.no_grad():
        logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))


def train_lm(model: Any, ids: Any, split: int, steps: int, batch: int, seq: int, lr: float, seed: int,
             device: str, log: Any = print, name: str = "", repeat_frac: float = 0.0,
             lr_flag: str = "--lr") -> list[float]:
    """AdamW (warm-up, cosine decay to 10%) on next-token prediction; the per-step losses, all finite (a
    non-finite one is a one-line error naming the step and ``lr_flag``)."""
    import torch
    import torch.nn.functional as F

    model.to(device).train()
    cuda = str(device).startswith("cuda")
    # on a GPU these tiny models are bound by launches and host work, not by the device: the fused AdamW (one
    # kernel), pinned non-blocking batch copies and losses kept on the device (read at the log lines only) let
    # the host queue the next step while the device runs this one
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if cuda else {}))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))))
    losses = StepLosses(None, device, steps, [], f"pretrain {name}".strip(), lr_flag)
    it = lm_batches(ids, 0, split, batch, seq, seed, repeat_frac)
    use_bf16 = bf16_native(device)  # bf16 autocast where native, else the tiny models train in fp32
    t0 = time.perf_counter()
    for step in range(steps):
        w = next(it)
        w = w.pin_memory().to(device, non_blocking=True) if cuda else w.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=w[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.add(step, loss)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            v = losses.read(step + 1)[step]
            log(f"pretrain {name} step {step}: loss {v:.4f} ({time.perf_counter() - t0:.1f} s)")
    model.eval()
    return losses.read(steps)


def check_options(large_size: str, small_size: str, vocab: int, steps: int, batch: int, seq: int, lr: float,
                  repeat_frac: float, flag_prefix: str = "") -> None:
    """One-line errors for pretraining options that cannot work; ``flag_prefix`` names the options in them
    (kvstitch tiny's are --pretrain-steps, --pretrain-batch, --pretrain-lr)."""
    from gpulab.stitchkv.models import TINY_SIZES, check_vocab

    check_vocab(vocab)
    for s in (large_size, small_size):
        if s not in TINY_SIZES:
            raise InputError(f"unknown model size {s!r} (known: {', '.join(TINY_SIZES)})")
    flag = f"--{flag_prefix}"
    if steps < 1 or batch < 1 or seq < 2:
        raise InputError(f"{flag}steps and {flag}batch must be >= 1 and --seq-len >= 2 (got {steps}, {batch}, {seq})")
    if not lr > 0:
        raise InputError(f"{flag}lr must be > 0, got {lr}")
    if not math.isfinite(lr):  # one step at an infinite rate makes every weight NaN
        raise InputError(f"{flag}lr must be a finite number, got {lr}")
    if not 0.0 <= repeat_frac <= 1.0:
        raise InputError(f"--repeat-frac must be in [0, 1], got {repeat_frac}")


def pretrain_pair(data: Path, out: Path, large_size: str, small_size: str, vocab: int, steps: int, batch: int,
                  seq: int, lr: float, seed: int, device: str, log: Any = print,
                  repeat_frac: float = 0.0, flag_prefix: str = "") -> dict[str, Any]:
    import torch

    from gpulab.stitchkv.data import VAL_FRACTION, read_text
    from gpulab.stitchkv.models import save_model, shape_of, tiny_llama, train_tokenizer

    check_options(large_size, small_size, vocab, steps, batch, seq, lr, repeat_frac, flag_prefix)
    if (q := blocking_file(out, include_self=True)) is not None:  # refused now, not at the first save
        raise InputError(f"{out}: {q} is not a folder (the pair's models are written there)")
    text = read_text(data)
    cut = int(len(text) * 0.9)
    t0 = time.perf_counter()
    tok = train_tokenizer(text[:cut], vocab)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    # never past the evaluation's split (load_corpus: 90% of the tokens): where the last tenth of the text has
    # fewer tokens per character than the rest, 90% of the characters would reach into the eval windows
    split = min(len(tok(text[:cut], add_special_tokens=False)["input_ids"]), int(len(ids) * (1 - VAL_FRACTION)))
    tok_s = time.perf_counter() - t0
    rows, trained = [], []
    for role, size in (("large", large_size), ("small", small_size)):
        t1 = time.perf_counter()
        model = tiny_llama(size, len(tok), max(2 * seq, 512), seed=seed + (0 if role == "large" else 1))
        hist = train_lm(model, ids, split, steps, batch, seq, lr, seed, device, log, role, repeat_frac,
                        f"--{flag_prefix}lr")
        vl = val_loss(model, ids, split, len(ids), seq, device)  # on plain text windows
        trained.append((role, model.to("cpu")))
        sh = shape_of(model)
        rows.append({"model": role, "size": size, "params": sum(p.numel() for p in model.parameters()),
                     "layers": sh["layers"], "hidden": sh["hidden"], "kv_heads": sh["kv_heads"],
                     "head_dim": sh["head_dim"], "steps": steps, "train_loss_last": hist[-1],
                     "val_loss": vl, "seconds": time.perf_counter() - t1})
    for role, model in trained:  # both trained before either is saved: a failure in the small one's training
        save_model(model, tok, out / role)  # leaves no new large/ beside the old small/
    return {"rows": rows, "vocab": len(tok), "tokens": int(len(ids)), "train_tokens": split,
            "tokenizer_seconds": tok_s, "large": str(out / "large"), "small": str(out / "small")}
