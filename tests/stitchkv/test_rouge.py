"""The built-in ROUGE (used where the rouge-score package is missing, e.g. the GPU test machine)
must agree with rouge-score's RougeScorer(rouge1, rouge2, rougeL, use_stemmer=True)."""
from __future__ import annotations

import random

import pytest

from gpulab.stitchkv.evaluate import _FallbackRouge, rouge_scores


def test_fallback_rouge_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    pytest.importorskip("nltk")
    ref = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    fb = _FallbackRouge()
    words = "The kings running queens loved lovely swords, crowns! night-day 123 thou art is was be not".split()
    rng = random.Random(0)
    for _ in range(300):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        want, got = ref.score(a, b), fb.score(a, b)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert got[k] == pytest.approx(want[k].fmeasure, abs=1e-12), (a, b, k)


def test_rouge_scores_without_rouge_score_package(monkeypatch):
    import sys

    want = rouge_scores(["the king is dead", "long live"], ["the king was dead", "long live the queen"])
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import fails -> built-in scorer
    got = rouge_scores(["the king is dead", "long live"], ["the king was dead", "long live the queen"])
    assert got == pytest.approx(want, abs=1e-12)


def test_rouge_items_refuses_unequal_lists_and_names_the_scorer_that_ran():
    from gpulab.stitchkv.evaluate import _rouge_scorer, rouge_backend, rouge_items

    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        rouge_items(["a", "b"], ["a", "b", "c"])
    assert rouge_backend() == _rouge_scorer()[2]


def test_fallback_rouge_stems_only_words_longer_than_three():
    """rouge-score stems a token only when len > 3: 'its' stays 'its', so it does not match 'it'."""
    r = _FallbackRouge()
    assert r.stem is not None
    assert r.score("its", "it")["rouge1"] == 0.0
    assert r.score("cats", "cat")["rouge1"] == 1.0


def test_fallback_rouge_three_letter_words_match_rouge_score():
    from rouge_score import rouge_scorer

    ref, pred = "its dogs was here", "it dog wa here"
    want = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    got = _FallbackRouge().score(ref, pred)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert abs(got[k] - want[k].fmeasure) < 1e-12, k
