"""``gpulab l2 run``: latency per inference under each L2 policy, checked against the default run.

On a GPU, for each policy: ``default`` (hardware policy), ``persist`` (set-aside + a persisting
access-policy window over the hottest weights on the compute stream and the side stream),
``prefetch`` (before layer i is launched, a side stream waits on an event recorded on the compute
stream and prefetches the weights of layer i+1.. into L2; the compute stream joins the side stream
at the end of the inference), ``persist+prefetch`` and ``auto`` (measures the others and keeps the
fastest only when it beats ``default`` by more than the measured noise). Policies are measured in
interleaved rounds (order rotated each round) so that drift hits all of them alike. Optionally a
pollution kernel (other tenants' traffic) runs between inferences, outside the timed region.

On the CPU the workload runs (torch), the Triton kernels are checked under the interpreter at
small sizes, and the policies are reported as needing a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from gpulab.core import ncu, options, results, timing
from gpulab.core.errors import DeviceError, GpulabError, InputError
from gpulab.l2 import policy as P

PREFETCH_KINDS = {"auto": None, "ptx": "prefetch_l2", "evict_last": "prefetch_l2_evict_last",
                  "bulk": "prefetch_l2_bulk", "read": "read"}
INTERPRETER_MAX_STEPS = 4000  # Triton-interpreter checks on the CPU only up to this many tile steps (~6-13 s)
MIB = 1 << 20
WORKLOADS = ("mlp", "cnn", "ofa", "matformer")
KERNEL_WORKLOADS = ("mlp", "cnn", "matformer")  # on the kernels that --impl picks (triton, cublas, torch)


@dataclass
class RunConfig:
    workload: str = "mlp"
    policies: tuple[str, ...] = ("default", "persist", "prefetch", "auto")
    batch: int = 8
    width: int | None = None  # mlp width / cnn channels
    width_mult: float = 1.0  # ofa
    layers: int | None = None
    image: int | None = None
    subnets: int = 8
    dtype: str = "float16"
    impl: str = "triton"
    reps: int = 30
    rounds: int = 5
    warmup: int = 3
    pollute_mib: float = 0.0
    set_aside_mib: float | None = None
    window_mib: float | None = None
    prefetch_kernel: str = "auto"
    lookahead: int = 1
    prefetch_budget: float = 0.5
    seed: int = 0
    graph: bool = False
    ncu: bool = False

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise InputError(f"unknown --workload '{self.workload}' (known: {', '.join(WORKLOADS)})")
        for name in ("batch", "reps", "rounds", "subnets", "lookahead"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {self.warmup}")
        for name in ("width", "layers", "image"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"--{name} must be >= 1, got {v}")
        if not 0 < self.width_mult <= 16:  # weights grow with its square: 16 is ~2.5 GiB of fp16 weights
            raise InputError(f"--width-mult must be in (0, 16], got {self.width_mult}")
        if not 0 <= self.pollute_mib < math.inf:
            raise InputError(f"--pollute-mib must be >= 0 and finite, got {self.pollute_mib}")
        for name in ("set_aside_mib", "window_mib"):
            v = getattr(self, name)
            if v is not None and not 0 < v < math.inf:
                raise InputError(f"--{name.replace('_', '-')} must be > 0 and finite, got {v}")
        if not 0 < self.prefetch_budget <= 1:
            raise InputError(f"--prefetch-budget must be in (0, 1] (a fraction of the L2), got {self.prefetch_budget}")
        if self.prefetch_kernel not in PREFETCH_KINDS:
            raise InputError(f"unknown --prefetch-kernel '{self.prefetch_kernel}' (known: {', '.join(PREFETCH_KINDS)})")
        from gpulab.l2.models import IMPLS, dtype_of
        if self.impl not in IMPLS:
            raise InputError(f"unknown --impl '{self.impl}' (known: {', '.join(IMPLS)})")
        if self.workload == "ofa" and self.impl == "triton":
            self.impl = "torch"  # the supernet runs on torch/cuDNN ops
        dtype_of(self.dtype)


def build_workload(cfg: RunConfig, device: str, dtype):
    from gpulab.l2.models import MLP, ConvNet
    from gpulab.l2.supernet import OFASupernet, SubnetConfig, sample_subnets

    if cfg.workload == "mlp":
        return MLP(cfg.width or 2048, cfg.layers or 8, cfg.batch, dtype, device, seed=cfg.seed)
    if cfg.workload == "cnn":
        return ConvNet(cfg.width or 256, cfg.layers or 8, cfg.batch, cfg.image or 28, dtype, device, seed=cfg.seed)
    # a stream of subnets that ends with the largest (the one subnet of --subnets 1)
    if cfg.workload == "matformer":
        from gpulab.l2.matformer import MatConfig, MatFormerSupernet, sample_configs
        n_layers = cfg.layers or 8
        subs = sample_configs(cfg.subnets - 1, n_layers, cfg.seed) + [MatConfig.largest(n_layers)]
        return MatFormerSupernet(cfg.width or 1024, n_layers, subs, cfg.batch, dtype, device, seed=cfg.seed)
    subs = (sample_subnets(cfg.subnets - 1, cfg.seed) if cfg.subnets > 1 else []) + [SubnetConfig.largest()]
    return OFASupernet(cfg.width_mult, subs, cfg.batch, cfg.image or 224, dtype, device, seed=cfg.seed)


def interpreter_steps(cfg: RunConfig, model) -> int:
    """Tile steps of the Triton kernels under the interpreter when the CPU check runs the workload's requests once
    each (what its time follows; 0 for ofa, which runs torch's ops)."""
    from gpulab.l2.kernels import interpreter_steps_conv, interpreter_steps_linear

    if cfg.workload == "mlp":
        return model.n_layers * interpreter_steps_linear(model.batch, model.width, model.width)
    if cfg.workload == "cnn":
        c, pixels = model.channels, model.batch * model.image ** 2  # 3x3 convs, stride 1, padding 1
        convs = sum(interpreter_steps_conv(pixels, c, (3 if i == 0 else c) * 9) for i in range(model.n_layers))
        return convs + interpreter_steps_linear(model.batch, model.classes, c)
    if cfg.workload == "matformer":  # per layer, each used band's up ([band, width]) and down ([width, band]) product
        w = model.width
        return sum(interpreter_steps_linear(model.batch, hi - lo, w) + interpreter_steps_linear(model.batch, w, hi - lo)
                   for sub in model.subnets for g in sub.granularity for lo, hi in model.bands[:g + 1])
    return 0


# --- GPU: policies ------------------------------------------------------------------------------

class PolicyRunner:
    """Runs a workload's requests under a policy on the current CUDA stream (+ a side stream)."""

    def __init__(self, cfg: RunConfig, model, requests, limits: dict[str, int], notes: list[str]):
        import torch

        self.torch = torch
        self.cfg, self.model, self.requests, self.limits, self.notes = cfg, model, requests, limits, notes
        # All work runs on a dedicated compute stream (a CUDA graph cannot be captured on the legacy one).
        torch.cuda.synchronize()
        self.main = torch.cuda.Stream()
        self.graphs: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.side = torch.cuda.Stream()
        n_max = max(len(r.layers) for r in requests)
        self.events = [torch.cuda.Event() for _ in range(n_max)]
        self._schedules: dict[tuple, list] = {}  # (budget, request, resident bytes) -> prefetch ops by layer
        self.prefetch_kind, self._kernels = None, None
        self.persist_plan = None
        self.last_persist = None  # the latest PersistingL2: what the driver granted, the hitRatio installed
        self.pollute_buf = None
        if cfg.pollute_mib > 0:
            self.pollute_buf = torch.zeros(int(cfg.pollute_mib * MIB) // 4, dtype=torch.int32, device="cuda")
        self._next = 0

    # prefetch
    def _ensure_prefetcher(self) -> None:
        if self.prefetch_kind is not None:
            return
        want = PREFETCH_KINDS[self.cfg.prefetch_kernel]
        if want == "read":
            self.prefetch_kind = "read"
            return
        from gpulab.l2 import cuda_l2
        try:
            self._kernels = cuda_l2.PrefetchKernels()
        except DeviceError as e:
            if want is not None:
                raise
            self.notes.append(f"PTX prefetch kernels unavailable ({e}); prefetch uses the Triton read kernel")
            self.prefetch_kind = "read"
            return
        if want is None:
            want = "prefetch_l2_bulk" if self._kernels.available("prefetch_l2_bulk") else "prefetch_l2"
        if not self._kernels.available(want):
            raise DeviceError(f"--prefetch-kernel {self.cfg.prefetch_kernel} needs a newer GPU "
                              f"(this one is sm_{self._kernels.arch})")
        self.prefetch_kind = want

    def _launch_prefetch(self, start: int, nbytes: int) -> None:
        base = self.model.arena.base_ptr
        if self.prefetch_kind == "read":
            from gpulab.l2 import kernels
            n = nbytes // 4
            if n:
                words = self.model.arena.buffer[start:start + 4 * n].view(self.torch.int32)
                with self.torch.cuda.stream(self.side):
                    kernels.touch(words, programs=8)
        else:
            lead = start % 256  # the arena is 256-byte aligned: align down (bulk prefetch needs 16 B)
            self._kernels.launch(self.prefetch_kind, base + start - lead, nbytes + lead, self.side.cuda_stream)

    def infer(self, req_index: int, policy: str):
        from gpulab.l2.models import run_layers

        req = self.requests[req_index]
        if not P.uses_prefetch(policy):
            return run_layers(req.x, req.layers)
        sched = self.schedule(req_index, policy)
        if not any(sched):
            return run_layers(req.x, req.layers)

        def before(i: int) -> None:
            if not sched[i]:
                return
            ev = self.events[i]
            ev.record(self.main)
            self.side.wait_event(ev)
            for op in sched[i]:
                region = req.layers[op.target_layer].region
                self._launch_prefetch(region.offset + op.offset, op.nbytes)

        y = run_layers(req.x, req.layers, before)
        self.main.wait_stream(self.side)
        return y

    def persist_aside_bytes(self) -> int:
        """The persisting set-aside: what the driver granted when a persisting policy was installed, else the plan."""
        granted = self.last_persist.granted_bytes if self.last_persist is not None else None
        return granted if granted is not None else self.plan_persist().set_aside_bytes

    def resident(self, req_index: int, policy: str) -> tuple[int, ...] | None:
        """Under a persisting window installed with hitRatio 1 (it fits what the driver granted), the bytes at the
        start of each of the request's layers that the window holds in L2: prefetching them again only spends
        the budget of normal lines. None otherwise (with a lower hitRatio only some of the window's lines persist)."""
        lp = self.last_persist
        if not P.uses_persist(policy) or lp is None or (lp.installed_hit_ratio or 0.0) < 1.0:
            return None
        plan = self.plan_persist()
        return tuple(P.resident_prefix(l.region, plan.window_offset, plan.window_bytes)
                     for l in self.requests[req_index].layers)

    def schedule(self, req_index: int, policy: str) -> list:
        """The request's prefetch ops by layer, within the budget: a fraction of the L2, or under persist+prefetch
        of the L2 left beside the persisting set-aside (what the driver granted), skipping what the persisting
        window holds (:meth:`resident`)."""
        aside = self.persist_aside_bytes() if P.uses_persist(policy) else 0
        budget = P.prefetch_budget_bytes(self.cfg.prefetch_budget, self.limits["l2_bytes"], set_aside_bytes=aside)
        resident = self.resident(req_index, policy)
        key = (budget, req_index, resident)
        if key not in self._schedules:
            layers = self.requests[req_index].layers
            self._schedules[key] = P.group_by_layer(
                P.prefetch_schedule([l.region.nbytes for l in layers], l2_budget_bytes=budget,
                                    lookahead=self.cfg.lookahead, resident_bytes=resident), len(layers))
        return self._schedules[key]

    def infer_graph(self, req_index: int, policy: str):
        """Replay this request's CUDA graph for the policy, capturing it on first use (while the policy
        is installed: captured kernel nodes take the stream's access-policy window)."""
        key = (policy, req_index)
        if key not in self.graphs:
            torch = self.torch
            for _ in range(2):  # warm up outside the capture (Triton compiles, cuDNN picks algorithms)
                self.infer(req_index, policy)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self.main):
                out = self.infer(req_index, policy)
            self.graphs[key] = (g, out)
        g, out = self.graphs[key]
        g.replay()
        return out

    def next_inference(self, policy: str) -> Callable[[], Any]:
        run_one = self.infer_graph if self.cfg.graph else self.infer

        def fn():
            i = self._next
            self._next = (self._next + 1) % len(self.requests)
            return run_one(i, policy)
        return fn

    def pollute(self) -> None:
        if self.pollute_buf is not None:
            from gpulab.l2 import kernels
            kernels.pollute(self.pollute_buf)

    # persist
    def plan_persist(self) -> P.PersistPlan:
        if self.persist_plan is None:
            mib = lambda v: None if v is None else int(v * MIB)  # noqa: E731
            self.persist_plan = P.plan_persist(self.model.arena.total_bytes,
                                               persisting_max_bytes=self.limits["persisting_l2_max_bytes"],
                                               max_window_bytes=self.limits["access_policy_max_window_bytes"],
                                               set_aside_bytes=mib(self.cfg.set_aside_mib),
                                               window_bytes=mib(self.cfg.window_mib))
        return self.persist_plan

    def installed(self, policy: str):
        if P.uses_prefetch(policy):
            self._ensure_prefetcher()
        if not P.uses_persist(policy):
            return contextlib.nullcontext()
        from gpulab.l2 import cuda_l2
        plan = self.plan_persist()
        self.last_persist = cuda_l2.PersistingL2(plan.set_aside_bytes, self.model.arena.base_ptr + plan.window_offset,
                                                 plan.window_bytes, plan.hit_ratio,
                                                 [self.main.cuda_stream, self.side.cuda_stream])
        return self.last_persist

    def sample(self, policy: str, reps: int) -> list[float]:
        """Per-inference latencies (ms, CUDA events on the compute stream); pollution runs before each."""
        torch = self.torch
        fn = self.next_inference(policy)
        self._next = 0
        self._policy = policy
        with torch.cuda.stream(self.main):
            return self._sample(fn, reps)

    def _sample(self, fn, reps: int) -> list[float]:
        torch = self.torch
        for _ in range(self.cfg.warmup):
            self.pollute()
            fn()
        self._next = 0
        torch.cuda.synchronize()
        pairs = []
        nvtx = ncu.under_ncu() and self._policy == getattr(self, "ncu_policy", None)
        if nvtx:
            torch.cuda.nvtx.range_push("l2-measure")
        for _ in range(reps):
            self.pollute()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(self.main)
            fn()
            b.record(self.main)
            pairs.append((a, b))
        if nvtx:
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in pairs]

    def measure(self, policies: list[str], rounds: int, reps: int) -> dict[str, dict[str, list[float]]]:
        out = {p: {"samples": [], "round_medians": []} for p in policies}
        for r in range(rounds):
            k = r % len(policies)
            for p in policies[k:] + policies[:k]:
                with self.installed(p):
                    s = self.sample(p, reps)
                out[p]["samples"] += s
                out[p]["round_medians"].append(statistics.median(s))
        return out

    def outputs(self, policy: str) -> list:
        """Each request's output under ``policy``. A request that runs into buffers of its own (meta["buffers"],
        shared by every policy's run and filled by the eager warm-ups before a graph is captured) has them set to
        NaN before the checked run: what comes back is what this policy's run wrote, not what an earlier one left."""
        run_one = self.infer_graph if self.cfg.graph else self.infer
        ys = []
        with self.installed(policy), self.torch.cuda.stream(self.main):
            for i, req in enumerate(self.requests):
                buffers = req.meta.get("buffers", ())
                if buffers:
                    run_one(i, policy)  # with --graph: warm-ups and capture first, so that the checked run replays
                    for t in buffers:
                        t.fill_(float("nan"))
                ys.append(run_one(i, policy).clone())
            self.torch.cuda.synchronize()  # inside: the policy is torn down after its kernels ran
        return ys


def installable(runner: Any, candidates: list[str], requested: list[str], notes: list[str]) -> list[str]:
    """The candidates whose L2 set-up works here. A policy that ``auto`` only tries (not asked for by name) and
    whose set-up fails on this GPU (a persisting set-aside refused under MIG or by some drivers, though the
    device reports a maximum) is dropped with a note instead of ending the run; a policy asked for by name
    still fails with its one-line error."""
    keep = []
    for p in candidates:
        if p not in requested and p != "default":
            try:
                with runner.installed(p):
                    pass
            except DeviceError as e:
                notes.append(f"auto: '{p}' left out: its L2 set-up failed on this GPU ({str(e).splitlines()[0]})")
                continue
        keep.append(p)
    return keep


def request_weight_bytes(model) -> float:
    """The weight bytes one inference reads, averaged over the request stream (a subnet reads its slices only)."""
    d = model.describe()
    subs = d.get("subnet_weight_bytes")
    return statistics.fmean(subs) if subs else float(d["weight_bytes"])


def add_weight_rates(rows: list[dict], weight_bytes: float) -> None:
    """Each row's weight bytes per second at its median (GB/s): against the copy rate, how far an inference is
    from reading its weights at DRAM speed (an L2 policy can only help where the weight reads take the time)."""
    for row in rows:
        if row.get("median_ms"):
            row["weight_gbps"] = round(weight_bytes / (row["median_ms"] * 1e-3) / 1e9, 2)


def _row(policy: str, samples: list[float], base_med: float | None, extra: dict | None = None) -> dict:
    t = timing.summarize(samples)
    row = {"policy": policy, "median_ms": t.median, "p90_ms": t.p90, "p10_ms": t.p10, "n": t.reps,
           "speedup_vs_default": (base_med / t.median) if base_med and t.median > 0 else None}
    row.update(extra or {})
    return row


# Few metrics, few replay passes (each pass reruns the program: application replay, see _ncu_dram); the L2
# sectors weight each kernel's hit rate (a prefetch kernel's few sectors must not count like a GEMM's many)
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sector_hit_rate.pct",
               "lts__t_sectors.sum")


def summarize_ncu(recs: list, reps: int) -> dict[str, Any]:
    """Per-inference DRAM bytes (summed over the kernels of ``reps`` inferences, the pollution kernel left out),
    the per-kernel table, and the L2 hit rate of all their sectors (each kernel's rate weighted by its sectors; the plain mean of the
    kernels' rates where ncu gave no sector counts)."""
    recs = [r for r in recs if "pollute" not in r.kernel]
    read = sum(r.metrics.get("dram__bytes_read.sum") or 0.0 for r in recs)
    write = sum(r.metrics.get("dram__bytes_write.sum") or 0.0 for r in recs)
    rated = [(r.metrics["lts__t_sector_hit_rate.pct"], r.metrics.get("lts__t_sectors.sum")) for r in recs
             if r.metrics.get("lts__t_sector_hit_rate.pct") is not None]
    weighted = all(w is not None for _, w in rated) and sum(w for _, w in rated) > 0
    if not rated:
        hit = None
    elif weighted:
        hit = sum(p * w for p, w in rated) / sum(w for _, w in rated)
    else:
        hit = sum(p for p, _ in rated) / len(rated)
    return {"kernels_per_inference": len(recs) / reps, "dram_read_bytes_per_inference": read / reps,
            "dram_write_bytes_per_inference": write / reps, "l2_hit_rate_pct": hit,
            "l2_hit_rate_weighting": "sectors" if weighted else ("kernels" if rated else None),
            "by_kernel": ncu.summarize_by_kernel(recs)}


# options that apply to some workloads only, and to the policies that persist or prefetch only ('auto' weighs
# both): given elsewhere they would be ignored, so `gpulab l2 run` refuses them there
WORKLOAD_OPTIONS = {"width": KERNEL_WORKLOADS, "layers": KERNEL_WORKLOADS, "impl": KERNEL_WORKLOADS,
                    "image": ("cnn", "ofa"), "width_mult": ("ofa",), "subnets": ("ofa", "matformer")}
POLICY_OPTIONS = {"set_aside_mib": "persist", "window_mib": "persist", "prefetch_kernel": "prefetch",
                  "lookahead": "prefetch", "prefetch_budget": "prefetch"}


def option_applies(name: str, workload: str, policies: list[str]) -> bool:
    if name in WORKLOAD_OPTIONS:
        return workload in WORKLOAD_OPTIONS[name]
    if name in POLICY_OPTIONS:
        uses = P.uses_persist if POLICY_OPTIONS[name] == "persist" else P.uses_prefetch
        return any(p == "auto" or uses(p) for p in policies)
    return True


def _ncu_dram(cfg: RunConfig, pol: str, reps: int, graph: bool | None = None) -> dict[str, Any]:
    """One ncu child for policy ``pol`` (``graph``: its --graph, the run's by default); its figures per inference."""
    graph = cfg.graph if graph is None else graph
    args = ["l2", "run", "--workload", cfg.workload, "--policy", pol, "--batch", str(cfg.batch), "--dtype", cfg.dtype,
            "--reps", str(reps), "--rounds", "1", "--warmup", "2", "--pollute-mib", str(cfg.pollute_mib),
            "--graph" if graph else "--no-graph", "--seed", str(cfg.seed)]
    for name in (*WORKLOAD_OPTIONS, *POLICY_OPTIONS):  # those of this workload and policy, as they were given
        v = getattr(cfg, name)
        if v is not None and option_applies(name, cfg.workload, [pol]):
            args += ["--" + name.replace("_", "-"), str(v)]
    recs = ncu.profile_gpulab(args, metrics=NCU_METRICS, cache_control="none", replay_mode="application",
                              nvtx_include="l2-measure/")
    return {"policy": pol, "graph": graph, **summarize_ncu(recs, reps)}


def ncu_rows(rec: results.Record, cfg: RunConfig, pols: list[str], n_reqs: int) -> list[dict[str, Any]]:
    """--ncu: one ncu child per policy in ``pols`` (DRAM bytes and L2 hit rate per inference); a failed or empty
    child is a failed check of ``rec``, not a row."""
    rows = []
    for p in pols:
        n = -(-2 // n_reqs) * n_reqs  # whole rounds of the requests, two inferences at least
        retried = False
        try:
            r = _ncu_dram(cfg, p, reps=n)
            # no kernel in the NVTX range would read as zero DRAM bytes. With --graph that can be ncu not
            # attributing a graph's kernel nodes to the range pushed around its launch: the same kernels and
            # windows are profiled once more launched eagerly (a stream's window, where a node carries its own)
            if r["kernels_per_inference"] == 0 and cfg.graph:
                retried = True
                r = _ncu_dram(cfg, p, reps=n, graph=False)
                if r["kernels_per_inference"] > 0:
                    rec.notes.append(f"ncu[{p}]: no kernel of the CUDA-graph run was attributed to the "
                                     "l2-measure NVTX range; its DRAM figures come from the same run launched "
                                     "eagerly (--no-graph)")
        except GpulabError as e:
            rec.check(f"ncu[{p}]", False, (f"the CUDA-graph run profiled no kernel inside the l2-measure NVTX "
                                           f"range, and the eager run failed: {e}") if retried else str(e))
            continue
        if r["kernels_per_inference"] > 0:
            rows.append(r)
        else:
            rec.check(f"ncu[{p}]", False, "ncu profiled no kernel inside the l2-measure NVTX range"
                                           + (", with --graph or without" if cfg.graph else "")
                                           + ": no DRAM bytes to report")
    return rows


def attach_ncu_rows(rec: results.Record, rows: list[dict[str, Any]]) -> None:
    """The ncu figures into the record: metrics["ncu"], and per policy row its DRAM MiB, L2 hit rate and DRAM reads
    against default's (only between children launched alike: a graph node's access-policy window against a
    stream's is another run). The auto row shows the figures of the policy it chose."""
    rec.metrics["ncu"] = rows
    d = next((r for r in rows if r["policy"] == "default"), None)
    for r in rows:
        for row in rec.rows:
            if r["policy"] in (row["policy"], row.get("chose")):
                row["dram_read_mib"] = r["dram_read_bytes_per_inference"] / MIB
                row["dram_write_mib"] = r["dram_write_bytes_per_inference"] / MIB
                row["l2_hit_pct"] = r["l2_hit_rate_pct"]
                if not d or d["dram_read_bytes_per_inference"] <= 0:
                    continue
                if r.get("graph") != d.get("graph"):
                    note = (f"ncu[{r['policy']}]: dram_read_vs_default left out (profiled "
                            f"{'as a CUDA graph' if r.get('graph') else 'launched eagerly'}, default "
                            f"{'as a CUDA graph' if d.get('graph') else 'launched eagerly'})")
                    if note not in rec.notes:
                        rec.notes.append(note)
                    continue
                # the goal pairs a latency gain with a drop in DRAM reads: reads against default's
                row["dram_read_vs_default"] = round(
                    r["dram_read_bytes_per_inference"] / d["dram_read_bytes_per_inference"], 4)


def run(cfg: RunConfig) -> results.Record:
    cfg.validate()
    policies = P.parse_policies(",".join(cfg.policies))
    if "auto" in policies and cfg.rounds < 2:
        raise InputError(f"policy auto needs --rounds >= 2 (it weighs gains against the spread of the rounds), "
                         f"got {cfg.rounds}")
    device = options.resolve_device(what="gpulab l2 run")
    if cfg.ncu and device == "cpu":
        raise DeviceError("--ncu needs a CUDA GPU, and none is visible")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before gpulab.l2.kernels imports triton's jit

    rec = results.Record(name=f"l2-{cfg.workload}", config={**cfg.__dict__, "policies": policies, "device": device})
    rec.summary.update({"workload": cfg.workload, "batch": cfg.batch})
    if device == "cpu":
        _run_cpu(cfg, policies, rec)
    else:
        _run_gpu(cfg, policies, rec)
    return rec


def _run_cpu(cfg: RunConfig, policies: list[str], rec: results.Record) -> None:
    import torch

    from gpulab.core.triton_compat import interpreter_problem
    from gpulab.l2.models import run_layers

    if cfg.dtype != "float32":
        rec.notes.append(f"--dtype {cfg.dtype} is for the GPU; the CPU run uses float32")
    if cfg.graph:
        rec.notes.append("--graph is for the GPU (CUDA graphs); the CPU run launches eagerly")
    if cfg.pollute_mib:
        rec.notes.append(f"--pollute-mib {cfg.pollute_mib:g} is for the GPU (other traffic between inferences); "
                         "the CPU run has none")
    model = build_workload(cfg, "cpu", torch.float32)
    rec.metrics["workload"] = model.describe()
    reqs = model.requests("torch")
    ref = [run_layers(r.x, r.layers) for r in reqs]
    labels = [r.label for r in reqs]
    for i, (r, y) in enumerate(zip(reqs, ref)):  # a subnet drawn twice in the stream: one check each
        rec.check(f"finite[{r.label}]" if labels.count(r.label) == 1 else f"finite[{r.label}#{i}]",
                  bool(torch.isfinite(y).all()))
    idx = {"i": 0}

    def fn():
        i = idx["i"]
        idx["i"] = (i + 1) % len(reqs)
        return run_layers(reqs[i].x, reqs[i].layers)

    # a baseline of a few samples at least, at most 10 (the CPU run checks and sizes things; it measures no policy)
    reps, warmup = max(len(reqs), min(max(cfg.reps, 3), 10)), min(cfg.warmup, 2)
    t = timing.benchmark(fn, device="cpu", warmup=warmup, reps=reps, max_seconds=5.0)
    rec.notes.append(f"the CPU baseline ran {t.reps} timed and {warmup} untimed inferences (--reps {cfg.reps}, "
                     f"--warmup {cfg.warmup}, --rounds {cfg.rounds} are for the GPU policies)")
    rec.rows.append({"policy": "cpu-baseline", "impl": "torch", "median_ms": t.median, "p90_ms": t.p90,
                     "n": t.reps, "status": "measured (CPU: no L2 policy)"})
    if cfg.workload in KERNEL_WORKLOADS and cfg.impl == "triton":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            rec.notes.append("Triton kernels not checked: TRITON_INTERPRET is off and there is no GPU")
        elif (why := interpreter_problem()):
            rec.notes.append(f"Triton kernels not checked here: {why}")
        elif (steps := interpreter_steps(cfg, model)) > INTERPRETER_MAX_STEPS:
            rec.notes.append(f"Triton kernels not checked here: {steps} tile steps are too many for the interpreter "
                             f"(limit {INTERPRETER_MAX_STEPS}, each a few ms); the GPU run checks them")
        else:
            t0 = time.perf_counter()
            tri = [run_layers(r.x, r.layers) for r in model.requests("triton")]
            err = max(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(tri, ref))
            rec.check("triton_interpreter_vs_torch", err < 1e-4, {"max_rel_err": err})
            rec.notes.append(f"Triton kernels ran under the interpreter ({time.perf_counter() - t0:.2f} s, "
                             "correctness only, not timed)")
    elif cfg.workload in KERNEL_WORKLOADS and cfg.impl == "cublas":  # the same ops torch runs on the CPU
        ven = [run_layers(r.x, r.layers) for r in model.requests("cublas")]
        err = max(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(ven, ref))
        rec.check("vendor_ops_vs_torch", err < 1e-4, {"max_rel_err": err})
    for p in policies:
        rec.rows.append({"policy": p, "impl": cfg.impl, "median_ms": None, "p90_ms": None, "n": 0,
                         "status": "skipped: needs a CUDA GPU"})
    defaults = {f.name: f.default for f in fields(RunConfig)}
    given = ["--" + n.replace("_", "-") for n in POLICY_OPTIONS if getattr(cfg, n) != defaults[n]]
    rec.notes.append("the L2 policies need a CUDA GPU (persist also needs persisting L2 support); none is visible, "
                     "so only the CPU baseline was measured (on a GPU machine: gpulab --device cuda l2 run ...)"
                     + (f"; {', '.join(given)} {'is' if len(given) == 1 else 'are'} for them, unused here"
                        if given else ""))
    rec.summary.update({"device": "cpu", "cpu_median_ms": t.median, "policies": "need a GPU"})


def _run_gpu(cfg: RunConfig, policies: list[str], rec: results.Record) -> None:
    import torch
    from gpulab.l2 import cuda_l2
    from gpulab.l2.models import dtype_of, run_layers

    limits = cuda_l2.device_limits()
    rec.metrics["device_l2"] = limits
    wants_persist = any(P.uses_persist(p) for p in policies if p != "auto")
    if wants_persist and limits["persisting_l2_max_bytes"] <= 0:
        raise DeviceError("policy 'persist' needs a GPU with persisting L2 (persistingL2CacheMaxSize is 0 here)")
    dtype = dtype_of(cfg.dtype)
    model = build_workload(cfg, "cuda", dtype)
    rec.metrics["workload"] = model.describe()
    reqs = model.requests(cfg.impl)
    runner = PolicyRunner(cfg, model, reqs, limits, rec.notes)
    wb = model.arena.total_bytes
    rec.summary.update({"device": "cuda", "weight_mib": round(wb / MIB, 2),
                        "fits_persisting_l2": wb <= limits["persisting_l2_max_bytes"],
                        "fits_l2": wb <= limits["l2_bytes"]})

    # correctness: the kernels against torch, every policy against default (bit-identical)
    base = runner.outputs("default")
    if cfg.workload in KERNEL_WORKLOADS and cfg.impl != "torch":  # the torch reference in the same dtype
        ref = [run_layers(r.x, r.layers) for r in model.requests("torch")]
    else:
        ref32 = build_workload(cfg, "cuda", torch.float32)
        ref = [run_layers(r.x, r.layers).to(dtype) for r in ref32.requests(cfg.impl)]
        del ref32
    err = max(float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6)) for a, b in zip(base, ref))
    tol = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}[dtype]
    rec.check("kernels_vs_reference", err < tol, {"max_rel_err": err, "tolerance": tol})
    base_policies = [p for p in policies if p != "auto"]
    candidates = list(dict.fromkeys(["default"] + base_policies + (
        [p for p in P.BASE_POLICIES if not (P.uses_persist(p) and limits["persisting_l2_max_bytes"] <= 0)]
        if "auto" in policies else [])))
    candidates = installable(runner, candidates, base_policies, rec.notes)
    for p in candidates:
        if p == "default":
            continue
        ys = runner.outputs(p)
        diff = max(float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6)) for a, b in zip(ys, base))
        # Triton kernels are deterministic: bit-identical; cuDNN may pick other algorithms: 1e-3
        rec.check(f"{p}_same_output_as_default", diff == 0.0 if cfg.impl == "triton" else diff < 1e-3,
                  {"max_rel_diff": diff})
    if runner.persist_plan is not None or any(P.uses_persist(p) for p in candidates):
        rec.metrics["persist_plan"] = runner.plan_persist().as_dict()
        if runner.last_persist is not None and runner.last_persist.granted_bytes is not None:
            rec.metrics["persist_plan"].update(granted_set_aside_bytes=runner.last_persist.granted_bytes,
                                               installed_hit_ratio=round(runner.last_persist.installed_hit_ratio, 6))
    if any(P.uses_prefetch(p) for p in candidates):
        plain = [runner.schedule(i, "prefetch") for i in range(len(runner.requests))]
        rec.metrics["prefetch"] = {"kernel": runner.prefetch_kind, "lookahead": cfg.lookahead,
                                   "budget_bytes": P.prefetch_budget_bytes(cfg.prefetch_budget, limits["l2_bytes"]),
                                   "ops_per_inference": [sum(len(s) for s in sch) for sch in plain]}
        if "persist+prefetch" in candidates:  # beside the set-aside: the budget of the combined policy
            rec.metrics["prefetch"]["budget_bytes_with_persist"] = P.prefetch_budget_bytes(
                cfg.prefetch_budget, limits["l2_bytes"], set_aside_bytes=runner.persist_aside_bytes())
            # the weights the persisting window holds (hitRatio 1), which persist+prefetch does not prefetch again
            rec.metrics["prefetch"]["resident_bytes_with_persist"] = [
                sum(runner.resident(i, "persist+prefetch") or ()) for i in range(len(runner.requests))]

    reps = -(-cfg.reps // len(reqs)) * len(reqs)  # whole passes over the request stream
    if ncu.under_ncu() and len(base_policies) == 1:
        runner.ncu_policy = base_policies[0]  # only its timed inferences are inside the profiled NVTX range
    meas = runner.measure(candidates, 1 if ncu.under_ncu() else cfg.rounds, reps)
    base_med = statistics.median(meas["default"]["samples"])
    shown = [p for p in candidates if p in policies or p == "default"]
    for p in shown:
        rec.rows.append(_row(p, meas[p]["samples"], base_med,
                             {"noise": P.relative_noise(meas[p]["round_medians"])}))
    rec.metrics["round_medians_ms"] = {p: meas[p]["round_medians"] for p in candidates}
    if "auto" in policies:
        choice = P.choose_auto({p: meas[p]["round_medians"] for p in candidates})
        rec.metrics["auto"] = choice.as_dict()
        confirm_set = ["default"] if choice.policy == "default" else ["default", choice.policy]
        conf = runner.measure(confirm_set, max(2, cfg.rounds // 2) if not ncu.under_ncu() else 1, reps)
        d_med = statistics.median(conf["default"]["samples"])
        a_samples = conf[choice.policy]["samples"]
        rec.rows.append(_row("auto", a_samples, d_med, {"noise": choice.noise, "chose": choice.policy}))
        a_med = statistics.median(a_samples)
        tol = max(choice.noise, P.relative_noise(conf["default"]["round_medians"]))
        rec.check("auto_not_slower_than_default", a_med <= d_med * (1 + tol),
                  {"auto_ms": a_med, "default_ms": d_med, "noise": tol, "chose": choice.policy})
        rec.summary["auto_choice"] = choice.policy
        rec.summary["auto_speedup"] = round(d_med / a_med, 4) if a_med > 0 else None
    add_weight_rates(rec.rows, request_weight_bytes(model))
    rec.summary["default_weight_gbps"] = next(r for r in rec.rows if r["policy"] == "default").get("weight_gbps")
    best = min((r for r in rec.rows if r["policy"] != "auto"), key=lambda r: r["median_ms"])
    rec.summary.update({"default_ms": round(base_med, 5), "best_policy": best["policy"],
                        "best_speedup": round(base_med / best["median_ms"], 4)})
    if best["policy"] != "default" and cfg.rounds >= 2:  # the lowest of several noisy medians flatters itself
        gain = 1 - best["median_ms"] / base_med
        noise = max(P.relative_noise(meas["default"]["round_medians"]),
                    P.relative_noise(meas[best["policy"]]["round_medians"]))
        rec.summary["best_beyond_noise"] = bool(gain > noise)
    rec.notes.append("latency per inference = one request of the stream (CUDA events on the compute stream, "
                     "including the join with the prefetch stream); speedup = default median / policy median")
    if cfg.pollute_mib:
        rec.notes.append(f"{cfg.pollute_mib:g} MiB of other traffic (read+write) ran before every inference, untimed")
    rec.notes.append("CUDA graphs: one per request and policy, captured while the policy is installed (kernel "
                     "nodes carry the window)" if cfg.graph else
                     "CUDA graphs are not used (--graph): eager launches, so small layers may be launch-bound")

    if cfg.ncu and not ncu.under_ncu():
        rows = ncu_rows(rec, cfg, P.ncu_policies(policies, rec.summary.get("auto_choice")), len(reqs))
        attach_ncu_rows(rec, rows)
        d = next((r for r in rows if r["policy"] == "default"), None)
        best_row = next((row for row in rec.rows if row["policy"] == rec.summary["best_policy"]), None)
        if best_row is not None and "dram_read_vs_default" in best_row:
            rec.summary["best_dram_read_vs_default"] = best_row["dram_read_vs_default"]
        if d:
            rec.notes.append("ncu: --cache-control none with application replay (every metric pass reruns the "
                             "program, so no pass sees a cache warmed by an earlier pass), kernels inside the timed "
                             "NVTX range only, pollution kernel left out; ncu serializes kernels, so overlap is "
                             "judged from the timings")
