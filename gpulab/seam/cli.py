"""``gpulab seam train | eval | select``: stitched ResNet34/ResNet50 families.

Heavy imports (torch, torchvision, matplotlib) happen inside the commands.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stitched ResNet34/ResNet50 families: train, evaluate, select.")

FAMILY_HELP = "Family folder (default: <--out>/seam-family)."
DATA_HELP = "CIFAR-10 npz folder or an ImageNet-style folder with train/ and val/ (default: ../shared/data/cifar10 beside the checkout, or $GPULAB_DATA/cifar10)."


def _family(path: Optional[Path]) -> Path:
    from gpulab.core import options

    return Path(path) if path else options.get().out / "seam-family"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_weights(items: list[str]) -> dict[str, str]:
    from gpulab.core.errors import InputError

    out = {}
    for item in items:
        arch, sep, path = item.partition("=")
        if not sep or not arch or not path:
            raise InputError(f"--weights must be ARCH=PATH (e.g. resnet50=weights/resnet50.pth), got {item!r}")
        if arch.strip() in out:
            raise InputError(f"--weights gives {arch.strip()} twice")
        out[arch.strip()] = path.strip()
    return out


def _refuse_workers(ctx, fmt: str) -> None:
    """CIFAR-10 is batched from memory, without a data loader: --workers would be ignored."""
    from gpulab.core.clickcompat import refuse_unused

    refuse_unused(ctx, {"workers": "--workers"}, fmt != "cifar10", "image folders",
                  " (CIFAR-10 is batched from memory, without loader workers)")


@app.command()
def train(
    ctx: typer.Context,
    family: Optional[Path] = typer.Option(None, "--family", help=FAMILY_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
    anchors: str = typer.Option("resnet34,resnet50", "--anchors", help="The two anchors, front,back."),
    baselines: str = typer.Option("", "--baselines", help="Extra baselines trained alongside, e.g. resnet18."),
    width: int = typer.Option(64, "--width", help="Base width (64 = torchvision's ResNets)."),
    stem: str = typer.Option("auto", "--stem", help="auto | cifar (3x3 conv, no max-pool) | imagenet."),
    image_size: int = typer.Option(0, "--image-size", help="Crop size for ImageNet-style folders (0: 224); "
                                                           "CIFAR-10 is always 32."),
    cuts: str = typer.Option("all", "--cuts", help="all (every stride-matching p,q) | aligned (p == q)."),
    stitch_bn: bool = typer.Option(True, "--stitch-bn/--no-stitch-bn", help="BatchNorm after the 1x1 conv."),
    train_images: int = typer.Option(0, "--train-images", help="Use N training images (0: all; CIFAR-10: the first N, "
                                                                "image folders: a fixed-seed spread)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch size."),
    anchor_epochs: float = typer.Option(30.0, "--anchor-epochs", help="Epochs per anchor trained from scratch."),
    stitch_epochs: float = typer.Option(10.0, "--stitch-epochs", help="Epochs of stitch fine-tuning."),
    anchor_steps: Optional[int] = typer.Option(None, "--anchor-steps", help="Steps per anchor (overrides epochs)."),
    stitch_steps: Optional[int] = typer.Option(None, "--stitch-steps", help="Stitch steps (overrides epochs)."),
    lr: float = typer.Option(0.1, "--lr", help="Peak SGD learning rate for anchors."),
    stitch_lr: float = typer.Option(0.01, "--stitch-lr", help="Peak SGD learning rate for fine-tuning (stitches, and nets loaded with a new head)."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    mode: str = typer.Option("joint", "--mode", help="joint (SN-Net: one member per step) | frozen (stitches only)."),
    calib_images: int = typer.Option(100, "--calib-images", help="Images for the least-squares stitch init."),
    lstsq_ridge: float = typer.Option(1e-2, "--lstsq-ridge", help="Relative ridge of the least-squares init."),
    weights: List[str] = typer.Option([], "--weights", help="ARCH=PATH: local pretrained weights (repeatable)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <family>/checkpoint.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing family folder's training."),
    workers: int = typer.Option(8, "--workers", help="Data-loader workers (ImageNet-style folders)."),
) -> None:
    """Train the anchors (or load local weights), init every stitch by least squares, fine-tune the family."""
    import time

    import torch

    from gpulab.core import options
    from gpulab.core.errors import DeviceError, InputError
    from gpulab.seam import data as sdata
    from gpulab.seam import dist as sdist
    from gpulab.seam.models import FamilySpec
    from gpulab.seam.train import TrainConfig, Trainer, dist_env

    folder = _family(family)
    from gpulab.core.files import blocking_file
    from gpulab.core.results import check_out_folder

    check_out_folder(options.get().out)  # both written at the end of a long training: checked before it
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--family {folder}: not a folder")
    if (above := blocking_file(folder)) is not None:  # refused here, not as an OSError on the first write
        raise InputError(f"--family {folder}: {above} is not a folder")
    root, fmt = sdata.resolve_data(data)
    names = _csv(anchors)
    if len(names) != 2:
        raise InputError(f"--anchors needs two architectures, got {anchors!r}")
    if train_images < 0:
        raise InputError(f"--train-images must be >= 0, got {train_images}")
    if workers < 0:  # refused with CIFAR-10 too, not only where an image folder's loader takes it
        raise InputError(f"--workers must be >= 0, got {workers}")
    _refuse_workers(ctx, fmt)
    if image_size < 0:
        raise InputError(f"--image-size must be >= 0, got {image_size}")
    if fmt == "cifar10" and image_size not in (0, 32):
        raise InputError(f"--image-size {image_size}: CIFAR-10 images are 32x32 (the option is for image folders)")
    stem_kind = ("cifar" if fmt == "cifar10" else "imagenet") if stem == "auto" else stem
    spec = FamilySpec(anchors=(names[0], names[1]), width=width, stem=stem_kind,
                      num_classes=10 if fmt == "cifar10" else 0, cuts=cuts, stitch_bn=stitch_bn,
                      baselines=_csv(baselines), image_size=32 if fmt == "cifar10" else (image_size or 224))
    device = options.resolve_device(what="seam train")
    rank, world, local = dist_env()
    if world > 1:
        if batch_size % world:
            raise InputError(f"--batch-size {batch_size} is not divisible by the {world} ranks")
        if device == "cuda" and local >= torch.cuda.device_count():
            raise DeviceError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible")
    # torchrun: one process group for the whole command, destroyed on every rank when the block exits
    pg = sdist.ProcessGroup(world, device, local)
    with pg:
        if device == "cuda" and world > 1:
            device = f"cuda:{local}"
        class_names = None
        if fmt == "cifar10":
            x, y = sdata.load_cifar10(root, "train", train_images or None)
            source = sdata.TensorSource(x, y, batch_size, seed, device, train=True, rank=rank, world=world)
            data_info = {"format": fmt, "path": str(Path(root).resolve()), "train_images": int(x.shape[0])}
        else:
            source = sdata.FolderSource(root, "train", batch_size, seed, device, workers=workers, rank=rank,
                                        world=world, image_size=spec.image_size)
            if train_images:
                source.limit(train_images)
            spec.num_classes = len(source.ds.classes)
            class_names = list(source.ds.classes)  # kept in family.yaml: eval checks val/ against them
            data_info = {"format": fmt, "path": str(Path(root).resolve()), "train_images": len(source.ds),
                         "image_size": spec.image_size}
        spec.validate("options")
        cfg = TrainConfig(spec=spec, batch_size=batch_size, anchor_epochs=anchor_epochs, stitch_epochs=stitch_epochs,
                          anchor_steps=anchor_steps, stitch_steps=stitch_steps, lr=lr, stitch_lr=stitch_lr,
                          weight_decay=weight_decay, mode=mode, calib_images=calib_images, lstsq_ridge=lstsq_ridge,
                          amp=amp, seed=seed, checkpoint_every=checkpoint_every, weights=_parse_weights(weights))
        cfg.validate()  # the options first, then what they ask of the data
        if fmt == "cifar10" and data_info["train_images"] < batch_size:  # as the image folders: batches would
            raise InputError(f"{data_info['train_images']} training images, fewer than one batch "  # repeat images
                             f"(--batch-size {batch_size})")
        exists = (folder / "family.yaml").exists() or (folder / "checkpoint.pt").exists()
        if exists and not (resume or overwrite):
            raise InputError(f"{folder} already holds a family; pass --resume to continue it or --overwrite")
        if resume and overwrite:
            raise InputError("--resume and --overwrite exclude each other")
        log = (lambda s: typer.echo(s, err=True)) if rank == 0 else (lambda s: None)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, folder, source, device, log=log)
        trainer.data_info = data_info
        if resume:
            trainer.resume()
            if trainer.phase_index == len(trainer.plan()) and _family_is_checkpoints(folder, trainer):
                # nothing left to train: the family, its evaluation and selections stay as they are
                log(f"{folder}: the training is complete; nothing to resume (no record written)")
                return
            log(f"resumed at phase {trainer.phase_index}, step {trainer.step}")
        # every rank has checked the folder (and read the checkpoint) before rank 0 removes or writes anything
        pg.barrier()
        if rank == 0 and not resume:  # the old family stays until the new one is saved (a crash keeps it)
            (folder / "checkpoint.pt").unlink(missing_ok=True)
        pg.barrier()
        trainer.run()
        seconds = time.perf_counter() - t0
        in_sync = pg.params_in_sync(trainer.family)  # collective: every rank takes part
        if rank == 0:
            path = _train_record(trainer, folder, cfg, data_info, device, world, seconds, fmt, in_sync, class_names)
        pg.barrier()  # the other ranks leave once rank 0's family folder and record are on disk
    if rank == 0:
        typer.echo(f"wrote {path} and {folder}/")


def _family_is_checkpoints(folder: Path, trainer) -> bool:
    """family.yaml holds the training that the (finished) checkpoint holds: the same settings and history (a run
    killed after its last checkpoint but before the family was written leaves an older family there)."""
    import yaml

    from gpulab.core.files import read_yaml_mapping
    from gpulab.core.results import yaml_text
    from gpulab.seam.train import RESUME_FREE, first_difference

    p = folder / "family.yaml"
    if not p.is_file():
        return False
    info = read_yaml_mapping(p, f"{p} not found")
    train = info.get("train") if isinstance(info.get("train"), dict) else {}
    # both as YAML reads them back (tuples as lists), the settings a resume may change left out
    same_cfg = first_difference(yaml.safe_load(yaml_text(train)), yaml.safe_load(yaml_text(trainer.cfg.as_dict())),
                                skip=RESUME_FREE) is None
    return same_cfg and yaml_text(info.get("history")) == yaml_text(trainer.history)


def _train_record(trainer, folder: Path, cfg, data_info: dict, device: str, world: int, seconds: float, fmt: str,
                  in_sync, class_names: list[str] | None = None) -> Path:
    """Rank 0: the family folder (with the class names of an image folder) and the seam-train record."""
    from gpulab.core import results
    from gpulab.seam import store

    family_data = {**data_info, "classes": class_names} if class_names is not None else data_info
    store.save_family(folder, trainer.family, trainer.summary_info(family_data))
    (folder / "eval.yaml").unlink(missing_ok=True)  # of the family just replaced, and the selections made from it
    store.remove_selections(folder)
    rec = results.Record(name="seam-train", config={**cfg.as_dict(), "family": str(folder), "data": data_info,
                                                      "device": device, "world_size": world})
    fam = trainer.family
    for h in trainer.history:
        rec.rows.append({k: h.get(k) for k in ("phase", "steps", "epochs", "lr", "final_loss", "train_top1_sampled",
                                              "mean_rel_mse_lstsq", "seconds") if k in h})
    lst = trainer.lstsq
    lowered = [k for k, r in lst.items() if r["mse_lstsq"] <= r["mse_init"] + 1e-12]
    rec.check("lstsq_lowers_activation_mse", len(lowered) == len(lst) and len(lst) == len(fam.cuts),
              f"{len(lowered)} of {len(fam.cuts)} stitches")
    rec.check("losses_finite", all(h.get("loss_finite", True) for h in trainer.history))
    bad = [k for k, v in fam.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    rec.check("weights_finite", not bad, f"non-finite values in {len(bad)} tensors, e.g. {bad[0]}" if bad else "")
    if in_sync is not None:
        rec.check("ddp_ranks_hold_equal_parameters", in_sync[0], in_sync[1])
    rec.metrics = {"lstsq": lst, "history": trainer.history, "n_stitches": len(fam.cuts),
                   "n_members": len(fam.members())}
    rel = [r["mse_lstsq"] / max(r["target_ms"], 1e-12) for r in lst.values()]
    rec.summary = {"family": str(folder), "stitches": len(fam.cuts), "train_images": data_info["train_images"],
                   "lstsq_rel_mse_mean": sum(rel) / len(rel) if rel else None, "seconds": round(seconds, 1)}
    rec.notes += trainer.notes
    if world > 1:
        rec.notes.append(f"DDP over {world} ranks: BatchNorm statistics are per rank ({cfg.batch_size // world} "
                         f"images), losses and sampled accuracy are averaged over the ranks")
    if fmt == "cifar10" and data_info["train_images"] < 50000:  # --train-images, or a folder holding fewer
        rec.notes.append(f"trained on {data_info['train_images']} CIFAR-10 training images; the full training set "
                         "has 50000")
    path = rec.save()
    rec.print()
    return path


@app.command("eval")
def eval_(
    ctx: typer.Context,
    family: Optional[Path] = typer.Option(None, "--family", help=FAMILY_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
    test_images: int = typer.Option(0, "--test-images", help="Use N test images (0: all; CIFAR-10: the first N, "
                                                              "image folders: a fixed-seed spread)."),
    batch_size: int = typer.Option(500, "--batch-size", help="Evaluation batch size."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency at batch 1 and 64."),
    latency_reps: int = typer.Option(20, "--latency-reps", help="Timed repetitions per latency."),
    latency_batches: str = typer.Option("1,64", "--latency-batches", help="Batch sizes whose latency is measured."),
    verify_flops: int = typer.Option(4, "--verify-flops", help="Stitches per direction whose FLOPs are also "
                                                               "counted whole (-1: all)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    workers: int = typer.Option(8, "--workers", help="Data-loader workers (ImageNet-style folders)."),
) -> None:
    """Evaluate every model of a family (top-1, FLOPs, params, latency); which stitches interpolate."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    import torch

    from gpulab.core import options, results
    from gpulab.core.errors import InputError
    from gpulab.seam import data as sdata
    from gpulab.seam import store
    from gpulab.seam.evaluate import amp_agreement, evaluate, interpolation
    from gpulab.core.device import bf16_native
    from gpulab.seam.measure import autocast_for

    folder = _family(family)
    store.check_writable(folder)
    if test_images < 0:
        raise InputError(f"--test-images must be >= 0, got {test_images}")
    if batch_size < 1 or latency_reps < 1:
        raise InputError("--batch-size and --latency-reps must be >= 1")
    if verify_flops < -1:
        raise InputError(f"--verify-flops must be >= -1 (-1: all), got {verify_flops}")
    if workers < 0:
        raise InputError(f"--workers must be >= 0, got {workers}")
    from gpulab.core.clickcompat import refuse_unused

    # --no-latency times nothing: its batch sizes and repetitions would be ignored
    refuse_unused(ctx, {"latency_batches": "--latency-batches", "latency_reps": "--latency-reps"}, latency,
                  "--latency")
    try:
        lat_batches = tuple(int(b) for b in _csv(latency_batches))
    except ValueError:
        raise InputError(f"--latency-batches must be comma-separated integers, got {latency_batches!r}") from None
    if latency and (not lat_batches or min(lat_batches) < 1):
        raise InputError(f"--latency-batches must be positive integers, got {latency_batches!r}")
    device = options.resolve_device(what="seam eval")
    fam, info = store.load_family(folder, device)
    root, fmt = sdata.resolve_data(data or (info.get("data") or {}).get("path"))
    _refuse_workers(ctx, fmt)
    trained_on = info.get("data") or {}
    if trained_on.get("format") not in (None, fmt):  # other normalization, other labels: a meaningless top-1
        raise InputError(f"{root}: {fmt} data, the family was trained on {trained_on['format']} data "
                         f"({trained_on.get('path')}); evaluate it on data of that kind")
    if device == "cuda":
        fam.to(memory_format=torch.channels_last)
    if fmt == "cifar10":
        if fam.spec.num_classes != 10:
            raise InputError(f"{folder}: the family has {fam.spec.num_classes} classes, CIFAR-10 has 10")
        x, y = sdata.load_cifar10(root, "test", test_images or None)
        src = sdata.TensorSource(x, y, batch_size, 0, device, train=False)
        batches = lambda: src.eval_batches(batch_size)  # noqa: E731
        n_test = int(x.shape[0])
    else:
        src = sdata.FolderSource(root, "val", batch_size, 0, device, train=False, workers=workers,
                                 image_size=fam.spec.image_size)
        if len(src.ds.classes) != fam.spec.num_classes:
            raise InputError(f"{root}/val has {len(src.ds.classes)} classes, the family {fam.spec.num_classes}")
        trained = (info.get("data") or {}).get("classes")  # families trained before this was kept have none
        # as strings: a family.yaml of an older version may hold a class folder "008" read back as the number 8
        if isinstance(trained, list) and [str(c) for c in trained] != list(src.ds.classes):
            i = next(i for i, (a, b) in enumerate(zip(trained, src.ds.classes)) if str(a) != b)
            raise InputError(f"{root}/val: class {i} is '{src.ds.classes[i]}', the family was trained with "
                             f"'{trained[i]}' (labels would not match)")
        if test_images:
            src.limit(test_images)
        batches = lambda: src.eval_batches(batch_size)  # noqa: E731
        n_test = len(src.ds)
    amp_on = amp and bf16_native(device)  # bf16 autocast needs native bf16 (compute capability 8.0 on)
    autocast = autocast_for(device, amp)
    rows, checks = evaluate(fam, batches, device, autocast, amp, latency=latency, latency_reps=latency_reps,
                            latency_batches=lat_batches, sample=verify_flops, log=lambda s: typer.echo(s, err=True))
    interp = interpolation(rows, n_test)
    rec = results.Record(name="seam-eval", config={"family": str(folder), "data": str(root), "test_images": n_test,
                                                     "device": device, "amp": amp, "latency": latency,
                                                     "latency_reps": latency_reps, "spec": fam.spec.as_dict()})
    for name, (passed, detail) in checks.items():
        rec.check(name, passed, detail)
    if amp and device.startswith("cuda") and not amp_on:
        rec.notes.append("--amp: this GPU has no native bf16 (compute capability < 8.0): evaluated in fp32")
    if amp_on:
        first = next(iter(batches()))[0][:64].contiguous(memory_format=torch.channels_last)
        worst = amp_agreement(fam, first, autocast)
        rec.check("bf16_logits_close_to_fp32", worst["rms"] < 0.25,
                  f"rms(bf16 - fp32) / std = {worst['rms']:.4f} (max |bf16 - fp32| / std = {worst['max']:.4f})")
    cols = ["name", "kind", "top1", "gmacs", "params", "latency_b1_ms", "latency_b64_ms", "latency_mode",
            "interpolates"]
    rec.rows = [{k: r.get(k) for k in cols if k in r} for r in rows]
    anchors = [r for r in rows if r["kind"] == "anchor"]
    rec.metrics = {"interpolation": interp, "models": rows}
    rec.summary = {"models": len(rows), "stitches": interp["stitches"], "interpolating": interp["interpolating"],
                   "interpolate_fraction": interp["fraction"],
                   "interpolate_fraction_within_noise": interp.get("fraction_within_noise"),
                   "flops_between_fraction": interp["flops_between_fraction"],
                   "acc_between_fraction": interp["acc_between_fraction"],
                   **{f"{a['name']}_top1": a["top1"] for a in anchors}}
    if interp["stitches"] and interp["flops_between"] < interp["stitches"]:
        rec.notes.append(f"only {interp['flops_between']} of {interp['stitches']} stitches have FLOPs between the "
                         "anchors' (fixed by the architectures and the cut set, whatever the training): at most "
                         f"{interp['flops_between_fraction']:.1%} can interpolate")
    if interp.get("anchor_band") is not None and interp["anchor_band"] <= interp["anchor_band_noise_95"]:
        rec.notes.append(f"the anchors' top-1 differ by {interp['anchor_band']:.4f}, within the 95% noise of a "
                         f"difference on {n_test} images ({interp['anchor_band_noise_95']:.4f}): whether a stitch "
                         "lands strictly between them is largely chance (see interpolate_fraction_within_noise)")
    if n_test < 10000 and fmt == "cifar10":  # the folder may hold fewer than CIFAR-10's 10000
        rec.notes.append(f"top-1 on {n_test} CIFAR-10 test images" + (" (the first of the folder's)" if test_images
                                                                       else "") + "; the full test set has 10000")
    if not latency:
        rec.notes.append("latency not measured (--no-latency)")
    elif device == "cpu":
        rec.notes.append("latency measured on the CPU (no GPU visible): not a GPU figure")
    path = rec.save()  # first: a record that cannot be written leaves the family's eval.yaml and selections as they were
    store.save_eval(folder, {"family": str(folder), "device": device, "amp": amp_on,
                             "test_images": n_test, "interpolation": interp, "models": rows})
    rec.print()
    typer.echo(f"wrote {path} and {folder / 'eval.yaml'}")


@app.command("select")
def select_(
    accuracy: str = typer.Option("", "--accuracy", help="Top-1 constraint(s) in percent, e.g. 93.5 or 92,93,94; "
                                                         "empty: every top-1 a model reaches (a sweep)."),
    metric: str = typer.Option("flops", "--metric", help="flops | params | latency (batch 1) | latency64."),
    family: Optional[Path] = typer.Option(None, "--family", help=FAMILY_HELP + " Must hold eval.yaml (or name an "
                                                                  "eval.yaml: the outputs go beside it)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the Pareto plot (PNG)."),
) -> None:
    """Pick the lightest model meeting an accuracy constraint; compare with the baselines; Pareto plot."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    from gpulab.core import atomic, results
    from gpulab.core.results import yaml_text
    from gpulab.seam import select as sel
    from gpulab.seam import store

    folder = _family(family)
    ev = store.load_eval(folder)
    out_dir = Path(ev["path"]).parent  # --family may name the eval.yaml itself: write beside it
    store.check_writable(out_dir)
    models = ev["models"]
    levels = sel.parse_accuracies(accuracy)
    rows, key = sel.select(models, levels, metric)
    front = sel.pareto_front(models, key)
    rec = results.Record(name="seam-select", config={"family": str(folder), "accuracy": accuracy or "sweep",
                                                       "metric": metric, "eval": ev["path"]})
    rec.rows = rows
    with_base = [r for r in rows if r["lighter"] is not None]
    lighter = [r for r in with_base if r["lighter"]]
    # the reference: brute force over all models must agree with the selection at every level
    from gpulab.seam.reference import lightest_meeting

    agree = all((lightest_meeting(models, r["accuracy"], key) or {}).get(key) == r.get(f"chosen_{metric}")
                for r in rows)
    rec.check("selection_matches_brute_force", agree)
    pareto_names = {m["name"] for m in front}
    rec.check("selected_on_pareto_front", all(r["chosen"] in pareto_names for r in rows if r["chosen"]))
    rec.summary = {"constraints": len(rows), "with_baseline": len(with_base), "lighter": len(lighter),
                   "lighter_fraction": len(lighter) / len(with_base) if with_base else None,
                   "pareto_models": len(front),
                   "pareto_stitches": sum(m["kind"] == "stitch" for m in front)}
    rec.metrics = {"pareto_front": [{"name": m["name"], "top1": m["top1"], key: m[key]} for m in front]}
    infeasible = [r["accuracy"] for r in rows if r["chosen"] is None]
    if infeasible:
        rec.notes.append(f"no model meets accuracy {', '.join(f'{100 * a:.2f}%' for a in infeasible)}")
    out_yaml, png = out_dir / f"select-{metric}.yaml", out_dir / f"select-{metric}.png"
    outputs = [(out_yaml, atomic.text_writer(yaml_text({"metric": metric, "key": key, "selections": rows,
                                                          "pareto_front": rec.metrics["pareto_front"]})), "")]
    if plot:  # drawn before anything is written: a plot that fails leaves no record pointing at it
        outputs.append((png, atomic.bytes_writer(sel.plot_png(models, key, metric, rows, title=f"{out_dir.name}: "
                                                               f"{len(models)} models, metric {metric}")), ""))
        rec.metrics["plot"] = str(png)
    path = rec.save()  # first: a record that cannot be written leaves the family folder as it was
    atomic.write_all(outputs)
    if not plot:  # an earlier selection's plot would sit beside this selection's YAML
        png.unlink(missing_ok=True)
    rec.print()
    typer.echo(f"wrote {path}, {out_yaml}" + (f", {rec.metrics['plot']}" if plot else ""))
