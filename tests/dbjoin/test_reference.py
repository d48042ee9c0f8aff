import numpy as np

from gpulab.dbjoin import reference
from gpulab.dbjoin.reference import JoinResult

from .cases import CASE_IDS, CASES


def brute_force(lk, rk):
    pairs = [(i, j) for i in range(len(lk)) for j in range(len(rk)) if lk[i] == rk[j]]
    a = np.array(pairs, np.int64).reshape(-1, 2)
    return JoinResult(len(a), a[:, 0], a[:, 1])


def test_pandas_matches_brute_force_on_every_case():
    for dt, name in CASE_IDS:
        lk, rk = CASES[dt][name]
        ref = reference.pandas_join(lk, rk)
        ok, detail = reference.compare(ref, brute_force(lk, rk), lk, rk)
        assert ok, f"{dt}/{name}: {detail}"
        assert reference.output_size(lk, rk) == ref.count
        assert reference.pandas_join(lk, rk, count_only=True).count == ref.count


def test_compare_detects_wrong_pairs():
    lk, rk = np.array([1, 1, 2]), np.array([1, 2, 2])
    ref = reference.pandas_join(lk, rk)
    assert ref.count == 4
    assert reference.compare(ref, ref)[0]
    # same count, one pair replaced
    bad = JoinResult(4, np.array([0, 1, 2, 2]), np.array([0, 0, 1, 1]))
    ok, detail = reference.compare(bad, ref, lk, rk)
    assert not ok and "differ" in detail
    # a missing pair
    ok, detail = reference.compare(JoinResult(3, ref.left[:3], ref.right[:3]), ref)
    assert not ok and "count" in detail
    # count right but fewer pairs returned
    ok, detail = reference.compare(JoinResult(4, ref.left[:3], ref.right[:3]), ref)
    assert not ok
    # pairs in any order are equal
    order = np.array([3, 1, 0, 2])
    assert reference.compare(JoinResult(4, ref.left[order], ref.right[order]), ref, lk, rk)[0]


def test_compare_needs_the_pairs_when_pairs_were_asked_for():
    import numpy as np

    from gpulab.dbjoin.reference import JoinResult, compare, pandas_join

    lk, rk = np.array([1, 1, 2]), np.array([1, 2, 2])
    ref = pandas_join(lk, rk)
    ok, why = compare(JoinResult(ref.count), ref, lk, rk)
    assert not ok and "only a count" in why
    ok, why = compare(JoinResult(ref.count, ref.left[:2], None), ref, lk, rk)
    assert not ok
    ok, why = compare(JoinResult(ref.count, ref.left[:2], ref.right[:2]), ref, lk, rk)
    assert not ok and "count says" in why
    assert compare(JoinResult(ref.count), pandas_join(lk, rk, True))[0]  # count only: a count is the answer
    assert compare(ref, ref, lk, rk)[0]
