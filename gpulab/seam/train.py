"""Training a stitched family: anchors (from scratch or local weights), least-squares stitch init,
then fine-tuning.

Phases, in order, each resumable from ``<family>/checkpoint.pt``:

1. ``anchor:<arch>`` for every anchor and baseline without ``--weights`` (from scratch), or whose
   weights came with a head of another class count (fine-tuned from them at the fine-tuning rate
   ``stitch_lr``: a fresh head left untrained would score near chance): SGD (Nesterov, momentum 0.9),
   linear warm-up then cosine decay, cross-entropy, random-crop/flip augmentation.
2. ``calibrate``: every stitching layer by least squares on ``calib_images`` training images.
3. ``stitch``: ``joint`` fine-tunes the whole family, sampling one member per step uniformly among
   the anchors and all stitches (as SN-Net does); ``frozen`` keeps the anchors fixed and trains only
   the stitching layers (each stitch alone: their parameters are disjoint).

``--resume`` continues only a run of the same settings (all of :class:`TrainConfig` but
``checkpoint_every``) and the same phases and step counts; anything else is a one-line error.

Mixed precision: bf16 autocast on CUDA (fp32 master weights, no loss scaling needed); channels_last.
Under ``torchrun`` (WORLD_SIZE > 1) every rank takes its share of each global batch, the model is
wrapped in DistributedDataParallel (find_unused_parameters, since a step runs one member), all ranks
draw the same member (seeded by the step), rank 0 alone writes files (the others wait at a barrier
until it has), and the reported losses and sampled accuracies are averaged over the ranks.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpulab.core.device import bf16_native
from gpulab.core.errors import InputError
from gpulab.seam import dist as sdist
from gpulab.seam import store
from gpulab.seam.measure import autocast_for
from gpulab.seam.models import NEW_HEAD_NOTE, FamilySpec, StitchedFamily, load_pretrained
from gpulab.seam.stitch import least_squares_init

MODES = ("joint", "frozen")


@dataclass
class TrainConfig:
    spec: FamilySpec
    batch_size: int = 128
    anchor_epochs: float = 30.0
    stitch_epochs: float = 10.0
    anchor_steps: int | None = None
    stitch_steps: int | None = None
    lr: float = 0.1
    stitch_lr: float = 0.01
    weight_decay: float = 5e-4
    mode: str = "joint"
    calib_images: int = 100
    lstsq_ridge: float = 1e-2
    amp: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    weights: dict[str, str] = field(default_factory=dict)
    label_smoothing: float = 0.0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("anchor_epochs", "stitch_epochs", "lr", "stitch_lr", "weight_decay", "lstsq_ridge",
                     "label_smoothing"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
        for name in ("anchor_epochs", "stitch_epochs"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("anchor_steps", "stitch_steps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.calib_images < 1:
            raise InputError(f"--calib-images must be >= 1, got {self.calib_images}")
        if self.lr <= 0 or self.stitch_lr <= 0:
            raise InputError("--lr and --stitch-lr must be > 0")
        if self.lstsq_ridge < 0:
            raise InputError(f"--lstsq-ridge must be >= 0, got {self.lstsq_ridge}")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.checkpoint_every < 1:
            raise InputError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        nets = set(self.spec.anchors) | set(self.spec.baselines)
        for arch in self.weights:
            if arch not in nets:
                raise InputError(f"--weights {arch}=...: {arch} is neither an anchor nor a baseline")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.as_dict()
        return d


# Settings that a resumed run may change: they do not change what is trained.
RESUME_FREE = ("checkpoint_every",)
TAIL_STEPS = 50  # a phase's final_loss: the mean loss of its last min(50, steps / 4) steps


def first_difference(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...] = (),
                     prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first setting (in ``new``'s order, nested keys as ``spec.width``) whose value differs, with the
    old and the new value; a setting missing from ``old`` (an older checkpoint) differs as None."""
    for key in [*new, *(k for k in old if k not in new)]:
        if key in skip:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = first_difference(a, b, (), f"{prefix}{key}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_sgd(params: list[torch.nn.Parameter], lr: float, wd: float) -> torch.optim.SGD:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True)


def dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def phases(cfg: TrainConfig, new_heads: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The phases in order: an anchor phase for every anchor and baseline without ``--weights``, or whose
    weights came with a head of another class count (``new_heads``: it is fine-tuned, head and all, from
    the loaded weights), then calibrate and stitch."""
    nets = [*cfg.spec.anchors, *cfg.spec.baselines]
    return [f"anchor:{a}" for a in nets if a not in cfg.weights or a in new_heads] + ["calibrate", "stitch"]


def phase_steps(cfg: TrainConfig, phase: str, steps_per_epoch: int) -> int:
    """A phase's steps: given, or its epochs' worth (at least one step for epochs > 0: 0.1 epoch of 4 batches must
    not round to an untrained phase)."""
    def of(epochs: float) -> int:
        return max(1, int(round(epochs * steps_per_epoch))) if epochs > 0 else 0

    if phase.startswith("anchor:"):
        return cfg.anchor_steps if cfg.anchor_steps is not None else of(cfg.anchor_epochs)
    if phase == "stitch":
        return cfg.stitch_steps if cfg.stitch_steps is not None else of(cfg.stitch_epochs)
    return 0


class Trainer:
    """Runs the phases of :func:`phases` on a family, checkpointing into ``folder``."""

    def __init__(self, cfg: TrainConfig, folder: Path, source, device: str, log=print) -> None:
        cfg.validate()
        self.cfg, self.folder, self.source, self.device, self.log = cfg, Path(folder), source, device, log
        self.rank, self.world, _ = dist_env()
        torch.manual_seed(cfg.seed)
        self.family = StitchedFamily(cfg.spec)
        self.notes: list[str] = []
        self.new_heads: set[str] = set()  # loaded with a head of another class count: trained in an anchor phase
        for arch, path in cfg.weights.items():
            notes = load_pretrained(self.family.net(arch), path)
            if any(n.startswith(NEW_HEAD_NOTE) for n in notes):
                self.new_heads.add(arch)
                notes = [n.removeprefix(NEW_HEAD_NOTE) + f"; fine-tuned in phase anchor:{arch}" for n in notes]
            self.notes += notes
        self.family.to(device)
        if device.startswith("cuda"):
            self.family.to(memory_format=torch.channels_last)
        self.autocast = autocast_for(device, cfg.amp)
        if cfg.amp and device.startswith("cuda") and not bf16_native(device):
            self.notes.append("--amp: this GPU has no native bf16 (compute capability < 8.0): trained in fp32")
        self.history: list[dict[str, Any]] = []
        self.lstsq: dict[str, dict[str, float]] = {}
        self.phase_index, self.step, self.opt_state = 0, 0, None
        self.data_info: dict[str, Any] | None = None  # the training data (format, path, images): a resume needs the same

    # -- checkpoints ------------------------------------------------------------------------
    def plan(self) -> list[list]:
        """[phase, steps] of every phase: what phase_index and step of a checkpoint refer to."""
        return [[name, phase_steps(self.cfg, name, self.source.steps_per_epoch)]
                for name in phases(self.cfg, self.new_heads)]

    def state(self, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
        return {"config": self.cfg.as_dict(), "plan": self.plan(), "phase_index": self.phase_index,
                "step": self.step,
                "model": {k: v.detach().cpu() for k, v in self.family.state_dict().items()},
                "optimizer": opt.state_dict() if opt is not None else None,
                "history": self.history, "lstsq": self.lstsq, "notes": self.notes, "data": self.data_info}

    def save(self, opt: torch.optim.Optimizer | None) -> None:
        """Rank 0 writes the checkpoint; under DDP every rank waits until it is on disk."""
        if self.rank == 0:
            store.save_checkpoint(self.folder, self.state(opt))
        sdist.barrier()

    def resume(self) -> None:
        ck = store.load_checkpoint(self.folder)
        missing = [k for k in ("config", "model", "phase_index", "step") if k not in ck] if isinstance(ck, dict) else ["model"]
        if missing:
            raise InputError(f"{self.folder}/checkpoint.pt: not a seam training checkpoint (no '{missing[0]}'); "
                             "use --overwrite to start again")
        again = "resume with the same settings or use --overwrite to start again"
        diff = first_difference(ck["config"] if isinstance(ck["config"], dict) else {}, self.cfg.as_dict(),
                                skip=RESUME_FREE)
        if diff:
            key, old, new = diff
            raise InputError(f"{self.folder}/checkpoint.pt: was trained with {key} {old!r}, now {new!r}; {again}")
        # same settings but other data (a different --train-images, say) change the steps of epoch-based phases
        old_plan, new_plan = ck.get("plan"), self.plan()
        if old_plan is not None and [list(p) for p in old_plan] != new_plan:
            i = next((i for i, (a, b) in enumerate(zip(old_plan, new_plan)) if list(a) != b), None)
            what = (f"phase {new_plan[i][0]} has {old_plan[i][1]} steps, now {new_plan[i][1]}" if i is not None
                    else f"{len(old_plan)} phases, now {len(new_plan)}")
            raise InputError(f"{self.folder}/checkpoint.pt: planned {what} (other training data?); {again}")
        old_data = ck.get("data")
        if old_data is not None and self.data_info is not None and old_data != self.data_info:
            key = next(k for k in sorted({*old_data, *self.data_info}) if old_data.get(k) != self.data_info.get(k))
            raise InputError(f"{self.folder}/checkpoint.pt: was trained on data with {key} {old_data.get(key)!r}, "
                             f"now {self.data_info.get(key)!r}; {again}")
        plan = new_plan
        pi, step = ck["phase_index"], ck["step"]
        if not (isinstance(pi, int) and isinstance(step, int) and 0 <= pi <= len(plan)
                and step >= 0 and (pi == len(plan) or step <= plan[pi][1])):
            raise InputError(f"{self.folder}/checkpoint.pt: phase {pi!r}, step {step!r} is not a point of this "
                             f"training's {len(plan)} phases; {again}")
        try:
            self.family.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise InputError(f"{self.folder}/checkpoint.pt: does not fit this family ({str(e).splitlines()[0]})") from None
        self.phase_index, self.step, self.opt_state = ck["phase_index"], ck["step"], ck.get("optimizer")
        self.history, self.lstsq = ck.get("history", []), ck.get("lstsq", {})
        self.notes = ck.get("notes", self.notes)

    # -- phases -----------------------------------------------------------------------------
    def run(self) -> None:
        names = phases(self.cfg, self.new_heads)
        while self.phase_index < len(names):
            name = names[self.phase_index]
            t0 = time.perf_counter()
            if name == "calibrate":
                self.calibrate()
            else:
                self.train_phase(name)
            if self.history and self.history[-1]["phase"] == name:
                self.history[-1]["seconds"] = round(self.history[-1].get("seconds", 0) + time.perf_counter() - t0, 2)
            self.phase_index += 1
            self.step, self.opt_state = 0, None
            self.save(None)

    def calibrate(self) -> None:
        n = min(self.cfg.calib_images, self.source.x.shape[0]) if self.source.x is not None else self.cfg.calib_images
        images = self.source.first_images(n)
        n = int(images.shape[0])  # an image folder may hold fewer than asked for
        if self.device.startswith("cuda"):
            images = images.contiguous(memory_format=torch.channels_last)
        self.lstsq = least_squares_init(self.family, images, batch_size=max(1, min(50, n)),
                                         ridge=self.cfg.lstsq_ridge, autocast=self.autocast)
        rel = [r["mse_lstsq"] / max(r["target_ms"], 1e-12) for r in self.lstsq.values()]
        self.history.append({"phase": "calibrate", "steps": 0, "images": n, "stitches": len(self.lstsq),
                             "mean_rel_mse_lstsq": sum(rel) / max(len(rel), 1)})
        self.log(f"calibrate: {len(self.lstsq)} stitching layers by least squares on {n} images")

    def train_phase(self, name: str) -> None:
        cfg, fam = self.cfg, self.family
        total = phase_steps(cfg, name, self.source.steps_per_epoch)
        if name.startswith("anchor:"):
            arch = name.split(":", 1)[1]
            module = fam.net(arch)
            params = list(module.parameters())
            members = None
            base_lr = cfg.stitch_lr if arch in cfg.weights else cfg.lr  # fine-tuning loaded weights, or from scratch
        else:
            members = fam.members(("anchor", "stitch")) if cfg.mode == "joint" else fam.members(("stitch",))
            if cfg.mode == "joint":
                params = [p for a in fam.anchors.values() for p in a.parameters()] + list(fam.stitches.parameters())
            else:
                params = list(fam.stitches.parameters())
            module = fam
            base_lr = cfg.stitch_lr
        for p in fam.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = make_sgd(params, base_lr, cfg.weight_decay)
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
        model = module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(module, device_ids=[torch.cuda.current_device()] if self.device.startswith("cuda") else None,
                        find_unused_parameters=members is not None)
        warmup = min(total // 10, 5 * self.source.steps_per_epoch) if name.startswith("anchor:") else total // 20
        self.source.reseed(cfg.seed * 1000 + self.phase_index)
        if not (self.history and self.history[-1]["phase"] == name):
            self.history.append({"phase": name, "steps": total, "lr": base_lr,
                                 "epochs": round(total / self.source.steps_per_epoch, 3)})
        rec = self.history[-1]
        # the phase's figures over its steps before a resume, as its last checkpoint kept them
        before = rec.pop("_partial", None) or {"tail": [], "finite": True, "correct": 0, "seen": 0, "seconds": 0.0}
        # each step's loss goes into one buffer allocated up front (a list of detached losses kept small tensors
        # alive between the steps' large activation buffers, and on the CPU glibc's heap grew by about an
        # activation buffer a step)
        first = self.step
        loss_buf = torch.zeros(max(0, total - first), device=self.device)
        correct, seen = 0, 0
        t_log = t_start = time.perf_counter()

        def so_far() -> dict[str, Any]:  # the figures of the phase's steps up to now (this run and before it)
            losses = loss_buf[:self.step - first]
            return {"tail": (before["tail"] + losses[-TAIL_STEPS:].tolist())[-TAIL_STEPS:],
                    "finite": before["finite"] and bool(torch.isfinite(losses).all()),
                    "correct": before["correct"] + correct, "seen": before["seen"] + seen,
                    "seconds": before["seconds"] + time.perf_counter() - t_start}

        while self.step < total:
            fam.train()
            if members is not None and cfg.mode == "frozen":
                for a in fam.anchors.values():
                    a.eval()
            x, y = self.source.batch(self.step)
            if self.device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(self.step, total, base_lr, warmup)
            with self.autocast():
                if members is None:
                    logits = model(x)
                else:
                    m = members[random.Random(cfg.seed * 1_000_003 + self.step).randrange(len(members))]
                    logits = model(x, m.name)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_buf[self.step - first] = loss.detach()
            self.step += 1
            if self.step % 10 == 0 or self.step == total:  # a sampled training accuracy (one sync per 10 steps)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += y.numel()
            if self.step % cfg.checkpoint_every == 0 and self.step < total:
                rec["_partial"] = so_far()  # in the checkpoint: a resumed phase reports all of its steps
                self.save(opt)
                del rec["_partial"]
            if time.perf_counter() - t_log > 30 and self.rank == 0:
                recent = loss_buf[max(0, self.step - first - 50):self.step - first]
                self.log(f"{name}: step {self.step}/{total} loss {float(recent.mean()):.4f}")
                t_log = time.perf_counter()
        done = so_far()
        if before["seconds"]:  # run() adds this run's time
            rec["seconds"] = round(before["seconds"], 2)
        if total:  # every rank has run the same steps: average the figures over the ranks (DDP; a resumed phase's
            # steps before the resume are rank 0's, whose checkpoint kept them)
            tail = done["tail"][-max(1, min(TAIL_STEPS, total // 4)):]
            loss_sum, n_finite, correct, seen = sdist.all_sum([sum(tail) / len(tail), float(done["finite"]),
                                                              done["correct"], done["seen"]])
            ranks = sdist.world_size()
            rec["final_loss"] = loss_sum / ranks
            rec["loss_finite"] = n_finite == ranks
            rec["train_top1_sampled"] = correct / seen if seen else None
        self.log(f"{name}: {total} steps done" + (f", final loss {rec.get('final_loss'):.4f}" if total else ""))
        for p in fam.parameters():
            p.requires_grad_(True)

    def summary_info(self, data_info: dict[str, Any]) -> dict[str, Any]:
        return {"train": self.cfg.as_dict(), "history": self.history, "data": data_info, "notes": self.notes,
                "lstsq": self.lstsq}
