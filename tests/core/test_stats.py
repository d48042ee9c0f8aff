import numpy as np
import pytest

from gpulab.core.stats import gap_fraction, paired_bootstrap


def test_interval_covers_a_real_difference_and_excludes_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(0.3, 0.1, 400)
    scores = {"a": base, "b": base + 0.05 + rng.normal(0, 0.02, 400)}
    r = paired_bootstrap(scores, lambda m: m["b"] - m["a"], reps=500)
    assert r["lo"] <= r["value"] <= r["hi"]
    assert 0.0 < r["lo"] < 0.05 < r["hi"] < 0.06  # paired: the shared item noise cancels


def test_pure_noise_difference_contains_zero():
    rng = np.random.default_rng(2)
    scores = {"a": rng.normal(0.1, 0.05, 64), "b": rng.normal(0.1, 0.05, 64)}
    r = paired_bootstrap(scores, lambda m: m["b"] - m["a"], reps=500)
    assert r["lo"] < 0 < r["hi"]


def test_deterministic_and_ratio_without_gap_has_no_interval():
    scores = {"s": [0.1, 0.2, 0.3], "l": [0.1, 0.2, 0.3], "x": [0.2, 0.2, 0.2]}
    stat = lambda m: gap_fraction(m["s"], m["l"], m["x"])  # noqa: E731
    r = paired_bootstrap(scores, stat, reps=200)
    assert r == {"value": None, "lo": None, "hi": None}
    a = paired_bootstrap({"s": [0, 1, 2], "l": [1, 3, 2]}, lambda m: m["l"] - m["s"], reps=50, seed=3)
    assert a == paired_bootstrap({"s": [0, 1, 2], "l": [1, 3, 2]}, lambda m: m["l"] - m["s"], reps=50, seed=3)


def test_gap_fraction():
    assert gap_fraction(1.0, 3.0, 2.0) == 0.5
    assert gap_fraction(3.0, 1.0, 2.5) == 0.25  # lower-is-better metrics work the same way
    assert gap_fraction(1.0, 1.0, 2.0) is None


@pytest.mark.parametrize("bad", [{}, {"a": [], "b": []}, {"a": [1, 2], "b": [1]}])
def test_bad_input(bad):
    with pytest.raises(ValueError):
        paired_bootstrap(bad, lambda m: 0.0)
