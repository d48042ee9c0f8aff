"""Policy planning: pure functions (window, hitRatio, prefetch schedule, auto choice)."""
import itertools

import pytest

from gpulab.core.errors import InputError
from gpulab.l2 import policy as P

MIB = 1 << 20


def test_parse_policies():
    assert P.parse_policies("default, persist,auto") == ["default", "persist", "auto"]
    assert P.parse_policies("all") == list(P.ALL_POLICIES)
    assert P.parse_policies("prefetch+persist,persist+prefetch") == ["persist+prefetch"]
    for bad in ("", " , ", "persist,lru"):
        with pytest.raises(InputError):
            P.parse_policies(bad)
    assert P.uses_persist("persist+prefetch") and P.uses_prefetch("persist+prefetch")
    assert not P.uses_persist("prefetch") and not P.uses_prefetch("default")


def test_hit_ratio():
    assert P.hit_ratio(30 * MIB, 60 * MIB) == pytest.approx(0.5)
    assert P.hit_ratio(30 * MIB, 10 * MIB) == 1.0
    assert P.hit_ratio(30 * MIB, 0) == 0.0
    with pytest.raises(InputError):
        P.hit_ratio(-1, 10)


def test_plan_persist_h100_numbers():
    # H100 here: persisting max 32.8 MB (31.25 MiB), max window 128 MiB - 4 KiB
    pmax, wmax = 32_768_000, 134_213_632
    small = P.plan_persist(20 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax)
    assert small.window_bytes == 20 * MIB and small.hit_ratio == 1.0 and small.coverage == 1.0
    assert small.set_aside_bytes == 31 * MIB and small.set_aside_bytes <= pmax
    # weights larger than the set-aside: the window is the hottest prefix of the set-aside's size, all persisting
    big = P.plan_persist(96 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax)
    assert (big.window_offset, big.window_bytes, big.hit_ratio) == (0, 31 * MIB, 1.0)
    assert big.coverage == pytest.approx(31 / 96)
    huge = P.plan_persist(300 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax)
    assert (huge.window_bytes, huge.hit_ratio) == (31 * MIB, 1.0)
    # a window asked larger than the set-aside (the whole arena, say): a set-aside / window share persists
    whole = P.plan_persist(96 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax, window_bytes=96 * MIB)
    assert (whole.window_bytes, whole.coverage) == (96 * MIB, 1.0) and whole.hit_ratio == pytest.approx(31 / 96)
    capped = P.plan_persist(300 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax, window_bytes=300 * MIB)
    assert capped.window_bytes == wmax and capped.hit_ratio == pytest.approx(31 * MIB / wmax)
    asked = P.plan_persist(96 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax,
                           set_aside_bytes=8 * MIB, window_bytes=16 * MIB)
    assert (asked.window_bytes, asked.hit_ratio) == (16 * MIB, 0.5)
    d = asked.as_dict()
    assert d["window_bytes"] == 16 * MIB and d["coverage"] == pytest.approx(1 / 6, abs=1e-5)
    # a smaller window than the set-aside: all of it persists
    small_win = P.plan_persist(96 * MIB, persisting_max_bytes=pmax, max_window_bytes=wmax, window_bytes=4 * MIB)
    assert (small_win.window_bytes, small_win.hit_ratio) == (4 * MIB, 1.0)
    # a device whose window maximum is below the set-aside: the window is capped, still hitRatio 1
    narrow = P.plan_persist(96 * MIB, persisting_max_bytes=pmax, max_window_bytes=16 * MIB)
    assert (narrow.window_bytes, narrow.hit_ratio) == (16 * MIB, 1.0)


def test_persist_window_holds_the_hottest_weights():
    """Over a hottest-first arena the default window persists exactly the hottest bytes that fit the set-aside:
    every persisted byte is used at least as often as every byte left out."""
    uses = {"a": 1, "b": 8, "c": 8, "d": 3, "e": 1, "f": 8}
    sizes = {"a": 5, "b": 3, "c": 4, "d": 6, "e": 2, "f": 2}
    order = P.hotness_order(uses, {n: i for i, n in enumerate(uses)})
    start, arena = 0, []
    for n in order:
        arena.append((start, start + sizes[n], uses[n]))
        start += sizes[n]
    plan = P.plan_persist(start, persisting_max_bytes=12, max_window_bytes=100, granularity=1)
    assert (plan.window_offset, plan.window_bytes, plan.hit_ratio) == (0, 12, 1.0)
    inside = [u for lo, hi, u in arena if lo < plan.window_bytes]
    outside = [u for lo, hi, u in arena if hi > plan.window_bytes]
    assert min(inside) >= max(outside) and sum(u == 8 for u in inside) == 3


def test_ncu_profiles_default_named_policies_and_autos_choice():
    assert P.ncu_policies(["persist", "auto"], "prefetch") == ["default", "persist", "prefetch"]
    assert P.ncu_policies(["auto"], "persist") == ["default", "persist"]
    assert P.ncu_policies(["auto"], "default") == ["default"]
    assert P.ncu_policies(["prefetch", "default"], None) == ["default", "prefetch"]
    assert P.ncu_policies(["persist", "auto"], "persist") == ["default", "persist"]


def test_plan_persist_errors():
    with pytest.raises(InputError, match="no persisting L2"):
        P.plan_persist(MIB, persisting_max_bytes=0, max_window_bytes=MIB)
    with pytest.raises(InputError, match="exceeds"):
        P.plan_persist(MIB, persisting_max_bytes=MIB, max_window_bytes=MIB, set_aside_bytes=2 * MIB)
    with pytest.raises(InputError):
        P.plan_persist(0, persisting_max_bytes=MIB, max_window_bytes=MIB)
    with pytest.raises(InputError):
        P.plan_persist(MIB, persisting_max_bytes=MIB, max_window_bytes=0)
    with pytest.raises(InputError):
        P.plan_persist(MIB, persisting_max_bytes=MIB, max_window_bytes=MIB, window_bytes=0)


def test_hotness_order():
    counts = {"a": 1, "b": 3, "c": 3, "d": 2}
    pos = {"a": 0, "b": 2, "c": 1, "d": 3}
    assert P.hotness_order(counts, pos) == ["c", "b", "d", "a"]
    with pytest.raises(InputError):
        P.hotness_order({"a": 1}, {"b": 0})


def _check_schedule(sizes, budget, lookahead):
    ops = P.prefetch_schedule(sizes, l2_budget_bytes=budget, lookahead=lookahead)
    done = [0] * len(sizes)
    for op in ops:
        assert op.target_layer > op.at_layer and op.target_layer - op.at_layer <= lookahead
        assert op.target_layer != 0 and op.nbytes > 0
        assert op.offset == done[op.target_layer]  # consecutive pieces, no overlap
        done[op.target_layer] += op.nbytes
    assert all(d <= s for d, s in zip(done, sizes))
    for i in range(len(sizes)):  # in flight while layer i runs stays within the budget (when it fits at all)
        in_flight = sizes[i] + sum(op.nbytes for op in ops if op.at_layer <= i < op.target_layer)
        if any(op.at_layer == i for op in ops):
            assert in_flight <= max(budget, sizes[i])
    return ops, done


def test_prefetch_schedule_basic():
    ops = P.prefetch_schedule([4, 4, 4, 4], l2_budget_bytes=100, lookahead=1)
    assert [(o.at_layer, o.target_layer, o.offset, o.nbytes) for o in ops] == [(0, 1, 0, 4), (1, 2, 0, 4), (2, 3, 0, 4)]
    ops = P.prefetch_schedule([4, 4, 4, 4], l2_budget_bytes=100, lookahead=2)
    assert [(o.at_layer, o.target_layer) for o in ops] == [(0, 1), (0, 2), (1, 3)]
    # budget forces partial prefetches: layer 0 (6) + room 4 of layer 1
    ops = P.prefetch_schedule([6, 10, 2], l2_budget_bytes=10, lookahead=1)
    assert [(o.at_layer, o.target_layer, o.offset, o.nbytes) for o in ops] == [(0, 1, 0, 4)]
    assert P.prefetch_schedule([8], l2_budget_bytes=10) == []


def test_prefetch_schedule_skips_what_a_persisting_window_holds():
    """Resident bytes (a layer's first bytes in the persisting window) are not prefetched and do not count in
    flight: layers 0-1 and the first 2 bytes of layer 2 persist; only the rest is prefetched, and since layer 1
    takes no normal lines while it runs, all 6 remaining bytes of layer 2 fit a budget of 6."""
    def plan(**kw):
        return [(o.at_layer, o.target_layer, o.offset, o.nbytes)
                for o in P.prefetch_schedule([4, 4, 8, 4], l2_budget_bytes=6, lookahead=1, **kw)]

    # while layer 2 runs its 6 normal bytes fill the budget: layer 3 gets nothing
    assert plan(resident_bytes=[4, 4, 2, 0]) == [(1, 2, 2, 6)]
    assert plan() == [(0, 1, 0, 2), (1, 2, 0, 2)]  # without the window: the weights of 0 and 1 take the budget
    # everything resident: nothing to prefetch; nothing resident: the plain schedule
    assert P.prefetch_schedule([4, 4, 4], l2_budget_bytes=100, resident_bytes=[4, 4, 4]) == []
    assert P.prefetch_schedule([4, 4, 4], l2_budget_bytes=100, resident_bytes=[0, 0, 0]) == \
        P.prefetch_schedule([4, 4, 4], l2_budget_bytes=100)
    for wrong in ([0, 0], [0, 0, 0, 0]):
        with pytest.raises(InputError, match=f"resident_bytes has {len(wrong)} entries for 3 layers"):
            P.prefetch_schedule([4, 4, 4], l2_budget_bytes=100, resident_bytes=wrong)


@pytest.mark.parametrize("lookahead", [1, 2])
def test_prefetch_schedule_with_resident_bytes_properties(lookahead):
    """Over many sizes, residents and budgets: pieces start after the resident prefix and follow one another,
    resident bytes are never prefetched, and the normal lines in flight stay within the budget."""
    for sizes in itertools.product([0, 3, 8], repeat=4):
        for fracs in itertools.product([0.0, 0.5, 1.0], repeat=4):
            res = [int(s * f) for s, f in zip(sizes, fracs)]
            for budget in (4, 9, 30):
                ops = P.prefetch_schedule(list(sizes), l2_budget_bytes=budget, lookahead=lookahead,
                                          resident_bytes=res)
                done = list(res)
                for op in ops:
                    assert 0 < op.target_layer - op.at_layer <= lookahead and op.nbytes > 0
                    assert op.offset == done[op.target_layer]
                    done[op.target_layer] += op.nbytes
                assert all(d <= s for d, s in zip(done, sizes))
                for i in range(4):
                    normal = sizes[i] - res[i] + sum(op.nbytes for op in ops if op.at_layer <= i < op.target_layer)
                    if any(op.at_layer == i for op in ops):
                        assert normal <= max(budget, sizes[i] - res[i])


def test_resident_prefix_of_a_region_in_the_window():
    r = P.Region("fc1", offset=1024, nbytes=2048)
    assert P.resident_prefix(r, 0, 4096) == 2048  # inside the window
    assert P.resident_prefix(r, 0, 1024) == 0  # the window ends where the region starts
    assert P.resident_prefix(r, 0, 1024 + 700) == 512  # straddles: rounded down to 256 bytes
    assert P.resident_prefix(r, 2048, 4096) == 0  # the window starts inside: not a prefix, none skipped
    assert P.resident_prefix(r, 0, 0) == 0


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_prefetch_schedule_properties(lookahead):
    for sizes in itertools.product([0, 3, 7, 20], repeat=4):
        for budget in (5, 12, 40):
            _check_schedule(list(sizes), budget, lookahead)


def test_prefetch_schedule_errors_and_grouping():
    with pytest.raises(InputError):
        P.prefetch_schedule([1, 2], l2_budget_bytes=0)
    with pytest.raises(InputError):
        P.prefetch_schedule([1, 2], l2_budget_bytes=10, lookahead=0)
    with pytest.raises(InputError):
        P.prefetch_schedule([1, -2], l2_budget_bytes=10)
    groups = P.group_by_layer(P.prefetch_schedule([1, 1, 1], l2_budget_bytes=10), 3)
    assert [len(g) for g in groups] == [1, 1, 0]


def test_choose_auto():
    # persist clearly faster than default (noise ~2%)
    c = P.choose_auto({"default": [10.0, 10.2, 10.1], "persist": [8.0, 8.1, 8.05], "prefetch": [10.5, 10.4, 10.6]})
    assert c.policy == "persist" and c.gain == pytest.approx((10.1 - 8.05) / 10.1)
    # a 1% gain inside 5% noise keeps default
    c = P.choose_auto({"default": [10.0, 10.5, 9.99], "persist": [9.9, 9.95, 9.9]})
    assert c.policy == "default" and "within noise" in c.reason
    # noisy candidate: its own spread counts too
    c = P.choose_auto({"default": [10.0, 10.0, 10.0], "prefetch": [9.0, 12.0, 6.0]})
    assert c.policy == "default"
    # everything slower: default
    assert P.choose_auto({"default": [1.0], "persist": [2.0]}).policy == "default"
    with pytest.raises(InputError):
        P.choose_auto({"persist": [1.0]})


def test_relative_noise():
    assert P.relative_noise([10.0, 10.0]) == 0.01
    assert P.relative_noise([9.0, 10.0, 11.0]) == pytest.approx(0.2)
    with pytest.raises(InputError):
        P.relative_noise([])


def test_prefetch_budget_is_256_byte_aligned():
    """A budget of 1/3 of 50 MiB (17476266 B) cut layers into pieces at odd byte offsets, which the read
    prefetch cannot view as int32 words; rounded down to 256 B, every piece of the 256-byte aligned layer
    ranges starts and ends 256-byte aligned."""
    sizes = [8 * MIB, 16 * MIB, 16 * MIB, 4 * MIB]
    raw = int(50 * MIB / 3)
    assert any(op.offset % 4 or op.nbytes % 4 for op in P.prefetch_schedule(sizes, l2_budget_bytes=raw))
    budget = P.prefetch_budget_bytes(1 / 3, 50 * MIB)
    assert budget % 256 == 0 and raw - 256 < budget <= raw
    for lookahead in (1, 2):
        ops = P.prefetch_schedule(sizes, l2_budget_bytes=budget, lookahead=lookahead)
        assert len(ops) >= 3 and all(op.offset % 256 == 0 and op.nbytes % 256 == 0 for op in ops)
    assert P.prefetch_budget_bytes(1e-9, 50 * MIB) == 256  # never an empty budget


def test_choose_auto_takes_a_steady_winner_behind_a_noisy_fastest():
    c = P.choose_auto({"default": [1.0, 1.0, 1.0], "persist": [0.5, 0.5, 1.6], "prefetch": [0.7, 0.7, 0.7]})
    assert c.policy == "prefetch" and abs(c.gain - 0.3) < 1e-9
    # a gain equal to the noise floor does not pass through float rounding
    assert P.choose_auto({"default": [1.0, 1.0, 1.0], "persist": [0.99, 0.99, 0.99]}).policy == "default"
    c = P.choose_auto({"default": [1.0, 1.0, 1.0], "persist": [0.5, 0.5, 1.6]})
    assert c.policy == "default" and "persist" in c.reason


def test_prefetch_budget_beside_a_persisting_set_aside():
    mib = 1 << 20
    assert P.prefetch_budget_bytes(0.5, 50 * mib) == 25 * mib
    assert P.prefetch_budget_bytes(0.5, 50 * mib, set_aside_bytes=32 * mib) == 9 * mib
    assert P.prefetch_budget_bytes(0.5, 50 * mib, set_aside_bytes=60 * mib) == 256  # at least one aligned piece
