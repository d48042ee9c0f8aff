"""Edge cases checked against plain torch references: the ridge least-squares fit and its R^2, the warm-up
loss and NMSE, the stage-2 LM loss and the reference NLL (incremental token-by-token decodes), eval's
per-token NLL averaging and its ROUGE references, the train/validation split and the LoRA targets."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gpulab.stitchkv.models import cache_kwarg, output_cache, shape_of
from gpulab.stitchkv.stitch import alignment, make_bank, stitched_cache


def _uniform_bank(large, small, mode):
    """A fresh stitch bank from ``large`` to ``small`` (uniform-nearest layer alignment) and the alignment."""
    ls, ss = shape_of(large), shape_of(small)
    align = alignment("uniform-nearest", ls["layers"], ss["layers"])
    return make_bank(ls, ss, align, mode), align


def _incremental_logits(small, cache, tokens):
    """Logits after each of ``tokens`` [B, n], fed one at a time into ``cache`` (the plain decode loop)."""
    kw = cache_kwarg(small)
    out = []
    for j in range(tokens.shape[1]):
        o = small(input_ids=tokens[:, j:j + 1], use_cache=True, **{kw: cache})
        cache = output_cache(o)
        out.append(o.logits[:, -1].float())
    return torch.stack(out, 1)  # [B, n, V]


def _ridge_reference(x, y, ridge):
    """[W; b] minimising ||X W + b - Y||^2 + lam ||W||^2 (the bias not penalised), with lam = ridge * mean(diag(X^T
    X)), by an SVD solver on the augmented system (no normal equations)."""
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    lam = ridge * float((x * x).sum(0).mean())
    k = x.shape[1]
    a = torch.cat([x1, torch.cat([lam ** 0.5 * torch.eye(k, dtype=x.dtype), torch.zeros(k, 1, dtype=x.dtype)], 1)])
    b = torch.cat([y, torch.zeros(k, y.shape[1], dtype=y.dtype)], 0)
    w = torch.linalg.lstsq(a, b, driver="gelsd").solution
    pred = x1 @ w
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / float(((y - y.mean(0)) ** 2).sum())
    return w, r2


@pytest.mark.parametrize("mode", ["kv", "hidden"])
def test_least_squares_init_is_the_ridge_solution_with_centered_r2(models, mode):
    """A strong ridge (0.3) so that its sign and its scale matter; R^2 against the target's mean (not zero)."""
    from gpulab.stitchkv.stitch import least_squares_init

    large, small = models
    bank, align = _uniform_bank(large, small, mode)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 300, (2, 9)) for _ in range(2)]
    r2 = least_squares_init(bank, large, small, prompts, ridge=0.3)
    with torch.no_grad():
        xs, ys = {}, {}
        for p in prompts:
            hl = large(input_ids=p, output_hidden_states=True).hidden_states
            hs = small(input_ids=p, output_hidden_states=True).hidden_states
            for l, a in enumerate(align):
                xa = large.model.layers[a].input_layernorm(hl[a])
                xl = small.model.layers[l].input_layernorm(hs[l])
                if mode == "kv":
                    la, sl = large.model.layers[a].self_attn, small.model.layers[l].self_attn
                    pairs = {"k": (la.k_proj(xa), sl.k_proj(xl)), "v": (la.v_proj(xa), sl.v_proj(xl))}
                else:
                    pairs = {"h": (xa, xl)}
                for name, (x, y) in pairs.items():
                    xs.setdefault(f"{name}{l}", []).append(x.reshape(-1, x.shape[-1]).double())
                    ys.setdefault(f"{name}{l}", []).append(y.reshape(-1, y.shape[-1]).double())
    assert set(r2) == set(xs)
    for key in xs:
        w, want_r2 = _ridge_reference(torch.cat(xs[key]), torch.cat(ys[key]), 0.3)
        l = int(key[1:])
        lin = bank.maps[l] if key[0] == "h" else (bank.kmaps[l] if key[0] == "k" else bank.vmaps[l])
        torch.testing.assert_close(lin.weight.detach().double(), w[:-1].T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lin.bias.detach().double(), w[-1], rtol=1e-4, atol=1e-5)
        assert r2[key] == pytest.approx(want_r2, abs=1e-6), key


def _random_kv(seed, n_layers=2, shape=(2, 1, 5, 16)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) + 1.5, torch.randn(shape, generator=g) * 3 - 2) for _ in range(n_layers)]


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_kv_loss_compares_k_with_k_and_v_with_v(kind):
    from gpulab.stitchkv.train import kv_loss

    pred, target = _random_kv(0), _random_kv(1)
    fn = (lambda a, b: ((a - b) ** 2).mean()) if kind == "mse" else (lambda a, b: (a - b).abs().mean())
    want = sum(0.5 * (fn(pk, tk) + fn(pv, tv)) for (pk, pv), (tk, tv) in zip(pred, target)) / len(pred)
    assert float(kv_loss(pred, target, kind)) == pytest.approx(float(want), rel=1e-6)
    assert float(kv_loss(target, target, kind)) == 0.0


def test_nmse_is_one_minus_r2_against_each_tensors_mean():
    from gpulab.stitchkv.train import nmse, nmse_parts

    pred, target = _random_kv(0), _random_kv(1)
    num = sum(float(((p - t) ** 2).sum()) for pt, tt in zip(pred, target) for p, t in zip(pt, tt))
    den = sum(float(((t - t.mean()) ** 2).sum()) for tt in target for t in tt)
    assert nmse_parts(pred, target) == pytest.approx((num, den), rel=1e-9)
    assert nmse(pred, target) == pytest.approx(num / den, rel=1e-9)
    # predicting every tensor's own mean explains nothing: NMSE 1 (whatever the targets' offsets)
    means = [tuple(torch.full_like(t, float(t.mean())) for t in tt) for tt in target]
    assert nmse(means, target) == pytest.approx(1.0, rel=1e-6)


def test_stage2_lm_loss_is_the_next_token_loss_of_an_incremental_decode(models):
    """cont[:, :-1] fed after the stitched cache predicts cont[:, 1:] (token 1 is the large model's)."""
    from gpulab.stitchkv.train import lm_loss_stitched

    large, small = models
    bank, _ = _uniform_bank(large, small, "kv")
    torch.manual_seed(4)
    prompt, cont = torch.randint(0, 300, (2, 7)), torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        got = float(lm_loss_stitched(large, small, bank, prompt, cont))
        _, cache = stitched_cache(large, small, bank, prompt)
        lg = _incremental_logits(small, cache, cont[:, :-1])
        want = float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), cont[:, 1:].reshape(-1)))
    assert got == pytest.approx(want, abs=1e-5)


def test_reference_nll_of_the_stitched_system_per_position(models):
    """Position 0 from the large model's prefill logits, position j from the small model after ref[:, :j], each
    summed over the batch."""
    from gpulab.stitchkv.evaluate import _nll_own, _nll_stitched

    large, small = models
    bank, _ = _uniform_bank(large, small, "hidden")
    torch.manual_seed(5)
    prompt, ref = torch.randint(0, 300, (3, 6)), torch.randint(0, 300, (3, 4))
    with torch.no_grad():
        got = _nll_stitched(large, small, bank, prompt, ref)
        logits0, cache = stitched_cache(large, small, bank, prompt)
        first = F.cross_entropy(logits0.float(), ref[:, 0], reduction="none").sum()
        lg = _incremental_logits(small, cache, ref[:, :-1])
        rest = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ref[:, 1:].reshape(-1), reduction="none")
        want = torch.cat([first[None], rest.view(3, -1).sum(0)])
        assert got.shape == (4,)
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-4)
        # the model's own path: position j predicted after prompt + ref[:, :j]
        own = _nll_own(small, prompt, ref)
        full = small(input_ids=torch.cat([prompt, ref], 1)).logits.float()
        per = [F.cross_entropy(full[:, prompt.shape[1] - 1 + j], ref[:, j], reduction="sum") for j in range(4)]
        torch.testing.assert_close(own.float(), torch.stack(per), rtol=1e-5, atol=1e-4)


def test_run_variant_ref_nll_is_a_per_token_mean_over_prompts(models, tokenizer):
    """Batches of 3 and 1 prompts: ref_nll averages over every reference token of every prompt."""
    from gpulab.stitchkv.evaluate import run_variant

    large, small = models
    torch.manual_seed(6)
    p1, r1 = torch.randint(2, 300, (3, 5)), torch.randint(2, 300, (3, 3))
    p2, r2 = torch.randint(2, 300, (1, 8)), torch.randint(2, 300, (1, 3))
    pair = type("P", (), {"large": large, "small": small})()
    row, _, items, curve = run_variant("small", pair, small, None, [(p1, r1, [0, 1, 2]), (p2, r2, [3])], tokenizer,
                                       ["the king"] * 4, 2, "cpu")
    with torch.no_grad():
        nll = []
        for p, r in ((p1, r1), (p2, r2)):
            lg = small(input_ids=torch.cat([p, r], 1)).logits.float()[:, p.shape[1] - 1:-1]
            nll.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), r.reshape(-1), reduction="none").view(r.shape))
        nll = torch.cat(nll)  # [4 prompts, 3 positions]
    assert row["ref_nll"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert row["ref_nll_tok1"] == pytest.approx(float(nll[:, 0].mean()), rel=1e-5)
    assert row["ref_nll_after"] == pytest.approx(float(nll[:, 1:].mean()), rel=1e-5)
    assert curve == pytest.approx(nll.mean(0).tolist(), rel=1e-5)
    assert len(items) == 4


def test_eval_scores_against_the_continuation_not_the_prompt(tiny_run):
    """ROUGE references of a text corpus are the held-out continuations alone."""
    import yaml

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv import evaluate as E
    from gpulab.stitchkv.models import load_tokenizer

    cfg = yaml.safe_load((tiny_run / "run.yaml").read_text())
    rec = E.evaluate(tiny_run, "cpu", 3, 6, 4, 3, log=lambda m: None)
    tok = load_tokenizer(cfg["small"], "small")
    windows = D.eval_windows(D.load_corpus(cfg["data"], tok), 3, 6, 4)
    want = [tok.decode(r.tolist(), skip_special_tokens=True) for _, r in windows]
    assert rec.metrics["references"] == want


def test_text_corpus_splits_train_first_validation_last(corpus_file, tokenizer):
    from gpulab.stitchkv import data as D

    c = D.load_corpus(corpus_file, tokenizer, val_fraction=0.25)
    n = len(c.ids)
    assert c.split == int(n * 0.75)
    ids = c.ids.tolist()
    train = ids[:c.split]
    # every training window lies inside the first 75%, every evaluation window inside the last 25%
    it = D.train_batches(c, 8, 5, 3, 0)
    for _ in range(5):
        p, cont = next(it)
        for row in torch.cat([p, cont], 1).tolist():
            assert any(train[i:i + 8] == row for i in range(c.split - 8 + 1))
    for p, r in D.eval_windows(c, 4, 5, 3):
        row = p.tolist() + r.tolist()
        assert any(ids[i:i + 8] == row for i in range(c.split, n - 8 + 1))


def test_lora_goes_on_every_named_target_and_nowhere_else(models):
    from gpulab.stitchkv.train import with_lora

    _, small = models
    for targets in ("q_proj,k_proj,v_proj,o_proj", "k_proj,v_proj"):
        m = with_lora(copy.deepcopy(small), {"lora_r": 2, "lora_alpha": 4, "lora_targets": targets})
        want = set(targets.split(","))
        for layer in m.get_base_model().model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                has = hasattr(getattr(layer.self_attn, name), "lora_A")
                assert has == (name in want), (targets, name)
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_jsonl_training_prompts_keep_the_end_of_a_long_prompt(tokenizer, tmp_path):
    """A .jsonl prompt longer than --prompt-len is cut to its last tokens (the ones next to the reference), in
    training as in eval; references keep their first --cont-len tokens."""
    import json

    from gpulab.stitchkv import data as D

    recs = [{"prompt": f"the king {i} and the queen of night speak of love and death", "reference": f"sword {i} of day"}
            for i in range(6)]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    c = D.load_corpus(j, tokenizer)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    heads = {tuple(enc(r["prompt"])[-3:]): enc(r["reference"])[:2] for r in recs[:c.split]}
    assert all(len(enc(r["prompt"])) > 3 for r in recs)
    it = D.train_batches(c, 1, 3, 2, 0)
    for _ in range(6):
        p, r = next(it)
        assert tuple(p[0].tolist()) in heads and r[0].tolist() == heads[tuple(p[0].tolist())]
    (p, r), = D.eval_windows(c, 1, 3, 2)[:1]
    assert p.tolist() == enc(recs[c.split]["prompt"])[-3:] and r.tolist() == enc(recs[c.split]["reference"])[:2]


def test_sliding_window_pairs_refuse_sequences_past_the_window():
    from types import SimpleNamespace as NS

    from gpulab.core.errors import InputError
    from gpulab.stitchkv.models import check_length

    plain = NS(config=NS(model_type="llama"))
    mistral = NS(config=NS(model_type="mistral", sliding_window=16))
    qwen_off = NS(config=NS(model_type="qwen2", sliding_window=16, use_sliding_window=False))
    check_length(NS(large=plain, small=mistral), 15)
    check_length(NS(large=qwen_off, small=plain), 100)  # Qwen2 declares a window it does not use
    with pytest.raises(InputError, match="--small model attends over a sliding window of 16 tokens"):
        check_length(NS(large=plain, small=mistral), 16)


def test_tokenizers_with_one_vocabulary_that_encode_differently(pair_dirs, tmp_path):
    """Same vocabulary and special tokens, another pre-tokenizer: a real mismatch the vocabulary check missed."""
    import json
    import shutil

    from gpulab.core.errors import InputError
    from gpulab.stitchkv.models import load_pair

    other = tmp_path / "small"
    shutil.copytree(pair_dirs[1], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InputError, match="same vocabulary, but they encode"):
        load_pair(pair_dirs[0], other, device="cpu")


def test_evaluation_windows_may_not_overlap():
    from gpulab.core.errors import InputError
    from gpulab.stitchkv.data import Corpus, eval_windows

    corpus = Corpus(path=None, ids=torch.arange(1000), split=900)  # 100 validation tokens
    wins = eval_windows(corpus, 3, 16, 8)  # 3 windows of 24 tokens, starts at least 24 apart
    starts = [int(p[0]) for p, _ in wins]
    assert len(wins) == 3 and all(b - a >= 24 for a, b in zip(starts, starts[1:]))
    with pytest.raises(InputError, match="room for 3 windows of 24 tokens"):
        eval_windows(corpus, 4, 16, 8)


def test_pretraining_stops_at_the_evaluation_split(corpus_file, tmp_path):
    """90% of the characters can be more than 90% of the tokens: pretraining never reaches the eval windows."""
    from gpulab.stitchkv.data import VAL_FRACTION
    from gpulab.stitchkv.pretrain import pretrain_pair

    head = corpus_file.read_text()[:20000]
    word = "zqzqzqzqzqzq "  # frequent in the head: the tokenizer learns it whole, so the tail is few tokens long
    head = "".join(ln + " " + word for ln in head.splitlines())
    f = tmp_path / "t.txt"
    f.write_text(head + word * (len(head) // (9 * len(word))))  # the last tenth of the characters
    info = pretrain_pair(f, tmp_path / "pair", "nano-large", "nano-small", 300, steps=1, batch=2, seq=16, lr=1e-3, seed=0,
                         device="cpu", log=lambda m: None)
    assert info["train_tokens"] <= int(info["tokens"] * (1 - VAL_FRACTION))


def test_sequences_past_a_models_context_are_refused():
    """A model runs past its context (max_position_embeddings) at positions it was never trained on: refused,
    for either model, from loaded models and from config.json alone (serve-disagg checks before loading)."""
    from types import SimpleNamespace as NS

    from gpulab.core.errors import InputError
    from gpulab.stitchkv.models import check_length, check_lengths

    big, small = NS(config=NS(model_type="llama", max_position_embeddings=64)), NS(config=NS(model_type="llama",
                                                                                           max_position_embeddings=32))
    check_length(NS(large=big, small=small), 32)
    with pytest.raises(InputError, match="the --small model's context is 32 tokens, and these sequences reach 33"):
        check_length(NS(large=big, small=small), 33)
    check_lengths([("large", NS())], 10**6)  # a config without the key: nothing to check


def test_serve_disagg_refuses_sequences_past_a_models_context_before_loading(tiny_run):
    """serve-disagg's validate reads both config.json files: --prompt-len + --gen-len past a context (256 tokens
    here) is a one-line error before any process starts (it ran at untrained positions)."""
    from gpulab.core.errors import InputError
    from gpulab.stitchkv import disagg

    disagg.validate(tiny_run, "auto", 1, 4, 1, prompt_len=8)
    with pytest.raises(InputError, match="the --large model's context is 256 tokens, and these sequences reach 257"):
        disagg.validate(tiny_run, "auto", 1, 4, 1, prompt_len=253)
