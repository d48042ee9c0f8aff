"""Weight arena, MLP / conv net on the Triton kernels, and the weight-shared OFA-style supernet."""
import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.l2.models import ALIGN, MLP, ConvNet, WeightArena, run_layers, dtype_of
from gpulab.l2.supernet import (DEPTHS, MAX_D, MAX_K, STAGES, OFASupernet, SubnetConfig, make_divisible,
                                sample_subnets)


def test_arena_views_and_regions():
    a = WeightArena([("w", (3, 5)), ("b", (3,)), ("v", (7,))], torch.float32, "cpu")
    assert all(o % ALIGN == 0 for o in a.offsets.values())
    assert a.total_bytes % ALIGN == 0
    for t in a.tensors.values():
        assert t.untyped_storage().data_ptr() == a.buffer.untyped_storage().data_ptr()
    a["b"].fill_(2.0)
    assert float(a.buffer[a.offsets["b"]:a.offsets["b"] + 12].view(torch.float32).sum()) == 6.0
    r = a.region(["w", "b"])
    assert r.offset == 0 and r.nbytes == 2 * ALIGN
    with pytest.raises(InputError):
        WeightArena([("w", (1,)), ("w", (2,))], torch.float32, "cpu")
    with pytest.raises(InputError):
        dtype_of("int4")


def test_mlp_triton_matches_torch_and_regions():
    m = MLP(width=48, layers=3, batch=5, dtype=torch.float32, device="cpu")
    ref = run_layers(m.x, m.layers("torch"))
    tri = run_layers(m.x, m.layers("triton"))
    assert float((tri - ref).abs().max()) < 1e-4 * float(ref.abs().max()) + 1e-6
    regions = [l.region for l in m.layers("torch")]
    assert [r.offset for r in regions] == sorted(r.offset for r in regions)
    assert all(r.nbytes >= 48 * 48 * 4 for r in regions)
    calls = []
    run_layers(m.x, m.layers("torch"), before=calls.append)
    assert calls == [0, 1, 2]
    with pytest.raises(InputError):
        MLP(width=0, layers=1, batch=1, dtype=torch.float32, device="cpu")


def test_convnet_triton_matches_torch():
    c = ConvNet(channels=8, layers=2, batch=2, image=10, dtype=torch.float32, device="cpu", classes=12)
    ref = run_layers(c.x, c.layers("torch"))
    tri = run_layers(c.x, c.layers("triton"))
    assert ref.shape == (2, 12)
    assert float((tri - ref).abs().max()) < 1e-4 * float(ref.abs().max()) + 1e-6


@pytest.fixture(scope="module")
def net():
    subs = sample_subnets(3, seed=1) + [SubnetConfig.largest()]
    return OFASupernet(0.25, subs, batch=2, image=32, dtype=torch.float32, device="cpu", classes=10)


def test_subnets_share_parameter_storage(net):
    base = net.arena.buffer.untyped_storage().data_ptr()
    lo, hi = net.arena.base_ptr, net.arena.base_ptr + net.arena.total_bytes
    ws = [net.subnet_weights(c) for c in net.subnets]
    for w in ws:
        for name, t in w.items():
            assert t.untyped_storage().data_ptr() == base, name
            assert lo <= t.data_ptr() < hi
    # two subnets with different widths use views that start at the same address (the shared prefix)
    blk = "s0b0"
    assert ws[0][f"{blk}.expand.w"].data_ptr() == ws[-1][f"{blk}.expand.w"].data_ptr()
    # a smaller kernel is the centre of the 7x7 kernel: same storage, offset inside
    k = next(c.kernels[0][0] for c in net.subnets if c.kernels[0][0] < MAX_K)
    cfg = next(c for c in net.subnets if c.kernels[0][0] == k)
    small = net.subnet_weights(cfg)[f"{blk}.dw.w"]
    full = net.arena[f"{blk}.dw.w"]
    lo_k = (MAX_K - k) // 2
    assert torch.equal(small, full[:small.shape[0], :, lo_k:lo_k + k, lo_k:lo_k + k])


def test_subnets_run_and_see_shared_updates(net):
    outs = [run_layers(r.x, r.layers) for r in net.requests()]
    assert all(o.shape == (2, 10) and torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[0], outs[-1])  # different subnets compute different functions
    # changing a shared parameter of the supernet changes every subnet's output (no private copies)
    w = net.arena["fc.b"]
    saved = w.clone()
    w.add_(1.0)
    try:
        outs2 = [run_layers(r.x, r.layers) for r in net.requests()]
        for a, b in zip(outs, outs2):
            assert torch.allclose(b - a, torch.ones_like(a), atol=1e-5)
    finally:
        w.copy_(saved)


def test_supernet_layout_is_hottest_first(net):
    used = [net.layer_uses[l] for l in sorted(net.layer_uses, key=lambda l: net._region(l).offset)]
    assert used == sorted(used, reverse=True)
    n = len(net.subnets)
    assert net.layer_uses["stem"] == net.layer_uses["head"] == n
    assert all(net.layer_uses[f"s{s}b{j}"] == n for s in range(len(STAGES)) for j in range(min(DEPTHS)))
    # each layer's parameters are one contiguous range
    for layer in net.layer_uses:
        names = [p for p, g in net.group.items() if g == layer]
        r = net._region(layer)
        assert r.nbytes <= sum(-(-net.arena.nbytes[p] // 256) * 256 for p in names)
    lay = net.subnet_layers(net.subnets[-1])
    assert len(lay) == 2 + MAX_D * len(STAGES)


def test_subnet_config_validation():
    with pytest.raises(InputError):
        SubnetConfig((4,), ((7,) * 4,), ((6,) * 4,))
    with pytest.raises(InputError):
        SubnetConfig((5,) * 5, ((7,) * 4,) * 5, ((6,) * 4,) * 5)
    with pytest.raises(InputError):
        sample_subnets(0)
    assert len(set(sample_subnets(6, seed=3))) == 6
    assert sample_subnets(4, seed=3) == sample_subnets(4, seed=3)
    assert make_divisible(24 * 6) == 144 and make_divisible(3) == 8


def test_every_block_after_the_first_of_a_stage_is_residual(net):
    """L3: blocks j > 0 of a stage add their input (MobileNetV3 inverted residual); block 0 does not. With one
    block's projection zeroed (on the real activations), a residual block is the identity, block 0 gives zeros."""
    import torch

    from gpulab.l2.supernet import SubnetConfig

    x = net.x
    checked = 0
    for layer in net.subnet_layers(SubnetConfig.largest()):
        if layer.name not in ("stem", "head"):
            names = [f"{layer.name}.project.w", f"{layer.name}.project.b"]
            saved = [net.arena[n].clone() for n in names]
            for n in names:
                net.arena[n].zero_()
            try:
                y0 = layer.fn(x)
            finally:
                for n, t in zip(names, saved):
                    net.arena[n].copy_(t)
            if int(layer.name.split("b")[-1]) > 0:
                assert torch.equal(y0, x), layer.name
                checked += 1
            else:
                assert torch.count_nonzero(y0) == 0, layer.name
        x = layer.fn(x)
    assert checked > 0


def test_subnet_width_and_kernel_follow_its_config(net):
    """L4: a block's expanded width is make_divisible(in * expand) of the subnet's own expand ratio, and its
    depthwise kernel is k x k; smaller subnets hold fewer parameter bytes."""
    from gpulab.l2.supernet import STAGES, SubnetConfig, make_divisible

    for cfg in net.subnets:
        w = net.subnet_weights(cfg)
        for s in range(len(STAGES)):
            for j in range(cfg.depths[s]):
                blk = net.block_names[s][j]
                cin = w[f"{blk}.expand.w"].shape[1]
                mid = make_divisible(cin * cfg.expands[s][j])
                k = cfg.kernels[s][j]
                assert w[f"{blk}.expand.w"].shape[0] == mid and w[f"{blk}.project.w"].shape[1] == mid, blk
                assert tuple(w[f"{blk}.dw.w"].shape) == (mid, 1, k, k), blk
    big = net.subnet_param_bytes(SubnetConfig.largest())
    assert all(net.subnet_param_bytes(c) < big for c in net.subnets if c != SubnetConfig.largest())
