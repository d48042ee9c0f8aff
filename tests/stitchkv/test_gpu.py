"""GPU paths (run on the device with ``pytest -m gpu``): CUDA streams hand-over, bf16 weights, training."""
from __future__ import annotations

import pytest
import torch

from gpulab.stitchkv.generate import greedy, greedy_stitched
from gpulab.stitchkv.models import shape_of, tiny_llama
from gpulab.stitchkv.reference import greedy_no_cache, own_cache
from gpulab.stitchkv.stitch import alignment, cache_tensors, make_bank, stitched_cache
from tests.stitchkv.conftest import SMALL
from tests.stitchkv.test_train import cfg_for

pytestmark = pytest.mark.gpu


def _twin_pair(vocab, dtype):
    small = tiny_llama(SMALL, vocab, 256, seed=2, rope_theta=500.0)
    large = tiny_llama(SMALL, vocab, 256, seed=9, rope_theta=500.0)
    large.load_state_dict(small.state_dict())
    return large.to("cuda", dtype).eval(), small.to("cuda", dtype).eval()


@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_identity_stitch_on_cuda_streams(tokenizer, mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    large, small = _twin_pair(len(tokenizer), torch.float32)
    sh = shape_of(small)
    bank = make_bank(sh, sh, alignment("uniform-nearest", sh["layers"], sh["layers"]), mode).identity_().cuda()
    prompt = torch.randint(0, 300, (4, 24), device="cuda")
    with torch.no_grad():
        _, cache = stitched_cache(large, small, bank, prompt)
        for (k, v), (tk, tv) in zip(cache_tensors(cache), own_cache(small, prompt)):
            torch.testing.assert_close(k, tk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, tv, atol=1e-5, rtol=1e-5)
    g = greedy_stitched(large, small, bank, prompt, 12)  # prefill stream -> event -> decode stream
    assert torch.equal(g.tokens, greedy(small, prompt, 12).tokens)
    assert torch.equal(g.tokens, greedy_no_cache(small, prompt, 12))
    assert g.prefill_ms > 0 and len(g.decode_ms) == 11


def test_bf16_pair_shapes_and_decode(tokenizer):
    large, small = _twin_pair(len(tokenizer), torch.bfloat16)
    sh = shape_of(small)
    bank = make_bank(sh, sh, [0, 1], "kv").cuda()
    prompt = torch.randint(0, 300, (3, 17), device="cuda")
    with torch.no_grad():
        _, cache = stitched_cache(large, small, bank, prompt)
    for (k, v), (tk, tv) in zip(cache_tensors(cache), own_cache(small, prompt)):
        assert k.shape == tk.shape and k.dtype == tk.dtype == torch.bfloat16 and v.shape == tv.shape
    assert greedy_stitched(large, small, bank, prompt, 5).tokens.shape == (3, 5)


def test_train_and_eval_on_cuda(pair_dirs, corpus_file, tmp_path):
    from gpulab.stitchkv import train as T
    from gpulab.stitchkv.evaluate import evaluate

    run = tmp_path / "run"
    res = T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=30, lora_steps=5), "cuda", log=lambda m: None)
    hist = res["warmup"]["loss_history"]
    assert sum(hist[-5:]) / 5 < 0.85 * sum(hist[:3]) / 3
    rec = evaluate(run, "cuda", 6, 12, 6, 3)
    assert rec.ok, rec.checks
    assert {r["variant"] for r in rec.rows} == {"small", "large", "stitched-warmup", "stitched-lora"}


def test_float16_training_on_cuda_is_loss_scaled(pair_dirs, corpus_file, tmp_path):
    from gpulab.stitchkv import store as S
    from gpulab.stitchkv import train as T

    res = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "run", stage="all", steps=4, lora_steps=3,
                          dtype="float16"), "cuda", log=lambda m: None)
    for st in ("warmup", "lora"):
        assert all(h == h and abs(h) != float("inf") for h in res[st]["loss_history"]), st
    assert S.load_bank(tmp_path / "run" / "lora", "cuda").linears()[0].weight.dtype == torch.float32


def test_pretraining_on_cuda_learns_and_logs_its_seconds():
    """The GPU pretraining loop (fused AdamW, pinned non-blocking batches, losses read at the log lines only):
    a tiny model on a repeating token stream goes well below its first loss, and every step's loss comes back."""
    from gpulab.stitchkv.pretrain import train_lm

    model = tiny_llama(SMALL, 64, 256, seed=0)
    ids = torch.arange(4000) % 17  # a period-17 stream: easy to learn
    lines = []
    hist = train_lm(model, ids, 3600, 60, 8, 32, 3e-3, 0, "cuda", lines.append, "t")
    assert len(hist) == 60 and all(isinstance(h, float) and h == h for h in hist)
    assert sum(hist[-5:]) / 5 < 0.5 * hist[0]
    assert lines[-1].startswith("pretrain t step 59: loss") and lines[-1].endswith(" s)")
    assert next(model.parameters()).device.type == "cuda"
