"""PolicyRunner's L2 set-up on this CPU, with stand-ins for the CUDA streams and events (no GPU calls):

* the persisting window goes on BOTH the compute and the prefetch side stream, over the arena, with the plan's
  set-aside, window and hitRatio, and ``--set-aside-mib`` / ``--window-mib`` each reach their own field;
* the prefetch budget is a fraction of the whole L2 (not of the persisting maximum);
* the Triton "read" prefetch reads exactly the bytes of each scheduled piece (as int32 words), for every piece of
  an inference, including pieces cut at odd 256-byte multiples by the budget;
* the Triton linear kernel's K tail: a non-finite input stays in its own output row (a K mask one too wide reads
  the next row's first element and multiplies it by the masked zero weight: inf * 0 = NaN in the wrong row).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from gpulab.l2 import policy as P
from gpulab.l2.bench import PolicyRunner, RunConfig
from gpulab.l2.models import MLP, run_layers

MIB = 1 << 20


class _Stream:
    _next = 1000

    def __init__(self, *a, **kw):
        _Stream._next += 1
        self.cuda_stream = _Stream._next
        self.log = []

    def wait_event(self, ev):
        self.log.append(("wait", ev))

    def wait_stream(self, other):
        self.log.append(("join", other.cuda_stream))


class _Event:
    def __init__(self, *a, **kw):
        pass

    def record(self, stream=None):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: None)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def _runner(cfg: RunConfig, limits: dict, layers: int = 5, width: int = 48) -> PolicyRunner:
    model = MLP(width=width, layers=layers, batch=3, dtype=torch.float32, device="cpu")
    return PolicyRunner(cfg, model, model.requests("torch"), limits, [])


LIMITS = {"l2_bytes": 40_000, "persisting_l2_max_bytes": 1 * MIB, "access_policy_max_window_bytes": 4 * MIB,
          "compute_capability": 90}


def test_prefetch_budget_is_a_fraction_of_the_l2_left_to_normal_lines(fake_cuda):
    cfg = RunConfig(prefetch_budget=0.5, lookahead=2)
    limits = dict(LIMITS, persisting_l2_max_bytes=10_000)
    r = _runner(cfg, limits)
    sizes = [l.region.nbytes for l in r.requests[0].layers]
    budget = P.prefetch_budget_bytes(0.5, 40_000)
    assert budget == 19_968
    want = P.group_by_layer(P.prefetch_schedule(sizes, l2_budget_bytes=budget, lookahead=2), len(sizes))
    assert r.schedule(0, "prefetch") == want
    # persist+prefetch: the fraction is of the L2 left beside the persisting set-aside (10,000 bytes planned)
    aside = r.plan_persist().set_aside_bytes
    beside = P.group_by_layer(P.prefetch_schedule(sizes, l2_budget_bytes=P.prefetch_budget_bytes(
        0.5, 40_000, set_aside_bytes=aside), lookahead=2), len(sizes))
    assert aside > 0 and r.schedule(0, "persist+prefetch") == beside != want
    assert sum(op.nbytes for ops in want for op in ops) > 0


def test_persisting_window_on_both_streams_over_the_arena(fake_cuda, monkeypatch):
    from gpulab.l2 import cuda_l2

    cfg = RunConfig(set_aside_mib=0.01, window_mib=0.02)
    r = _runner(cfg, LIMITS)
    arena = r.model.arena
    assert arena.total_bytes > int(0.02 * MIB)  # the window is a prefix of the arena
    plan = r.plan_persist()
    assert plan == P.plan_persist(arena.total_bytes, persisting_max_bytes=MIB, max_window_bytes=4 * MIB,
                                  set_aside_bytes=int(0.01 * MIB), window_bytes=int(0.02 * MIB))
    assert (plan.set_aside_bytes, plan.window_bytes) == (int(0.01 * MIB), int(0.02 * MIB))
    assert plan.hit_ratio == pytest.approx(int(0.01 * MIB) / int(0.02 * MIB))

    state = {"limit": 0, "windows": {}}
    monkeypatch.setattr(cuda_l2, "get_persisting_limit", lambda: state["limit"])
    monkeypatch.setattr(cuda_l2, "set_persisting_limit", lambda n: state.__setitem__("limit", int(n)))
    monkeypatch.setattr(cuda_l2, "set_access_policy_window",
                        lambda s, base, n, ratio: state["windows"].__setitem__(s, (base, n, ratio)))
    monkeypatch.setattr(cuda_l2, "clear_access_policy_window", lambda s: state["windows"].pop(s))
    monkeypatch.setattr(cuda_l2, "reset_persisting_lines", lambda: state.setdefault("order", []).append("reset"))
    monkeypatch.setattr(cuda_l2, "synchronize_device", lambda: state.setdefault("order", []).append("sync"))
    with r.installed("persist"):
        assert state["limit"] == plan.set_aside_bytes
        want = (arena.base_ptr + plan.window_offset, plan.window_bytes, plan.hit_ratio)
        assert state["windows"] == {r.main.cuda_stream: want, r.side.cuda_stream: want}
    assert state == {"limit": 0, "windows": {}, "order": ["sync", "reset"]}
    with r.installed("default"):
        assert state["windows"] == {}


@pytest.mark.parametrize("budget_fraction, lookahead", [(1.0, 1), (0.3, 2)])
def test_read_prefetch_reads_exactly_the_scheduled_bytes(fake_cuda, monkeypatch, budget_fraction, lookahead):
    from gpulab.l2 import kernels

    cfg = RunConfig(prefetch_kernel="read", prefetch_budget=budget_fraction, lookahead=lookahead)
    r = _runner(cfg, LIMITS)
    r._ensure_prefetcher()
    assert r.prefetch_kind == "read"
    touched = []

    def touch(words, programs=8, out=None):
        assert words.dtype == torch.int32 and words.dim() == 1
        touched.append((words.data_ptr(), words.numel() * 4))
        return torch.zeros(1, dtype=torch.int32)

    monkeypatch.setattr(kernels, "touch", touch)
    req = r.requests[0]
    y = r.infer(0, "prefetch")
    assert torch.equal(y, run_layers(req.x, req.layers))
    base = r.model.arena.base_ptr
    want = [(base + req.layers[op.target_layer].region.offset + op.offset, op.nbytes)
            for ops in r.schedule(0, "prefetch") for op in ops]
    assert touched == want and len(want) >= 4
    # every prefetched byte lies in a later layer's range, and no range is read twice
    spans = sorted(want)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert spans[0][0] >= base + req.layers[1].region.offset


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * w in the non-finite rows
@pytest.mark.parametrize("m, k", [(5, 70), (3, 17)])
def test_linear_k_tail_does_not_read_the_next_row(m, k):
    """K = 70 and 17 are not multiples of the K tile: the row past the tail must not be read."""
    from gpulab.l2 import kernels as K
    from gpulab.l2 import reference as R

    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(9, k, generator=g)
    b = torch.randn(9, generator=g)
    x[1, 0] = float("inf")  # row 1 is non-finite; every other row is finite
    x[m - 1, 0] = float("nan")
    got, ref = K.linear(x, w, b), R.linear(x, w, b)
    finite_rows = [i for i in range(m) if i not in (1, m - 1)]
    assert torch.isfinite(got[finite_rows]).all()
    assert torch.allclose(got[finite_rows], ref[finite_rows], rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))


def test_kernel_wrappers_refuse_mismatched_bias_and_out():
    from gpulab.l2 import kernels

    """A bias of another length was read past its end and an `out` of another shape written past its end."""
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear(x, w, torch.randn(2))
    with pytest.raises(ValueError, match="out is"):
        kernels.linear(x, w, out=torch.empty(3, 3))
    with pytest.raises(ValueError, match="bias"):
        kernels.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(4))


def test_persist_prefetch_skips_the_weights_the_window_holds(fake_cuda):
    """persist+prefetch with the window installed at hitRatio 1 (it fits the set-aside granted): the layers it
    holds are not prefetched again (that spent the normal lines' budget on persisting bytes); at a lower hitRatio
    only some of its lines persist, and the plain schedule stays. Plain prefetch never skips."""
    from types import SimpleNamespace

    cfg = RunConfig(prefetch_budget=0.5, lookahead=1, set_aside_mib=0.02)
    r = _runner(cfg, dict(LIMITS, l2_bytes=100_000))  # a budget that fits a whole layer (9.4 KB) beside another
    layers = r.requests[0].layers
    plan = r.plan_persist()
    assert plan.hit_ratio == 1.0 and plan.window_bytes == int(0.02 * MIB) < r.model.arena.total_bytes
    plain = r.schedule(0, "persist+prefetch")  # nothing installed yet: no window to rely on
    r.last_persist = SimpleNamespace(granted_bytes=plan.set_aside_bytes, installed_hit_ratio=1.0)
    resident = r.resident(0, "persist+prefetch")
    assert resident == tuple(P.resident_prefix(l.region, 0, plan.window_bytes) for l in layers)
    assert resident[0] == layers[0].region.nbytes and 0 < sum(resident) < sum(l.region.nbytes for l in layers)
    skipping = r.schedule(0, "persist+prefetch")
    held = {j for j, (l, b) in enumerate(zip(layers, resident)) if b == l.region.nbytes}
    assert held and not any(op.target_layer in held for ops in skipping for op in ops)
    assert all(op.offset >= resident[op.target_layer] for ops in skipping for op in ops)
    assert any(op.target_layer in held for ops in plain for op in ops) and skipping != plain
    assert r.resident(0, "prefetch") is None
    r.last_persist = SimpleNamespace(granted_bytes=plan.set_aside_bytes, installed_hit_ratio=0.5)
    assert r.resident(0, "persist+prefetch") is None and r.schedule(0, "persist+prefetch") == plain
