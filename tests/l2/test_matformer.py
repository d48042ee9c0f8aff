"""The weight-shared MatFormer-style supernet: nested FFN bands, their sharing, layout and forward."""
import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.l2.matformer import GRANULARITIES, MatConfig, MatFormerSupernet, band_bounds, sample_configs
from gpulab.l2.models import run_layers


def dense_forward(m: MatFormerSupernet, cfg: MatConfig) -> torch.Tensor:
    """The subnet as the dense MatFormer FFN stack it stands for: the first bands' rows of W_up and W_down."""
    x = m.x.float()
    for i, g in enumerate(cfg.granularity):
        up = torch.cat([m.arena[f"l{i}.up{j}.w"] for j in range(g + 1)]).float()
        b_up = torch.cat([m.arena[f"l{i}.up{j}.b"] for j in range(g + 1)]).float()
        down = torch.cat([m.arena[f"l{i}.down{j}.w"] for j in range(g + 1)]).float()  # [hidden used, width]
        assert up.shape[0] == m.hidden * (1, 2, 4, 8)[g] // 8
        x = x + torch.relu(x @ up.T + b_up) @ down + m.arena[f"l{i}.down.b"].float()
    return x


@pytest.fixture(scope="module")
def net():
    cfgs = [MatConfig((0, 1, 2)), MatConfig((3, 0, 0)), MatConfig((1, 1, 3)), MatConfig.largest(3)]
    return MatFormerSupernet(24, 3, cfgs, batch=3, dtype=torch.float32, device="cpu")


def test_band_bounds_are_the_granularities():
    assert band_bounds(64) == [(0, 8), (8, 16), (16, 32), (32, 64)]
    with pytest.raises(InputError, match="multiple of 8"):
        band_bounds(20)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_every_subnet_is_the_dense_ffn_stack_of_its_granularities(net, impl):
    for cfg, req in zip(net.subnets, net.requests(impl)):
        y = run_layers(req.x, req.layers)
        want = dense_forward(net, cfg)
        assert y.shape == (3, 24) and req.label == cfg.label
        assert float((y - want).abs().max()) <= 1e-4 * float(want.abs().max())
        # twice in a row (a CUDA graph replays into the same buffers): the same result
        assert torch.equal(run_layers(req.x, req.layers), y)


def test_subnets_share_storage_and_see_updates(net):
    lo, hi = net.arena.base_ptr, net.arena.base_ptr + net.arena.total_bytes
    req = net.requests("torch")[0]
    before = run_layers(req.x, req.layers).clone()
    w = net.arena["l0.up0.w"]
    assert lo <= w.data_ptr() < hi
    saved = w.clone()
    w.mul_(2.0)  # band 0 of layer 0: every subnet uses it
    try:
        for cfg, r in zip(net.subnets, net.requests("torch")):
            assert torch.allclose(run_layers(r.x, r.layers), dense_forward(net, cfg), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(run_layers(req.x, req.layers), before)
    finally:
        w.copy_(saved)


def test_layout_is_hottest_first_and_steps_are_contiguous(net):
    uses = net.param_uses
    order = sorted(net.arena.offsets, key=net.arena.offsets.get)
    counts = [uses[n] for n in order]
    assert counts == sorted(counts, reverse=True)
    # band 0 of every layer (and the down biases) is shared by all four subnets, and comes first
    assert all(uses[f"l{i}.up0.w"] == 4 and uses[f"l{i}.down.b"] == 4 for i in range(3))
    assert uses["l0.up3.w"] == 2 and uses["l1.up3.w"] == 1 and uses["l2.up3.w"] == 2
    assert net.shared_bytes() == sum(net.arena.nbytes[n] for n in net.arena.offsets if uses[n] == 4)
    # each step's region covers exactly its own parameters (one prefetch range), inside the arena
    for req in net.requests("torch"):
        for step in req.layers:
            names = [n for n in net.arena.offsets if n.startswith(step.name + ".")]
            if step.name.endswith("down0"):
                names.append(step.name.split(".")[0] + ".down.b")
            want = sum(-(-net.arena.nbytes[n] // 256) * 256 for n in names)
            assert step.region.nbytes == want and step.region.end <= net.arena.total_bytes
    sizes = [net.subnet_weight_bytes(c) for c in net.subnets]
    assert sizes[-1] == max(sizes) and net.describe()["granularities"][0] == "S-M-L"


def test_steps_per_request_follow_the_granularities(net):
    for cfg, req in zip(net.subnets, net.requests("torch")):
        assert len(req.layers) == 2 * sum(g + 1 for g in cfg.granularity)
        assert req.layers[0].name == "l0.up0"


def test_validation():
    with pytest.raises(InputError, match="granularity"):
        MatConfig((0, 4))
    with pytest.raises(InputError, match="granularity"):
        MatConfig(())
    with pytest.raises(InputError, match="even width"):
        MatFormerSupernet(7, 1, [MatConfig((0,))], 1, torch.float32, "cpu")
    with pytest.raises(InputError, match="each of the 2 layers"):
        MatFormerSupernet(8, 2, [MatConfig((0,))], 1, torch.float32, "cpu")
    with pytest.raises(InputError, match="at least one subnet"):
        MatFormerSupernet(8, 2, [], 1, torch.float32, "cpu")
    s = sample_configs(50, 4, seed=3)
    assert s == sample_configs(50, 4, seed=3) and len(set(s)) > 40
    assert {g for c in s for g in c.granularity} == set(range(len(GRANULARITIES)))


@pytest.mark.parametrize("impl", ["torch", "triton", "cublas"])
def test_a_run_rewrites_every_buffer_it_reads(net, impl):
    """meta["buffers"] (what PolicyRunner.outputs sets to NaN before a checked run): the buffers of the request's steps,
    none of which a run reads before it writes it, so NaN left there by the check never reaches the output."""
    for req in net.requests(impl):
        want = run_layers(req.x, req.layers).clone()
        bufs = req.meta["buffers"]
        assert len(bufs) == 2 * net.n_layers
        for t in bufs:
            t.fill_(float("nan"))
        assert torch.equal(run_layers(req.x, req.layers), want)
