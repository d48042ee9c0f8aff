"""`gpulab seam train` under torchrun: 2 processes on gloo (CPU), against a single-process run.

One launch of ``python -m torch.distributed.run --nproc-per-node 2 tests/seam/ddp_driver.py`` (free
port, hard timeout, the whole process group killed on a timeout) runs ``gpulab --device cpu seam train``
twice in each rank, checking after each run that the command destroyed its process group:

* the realistic path (anchors trained from scratch, joint fine-tuning, stitch BN): it completes, rank 0
  alone writes one record and one family folder, every rank ends with the same parameters, and the
  record has the single-process run's configuration and schedule. Its weights are NOT compared with the
  single-process run's: the data of every step are the same (see
  ``test_shards_of_a_global_batch_are_the_single_process_batch``), but train-mode BatchNorm normalises
  each rank's half batch with its own statistics. Measured here for these ResNet34s at 16 images,
  the mean of the two half-batch gradients is nearly orthogonal to the full-batch gradient at init
  (cosine 0.05-0.17 at widths 2-16), so the two runs part from the first step: that is DDP-with-BN
  semantics (as in torchvision's recipe without --sync-bn), not a tolerance a test could state.
* an ImageNet-style folder (ImageFolder batches sharded over the ranks, pretrained anchors from local
  files, joint fine-tuning): completes, rank 0 writes once, the ranks agree;
* the exact path (anchors from local weights, ``--mode frozen`` so the anchors stay in eval mode,
  ``--no-stitch-bn``): no batch statistics anywhere, so DDP (gradients averaged over two half batches)
  must equal the single-process run up to float summation order.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .helpers import write_cifar, write_image_folder

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--width", "2", "--cuts", "aligned", "--batch-size", "16", "--calib-images", "16",  # (CIFAR-10: no --workers)
          "--checkpoint-every", "2"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port() -> int:
    return _free_ports(1)[0]


def torchrun(runs: list[list[str]], cwd: Path, nproc: int = 2, timeout: float = 150) -> str:
    """Launch ``ddp_driver.py`` with ``nproc`` processes: the gpulab command lines ``runs`` in turn, each
    with ``--device cpu`` (gloo) in front. The output, or a test failure."""
    import json

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).with_name("ddp_driver.py")),
           json.dumps([["--device", "cpu", *argv] for argv in runs]), json.dumps(_free_ports(len(runs)))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{text[-3000:]}")
    assert proc.returncode == 0, text[-4000:]
    for rank in range(nproc):
        assert text.count(f"rank {rank}: done") == len(runs), text[-3000:]
    return text


def single_train(out: Path, family: Path, args: list[str]) -> None:
    from gpulab.cli import invoke
    from gpulab.core import options

    old = options.get().out
    try:
        invoke(["--device", "cpu", "--out", str(out), "seam", "train", "--family", str(family), *args])
    finally:
        options.set_options(out=old)


def _record(out: Path) -> dict:
    files = sorted(out.glob("*"))
    assert [f.name.startswith("seam-train-") and f.suffix == ".yaml" for f in files] == [True], files
    return yaml.safe_load(files[0].read_text())


def _weights(family: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(family / "weights.safetensors"))


def _check_written_by_rank0(out: Path, family: Path, rec: dict) -> None:
    assert sorted(p.name for p in family.iterdir()) == ["checkpoint.pt", "family.yaml", "weights.safetensors"]
    assert [*out.rglob(".*"), *family.rglob(".*")] == []  # no temporary file left behind
    assert rec["config"]["world_size"] == 2
    assert rec["ok"], rec["checks"]
    assert rec["checks"]["ddp_ranks_hold_equal_parameters"]["passed"]
    assert rec["checks"]["ddp_ranks_hold_equal_parameters"]["detail"].startswith("2 ranks")


def _weight_files(root: Path, stem: str, classes: int) -> list[str]:
    """--weights options for both anchors: local state dicts in torchvision's layout, saved DDP-style
    (under "state_dict", keys prefixed "module."), with non-trivial BN statistics as trained weights have."""
    from gpulab.seam.models import ScaledResNet

    out = []
    for i, arch in enumerate(("resnet34", "resnet50")):
        torch.manual_seed(10 + i)
        net = ScaledResNet(arch, 2, classes, stem)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
        path = root / f"{arch}-{stem}.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
        out += ["--weights", f"{arch}={path}"]
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One torchrun launch (2 ranks, gloo) running the three training configurations."""
    root = tmp_path_factory.mktemp("ddp")
    cifar = write_cifar(root / "cifar", n_train=48, n_test=8)
    joint = [*COMMON, "--data", str(cifar), "--anchor-steps", "2", "--stitch-steps", "4", "--seed", "1"]
    weights = _weight_files(root, "cifar", 10)
    frozen = [*COMMON, "--data", str(cifar), *weights, "--mode", "frozen", "--no-stitch-bn", "--stitch-steps", "5",
              "--stitch-lr", "0.05"]
    folder = ["--data", str(write_image_folder(root / "imgs")), "--width", "2", "--image-size", "32", "--cuts",
              "aligned", "--batch-size", "6", "--calib-images", "6", "--workers", "0", "--stitch-steps", "2",
              "--anchor-steps", "1", *_weight_files(root, "imagenet", 1000)]
    runs = {"joint": joint, "frozen": frozen, "folder": folder}
    text = torchrun([["--out", str(root / name / "results"), "seam", "train", "--family", str(root / name / "family"),
                      *args] for name, args in runs.items()], cwd=root)
    return root, cifar, runs, text


def test_shards_of_a_global_batch_are_the_single_process_batch(tmp_path):
    from gpulab.seam import data as sdata

    cifar = write_cifar(tmp_path / "cifar", n_train=40, n_test=4)
    x, y = sdata.load_cifar10(cifar, "train")
    one = sdata.TensorSource(x, y, 16, 3, "cpu")
    two = [sdata.TensorSource(x, y, 16, 3, "cpu", rank=r, world=2) for r in range(2)]
    for step in (0, 1, 4):
        xs, ys = one.batch(step)
        (x0, y0), (x1, y1) = (s.batch(step) for s in two)
        assert torch.equal(xs[0::2], x0) and torch.equal(xs[1::2], x1)
        assert torch.equal(ys[0::2], y0) and torch.equal(ys[1::2], y1)


def test_ddp_joint_training_completes_and_rank0_writes_once(tmp_path, ddp):
    root, _, runs, text = ddp
    args = runs["joint"]
    ddp_out, ddp_fam = root / "joint" / "results", root / "joint" / "family"
    rec = _record(ddp_out)
    _check_written_by_rank0(ddp_out, ddp_fam, rec)
    assert text.count("wrote ") == 3  # rank 0 alone reported writing, once per run
    assert [r["phase"] for r in rec["rows"]] == ["anchor:resnet34", "anchor:resnet50", "calibrate", "stitch"]

    from gpulab.seam import store

    fam, info = store.load_family(ddp_fam)
    assert info["train"]["batch_size"] == 16 and len(fam.cuts) == 34

    # the single-process run with the same seed and global batch: same phases, steps, epochs and rates;
    # the weights are not compared (train-mode BN, see the module docstring)
    single_train(tmp_path / "r1", tmp_path / "single", args)
    one = _record(tmp_path / "r1")
    keep = ("phase", "steps", "epochs", "lr")
    assert [{k: r.get(k) for k in keep} for r in rec["rows"]] == [{k: r.get(k) for k in keep} for r in one["rows"]]
    drop = ("family", "world_size")
    assert {k: v for k, v in rec["config"].items() if k not in drop} == \
        {k: v for k, v in one["config"].items() if k not in drop}
    assert "ddp_ranks_hold_equal_parameters" not in one["checks"]
    assert _weights(ddp_fam).keys() == _weights(tmp_path / "single").keys()


def test_ddp_equals_single_process_without_batch_statistics(tmp_path, ddp):
    root, _, runs, _ = ddp
    args = runs["frozen"]
    ddp_out, ddp_fam = root / "frozen" / "results", root / "frozen" / "family"
    rec = _record(ddp_out)
    _check_written_by_rank0(ddp_out, ddp_fam, rec)
    single_train(tmp_path / "r1", tmp_path / "single", args)
    one = _record(tmp_path / "r1")
    d, s = _weights(ddp_fam), _weights(tmp_path / "single")
    assert d.keys() == s.keys()
    for k in d:
        assert torch.allclose(d[k].double(), s[k].double(), rtol=1e-4, atol=1e-5), k
    assert sum(k.startswith("stitches.") for k in d) == 2 * 34  # conv weight and bias of every stitch, no BN
    loss_d = next(r["final_loss"] for r in rec["rows"] if r["phase"] == "stitch")
    loss_s = next(r["final_loss"] for r in one["rows"] if r["phase"] == "stitch")
    assert loss_d == pytest.approx(loss_s, rel=1e-5)
    # the stitches did train: the weights moved away from the least-squares init of a 0-step run
    single_train(tmp_path / "r0", tmp_path / "zero", [*args[:-4], "--stitch-steps", "0"])
    z = _weights(tmp_path / "zero")
    assert max(float((s[k] - z[k]).abs().max()) for k in s if k.startswith("stitches.")) > 1e-4


def test_ddp_on_an_image_folder(ddp):
    """ImageFolder batches sharded over the ranks (3 images each), ImageNet stem at 32x32, anchors from
    local weights with 1000-class heads (re-initialised for the 3 classes and fine-tuned), joint fine-tuning."""
    root, _, _, _ = ddp
    rec = _record(root / "folder" / "results")
    _check_written_by_rank0(root / "folder" / "results", root / "folder" / "family", rec)
    assert rec["config"]["data"]["format"] == "imagefolder" and rec["config"]["spec"]["num_classes"] == 3
    # their fresh heads make both anchors fine-tuned from the loaded weights first
    assert [(r["phase"], r["steps"]) for r in rec["rows"]] == [("anchor:resnet34", 1), ("anchor:resnet50", 1),
                                                               ("calibrate", 0), ("stitch", 2)]
    assert sum("fc re-initialised; fine-tuned" in n for n in rec["notes"]) == 2


@pytest.mark.gpu
def test_device_cpu_runs_ddp_on_gloo_where_cuda_is_visible(tmp_path):
    """With a GPU visible, `--device cpu` must still pick gloo (not NCCL, which cannot reduce CPU tensors)
    and keep every rank off the GPU; 2 ranks, the exact configuration, against a single-process run."""
    cifar = write_cifar(tmp_path / "cifar", n_train=32, n_test=4)
    args = [*COMMON, "--data", str(cifar), *_weight_files(tmp_path, "cifar", 10), "--mode", "frozen",
            "--no-stitch-bn", "--stitch-steps", "3"]
    torchrun([["--out", str(tmp_path / "ddp" / "results"), "seam", "train", "--family", str(tmp_path / "ddp" / "f"),
               *args]], cwd=tmp_path)
    rec = _record(tmp_path / "ddp" / "results")
    _check_written_by_rank0(tmp_path / "ddp" / "results", tmp_path / "ddp" / "f", rec)
    assert rec["config"]["device"] == "cpu"
    single_train(tmp_path / "r1", tmp_path / "single", args)
    d, s = _weights(tmp_path / "ddp" / "f"), _weights(tmp_path / "single")
    for k in d:
        assert torch.allclose(d[k].double(), s[k].double(), rtol=1e-4, atol=1e-5), k
