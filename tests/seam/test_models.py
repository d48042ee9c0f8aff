"""Cut points, stitched forward shapes, torchvision compatibility, FLOPs of the anchors."""
from __future__ import annotations

import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.seam.models import ScaledResNet, StitchedFamily, enumerate_cuts, load_pretrained

from .helpers import tiny_spec


def test_cut_enumeration_counts_and_validity():
    a = ScaledResNet("resnet34", 2, 10, "cifar")
    b = ScaledResNet("resnet50", 2, 10, "cifar")
    cuts = enumerate_cuts(a, b, "all")
    # positions 0..16; strides 1 (positions 0-3), 2 (4-7), 4 (8-13), 8 (14-16): 4^2 + 4^2 + 6^2 + 3^2 pairs
    assert len(cuts) == 77
    assert all(a.position_stride(c.p) == b.position_stride(c.q) for c in cuts)
    assert len(enumerate_cuts(a, b, "aligned")) == 17
    # anchors of different depths: ResNet18 (8 blocks) into ResNet50 (16 blocks)
    r18 = ScaledResNet("resnet18", 2, 10, "cifar")
    c18 = enumerate_cuts(r18, b, "all")
    assert len(c18) == 3 * 4 + 2 * 4 + 2 * 6 + 2 * 3  # r18 position strides: 1,1,1 | 2,2 | 4,4 | 8,8
    assert {(c.p, c.q) for c in c18} >= {(0, 0), (8, 16), (3, 4), (2, 3)}
    with pytest.raises(InputError, match="--cuts"):
        enumerate_cuts(a, b, "some")


@pytest.mark.parametrize("stem,size", [("cifar", 8), ("imagenet", 32)])
def test_every_cut_both_directions_runs_with_the_right_shapes(stem, size):
    torch.manual_seed(0)
    fam = StitchedFamily(tiny_spec(stem=stem, image_size=size)).eval()
    assert len(fam.cuts) == 154  # both directions
    assert {c.direction for c in fam.cuts} == {"r34>r50", "r50>r34"}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        acts = {a: fam.anchors[a].forward_positions(x) for a in fam.spec.anchors}
        for c in fam.cuts:
            h = fam.stitches[c.key](acts[c.front][c.p])
            assert h.shape == acts[c.back][c.q].shape, c.name  # what the back expects at q
            out = fam.forward_member(x, fam.member(c.name))
            assert out.shape == (2, 10) and torch.isfinite(out).all(), c.name
    names = [m.name for m in fam.members()]
    assert len(names) == len(set(names)) == 156


def test_member_forward_is_the_composition():
    torch.manual_seed(1)
    fam = StitchedFamily(tiny_spec()).eval()
    x = torch.randn(3, 3, 8, 8)
    c = next(c for c in fam.cuts if c.front == "resnet50" and c.p == 5 and c.q == 6)
    with torch.no_grad():
        a, b = fam.anchors["resnet50"], fam.anchors["resnet34"]
        h = fam.stitches[c.key](a.forward_positions(x)[5])
        for blk in b.blocks[6:]:
            h = blk(h)
        ref = b.fc(torch.flatten(b.avgpool(h), 1))
        assert torch.allclose(fam.forward_member(x, fam.member(c.name)), ref, atol=1e-6)
        assert torch.allclose(fam.forward_member(x, fam.member("r34")), b(x))
    # parameter count of a stitch: front stem + blocks[:p] + stitch + back blocks[q:] + head
    m = fam.member(c.name)
    expect = (sum(p.numel() for mod in (a.conv1, a.bn1, *a.blocks[:5]) for p in mod.parameters())
              + sum(p.numel() for p in fam.stitches[c.key].parameters())
              + sum(p.numel() for mod in (*b.blocks[6:], b.fc) for p in mod.parameters()))
    assert fam.member_params(m) == expect
    assert fam.member_params(fam.member("r50")) == sum(p.numel() for p in a.parameters())


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_width64_imagenet_stem_is_torchvision(arch):
    import torchvision

    with torch.device("meta"):
        ours = ScaledResNet(arch, 64, 1000, "imagenet").state_dict()
        theirs = getattr(torchvision.models, arch)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_local_torchvision_weights_load_and_match(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    ours = ScaledResNet("resnet18", 64, 1000, "imagenet")
    load_pretrained(ours, path)
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)
    # a head of another class count is re-initialised, the rest loads
    ten = ScaledResNet("resnet18", 64, 10, "imagenet")
    notes = load_pretrained(ten, path)
    assert notes and torch.equal(ten.conv1.weight, tv.conv1.weight)
    with pytest.raises(InputError, match="does not fit|has shape"):
        load_pretrained(ScaledResNet("resnet18", 8, 1000, "imagenet"), path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights"):
        load_pretrained(ours, bad)
    with pytest.raises(InputError, match="not found"):
        load_pretrained(ours, tmp_path / "missing.pth")


def test_anchor_flops_at_224_match_torchvision_published_figures():
    """torchvision publishes ResNet34 3.66 and ResNet50 4.09 "GFLOPS" at 224x224. Those figures count
    multiply-accumulates (MACs) of the convolutions and the fc layer; torch.utils.flop_counter counts
    each MAC as 2 FLOPs, so its total / 2 / 1e9 must round to the published figure."""
    from gpulab.seam.measure import count_flops, family_flops
    from gpulab.seam.reference import conv_linear_macs

    with torch.device("meta"):
        fam = StitchedFamily(tiny_spec(width=64, stem="imagenet", num_classes=1000, image_size=224, cuts="aligned",
                                       baselines=["resnet18"]))
    x = torch.empty(1, 3, 224, 224, device="meta")
    published = {"resnet34": 3.66, "resnet50": 4.09, "resnet18": 1.81}
    for arch, gmacs in published.items():
        flops = count_flops(fam.net(arch), x)
        assert round(flops / 2 / 1e9, 2) == gmacs, arch
        assert flops == 2 * conv_linear_macs(fam.net(arch), x)
    composed = family_flops(fam, 224)  # per-segment counts must add up to the whole-model count
    assert composed["r34"] == count_flops(fam.net("resnet34"), x)
    assert composed["r50"] == count_flops(fam.net("resnet50"), x)


def test_composed_flops_equal_whole_model_counts_for_every_cut():
    from gpulab.seam.measure import family_flops, member_flops
    from gpulab.seam.reference import conv_linear_macs
    from gpulab.seam.models import MemberNet

    fam = StitchedFamily(tiny_spec(cuts="all")).eval()
    composed = family_flops(fam, 8)
    for m in fam.members()[::5]:  # every 5th member: whole counts are slower
        assert composed[m.name] == member_flops(fam, m, 8), m.name
        assert composed[m.name] == 2 * conv_linear_macs(MemberNet(fam, m), torch.zeros(1, 3, 8, 8)), m.name


def test_bad_specs_are_one_line_errors():
    with pytest.raises(InputError, match="unknown architecture"):
        StitchedFamily(tiny_spec(anchors=("resnet34", "resnet77")))
    with pytest.raises(InputError, match="two different anchors"):
        StitchedFamily(tiny_spec(anchors=("resnet34", "resnet34")))
    with pytest.raises(InputError, match="stem"):
        StitchedFamily(tiny_spec(stem="tiny"))
    with pytest.raises(InputError, match="width"):
        StitchedFamily(tiny_spec(width=0))


def test_weights_saved_without_batchnorm_counters_load(tmp_path):
    """State dicts saved before BatchNorm had ``num_batches_tracked`` (PyTorch < 0.4.1, the older torchvision
    model-zoo ResNets among them) lack the counters; torch's own loader accepts them, and so must --weights. Any
    other missing key is still refused."""
    torch.manual_seed(0)
    src = ScaledResNet("resnet18", 8, 1000, "imagenet")
    src.train()
    with torch.no_grad():
        src(torch.randn(4, 3, 32, 32))  # running statistics away from their initial values
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(sd, path)
    ours = ScaledResNet("resnet18", 8, 1000, "imagenet")
    assert load_pretrained(ours, path) == []
    mine = ours.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in sd.items())
    ten = ScaledResNet("resnet18", 8, 10, "imagenet")  # with a head of another class count too
    assert load_pretrained(ten, path) and torch.equal(ten.conv1.weight, src.conv1.weight)
    del sd["bn1.running_mean"]
    torch.save(sd, path)
    with pytest.raises(InputError, match="missing key 'bn1.running_mean'"):
        load_pretrained(ours, path)
