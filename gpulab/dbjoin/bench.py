"""``gpulab join bench``: every join implementation on one pair of tables, checked against pandas.merge."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpulab.core.errors import DeviceError, InputError

IMPLS = ("hash", "hash-graph", "hash-cpu", "tensorcore", "tensorcore-graph", "torch", "pandas")
GPU_ONLY = ("hash", "hash-graph", "tensorcore-graph")
DEFAULT_IMPLS = ",".join(IMPLS)
MAX_PAIRS = 200_000_000  # materialized outputs beyond this need --count-only (1.6 GB of int32 pairs)


@dataclass
class BenchConfig:
    rows: int = 100_000
    right_rows: int | None = None
    match_rate: float = 0.5
    dup: str = "unique"
    seed: int = 0
    key_dtype: str = "int32"
    left: Path | None = None
    right: Path | None = None
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    count_only: bool = False
    reps: int = 20
    warmup: int = 3
    load_factor: float = 0.5
    tc_dtype: str = "fp16"
    tc_block: int = 32  # the join's default (default_block)
    tc_blocks_more: tuple[int, ...] = ()  # further tile sizes: the tensorcore join timed again as tensorcore@<B>
    max_interpret_rows: int = 4096
    ncu: bool = False
    aggregate: str = "none"  # none | count | sum: the join-aggregate (agg_bench.run_aggregate)


def parse_impls(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"--impl needs at least one of {', '.join(IMPLS)}")
    for n in names:
        if n not in IMPLS:
            raise InputError(f"unknown implementation '{n}' in --impl (known: {', '.join(IMPLS)})")
    return list(dict.fromkeys(names))


# --tc-block when not given. The join: 32, faster than 64 in both H200 runs that timed both (2026-11-29, sessions 27
# and 28: int64 900 against 1,357-1,379 us a call, int32 1,095 against 1,315; at 64 the join kernel needs 202
# registers a thread, 12.5% occupancy). The aggregate: 64 (Triton < 3.3 cannot compile it below 64; 32 is unmeasured).
DEFAULT_JOIN_BLOCK, DEFAULT_AGG_BLOCK = 32, 64


def default_block(aggregate: str) -> int:
    return DEFAULT_AGG_BLOCK if aggregate != "none" else DEFAULT_JOIN_BLOCK


def parse_blocks(text: str) -> tuple[int, ...]:
    """``--tc-block``: one tile size or a comma-separated list of them (each checked), in order, once each."""
    from gpulab.dbjoin.tensorcore_join import check_block

    out = []
    for t in (t.strip() for t in str(text).split(",")):
        try:
            b = int(t)
        except ValueError:
            raise InputError(f"--tc-block must be 16, 32, 64 or 128 (or a list of them), got {text!r}") from None
        check_block(b)
        out.append(b)
    return tuple(dict.fromkeys(out))


def validate(cfg: BenchConfig, device: str) -> None:
    """One-line errors for bad option values (also those of impls not in --impl) and for --ncu without a
    GPU, before any table is loaded or timed."""
    from gpulab.dbjoin.hash_join_cuda import check_load_factor
    from gpulab.dbjoin.tensorcore_join import check_block

    if cfg.reps < 1:
        raise InputError(f"--reps must be >= 1, got {cfg.reps}")
    if cfg.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {cfg.warmup}")
    if cfg.max_interpret_rows < 0:
        raise InputError(f"--max-interpret-rows must be >= 0, got {cfg.max_interpret_rows}")
    check_load_factor(cfg.load_factor)
    for b in (cfg.tc_block, *cfg.tc_blocks_more):
        check_block(b)
    if cfg.ncu and device != "cuda":
        raise DeviceError("--ncu needs a CUDA GPU, and none is visible")


def load_tables(cfg: BenchConfig):
    from gpulab.dbjoin import tables

    if (cfg.left is None) != (cfg.right is None):
        raise InputError("--left and --right go together (give both files, or neither to generate tables)")
    if cfg.left is not None:
        left, right = tables.load_table(cfg.left), tables.load_table(cfg.right)
        return tables.align_key_dtypes(left, right)
    return tables.generate(cfg.rows, cfg.right_rows, cfg.match_rate, cfg.dup, cfg.seed, cfg.key_dtype)


def _key_stats(key: np.ndarray) -> dict[str, Any]:
    if len(key) == 0:
        return {"rows": 0, "distinct": 0, "max_dup": 0}
    _, counts = np.unique(key, return_counts=True)
    return {"rows": int(len(key)), "distinct": int(len(counts)), "max_dup": int(counts.max())}


def cuda_hash_unavailable(device: str) -> str | None:
    """None when the CUDA hash kernels (join, aggregate) can run on ``device``, else the reason."""
    if device != "cuda":
        return "needs a CUDA GPU"
    try:
        import cupy as cp
    except ImportError:
        return "cupy is not installed (pip install 'gpulab[cuda13]')"
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU visible to cupy"
    except Exception as e:
        return f"cupy sees no GPU ({type(e).__name__})"
    return None


def timed_row(impl: str, where: str, fn: Callable[[], Any], reps: int, warmup: int,
              rows_in: int) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once untimed (that output is the one checked), then time it; returns (output, table row). The
    row says how many timed runs it has (``reps``: the CPU baselines take fewer than the config's --reps)."""
    from gpulab.core import timing

    result = fn()
    t = timing.benchmark(fn, device=where, warmup=max(warmup - 1, 0), reps=reps)
    return result, {"impl": impl, "device": where, "median_ms": t.median, "p10_ms": t.p10, "p90_ms": t.p90,
                    "reps": t.reps, "mrows_per_s": rows_in / (t.median * 1e-3) / 1e6 if t.median > 0 else None}


class CountedCalls:
    """``fn`` with a count of its calls, so that a counter summed over warm-up, checked and timed calls (the
    joins' ``retries``) can be reported per call."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.calls = fn, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.fn()

    def per_call(self, total: int) -> float | None:
        return total / self.calls if self.calls else None


def skip_row(rec, impl: str, why: str) -> None:
    rec.rows.append({"impl": impl, "device": "-", "correct": None, "skipped": why})
    rec.notes.append(f"{impl}: skipped: {why}")


def tensorcore_extra(dtype: str, interp: bool) -> dict[str, Any]:
    """The tensor-core row's own columns; a time taken under the Triton interpreter is marked as such."""
    return {"code_dtype": dtype, "partitions": None, **({"timed": "interpreter"} if interp else {})}


def add_replay_columns(row: dict[str, Any], replay_ms: list[float], copy_bound_us: float | None) -> None:
    """A graph plan's GPU-only replay times (ms, CUDA events between replays queued back to back) as the row's
    replay_gpu_* columns, and their median's fraction of the copy bound; nothing without replays."""
    if not replay_ms:
        return
    from gpulab.core import timing

    t = timing.summarize(replay_ms)
    row.update({"replay_gpu_median_ms": t.median, "replay_gpu_p10_ms": t.p10, "replay_gpu_p90_ms": t.p90})
    if copy_bound_us:
        row["replay_frac_of_copy_bound"] = copy_bound_us / (t.median * 1e3)


def headline_times(rec, by: dict[str, dict[str, Any]]) -> None:
    """Each timed row's median in the summary as <impl>_ms; a Triton-interpreter time (CPU) is not the kernel's,
    so it is <impl>_interpreter_ms."""
    for impl, row in by.items():
        key = f"{impl}_interpreter_ms" if row.get("timed") == "interpreter" else f"{impl}_ms"
        rec.summary[key] = row["median_ms"]


def _triton_mode(device: str) -> str | None:
    """'gpu', 'interpret', or None when Triton cannot run here."""
    if device == "cuda":
        return "gpu"
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the interpreter (set before triton kernels load)
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return "interpret"


def tensorcore_plan(name: str, device: str, cfg: Any, rec: Any, rows: int) -> tuple[str, bool] | str:
    """(code dtype, interpreted) for a Triton tensor-core impl here, or why it must be skipped. Under the
    interpreter (no GPU): only up to --max-interpret-rows and fp32 codes, each said in a note."""
    mode = _triton_mode(device)
    if mode is None:
        return "Triton is unavailable (no GPU, and TRITON_INTERPRET is set to something else)"
    dtype = cfg.tc_dtype
    if mode == "interpret":
        from gpulab.core.triton_compat import interpreter_problem

        if (why := interpreter_problem()):
            return f"no GPU, and {why}"
        if rows > cfg.max_interpret_rows:
            return f"no GPU; the Triton interpreter runs only up to --max-interpret-rows {cfg.max_interpret_rows} rows"
        if dtype != "fp32":
            rec.notes.append(f"{name}: the Triton interpreter has no {dtype}; ran fp32 codes")
            dtype = "fp32"
        rec.notes.append(f"{name}: ran under TRITON_INTERPRET=1 (CPU); its time is not a GPU number")
    return dtype, mode == "interpret"


def require_checked(rec, impls: list[str]) -> None:
    """A one-line error when no implementation ran and was checked: a record of nothing would read as correct."""
    if any(r.get("correct") is not None or r.get("reference") for r in rec.rows):
        return
    why = "; ".join(f"{r['impl']}: {r['skipped']}" for r in rec.rows if r.get("skipped"))
    raise DeviceError(f"none of --impl {','.join(impls)} ran here" + (f" ({why})" if why else ""))


def run(cfg: BenchConfig, argv_for_ncu: list[str] | None = None):
    """Build the record (not yet saved); ``cfg.aggregate`` count|sum runs the join-aggregate instead."""
    from gpulab.core import options

    device = options.resolve_device(what="gpulab join bench")
    validate(cfg, device)
    if cfg.aggregate != "none":
        from gpulab.dbjoin.agg_bench import run_aggregate

        return run_aggregate(cfg, argv_for_ncu)
    import torch

    from gpulab.core import ncu as ncu_mod
    from gpulab.core import results
    from gpulab.dbjoin import reference

    impls = cfg.impls
    if device == "cpu" and all(i in GPU_ONLY for i in impls):
        raise DeviceError(f"--impl {','.join(impls)} needs a CUDA GPU, and none is "
                          f"{'selected' if options.cuda_available() else 'visible'}")
    under_ncu = ncu_mod.under_ncu()
    reps, warmup = (1, 1) if under_ncu else (cfg.reps, cfg.warmup)

    left, right = load_tables(cfg)
    nl, nr = len(left), len(right)
    lk, rk = left.key, right.key
    n_pairs = reference.output_size(lk, rk)
    if not cfg.count_only and n_pairs > MAX_PAIRS:
        raise InputError(f"the join output has {n_pairs} pairs (more than {MAX_PAIRS}); use --count-only")

    config = {
        "rows": nl, "right_rows": nr, "key_dtype": str(lk.dtype), "count_only": cfg.count_only,
        "source": {"left": str(cfg.left), "right": str(cfg.right)} if cfg.left else
        {"generated": True, "match_rate": cfg.match_rate, "dup": cfg.dup, "seed": cfg.seed},
        "impls": impls, "reps": reps, "warmup": warmup, "device": device, "load_factor": cfg.load_factor,
        "tc_dtype": cfg.tc_dtype, "tc_block": cfg.tc_block, "tc_blocks_more": list(cfg.tc_blocks_more),
    }
    rec = results.Record(name="join-bench", config=config)
    rec.metrics["left"] = _key_stats(lk)
    rec.metrics["right"] = _key_stats(rk)
    rec.metrics["output_rows"] = n_pairs

    if cfg.count_only:
        ref = reference.JoinResult(n_pairs)
    else:
        ref = reference.pandas_join(lk, rk)
        rec.check("reference-size", ref.count == n_pairs, f"pandas.merge {ref.count} vs counted {n_pairs}")

    key_bytes = lk.dtype.itemsize
    bytes_once = (nl + nr) * key_bytes + (0 if cfg.count_only else n_pairs * 8)
    copy_gbs = None
    if device == "cuda" and not under_ncu:
        from gpulab.core import ceilings

        copy_gbs = ceilings.copy_bandwidth_gbs("cuda", nbytes=256 << 20)
        rec.metrics["copy_gbs"] = copy_gbs
        rec.metrics["bytes_moved_once"] = bytes_once
        rec.metrics["copy_bound_us"] = bytes_once / (copy_gbs * 1e9) * 1e6

    tdev = torch.device(device)
    lk_t = torch.from_numpy(lk).to(tdev)
    rk_t = torch.from_numpy(rk).to(tdev)

    def add_row(impl: str, where: str, fn: Callable[[], Any], *, r: int = reps, w: int = warmup,
                extra: dict[str, Any] | None = None, check: bool = True) -> None:
        result, row = timed_row(impl, where, fn, r, w, nl + nr)
        passed, detail = reference.compare(result, ref, lk, rk)
        if check:
            rec.check(impl, passed, detail)
        row.update({"output_rows": result.count, "correct": passed})
        if copy_gbs and where == "cuda":
            row["frac_of_copy_bound"] = rec.metrics["copy_bound_us"] / (row["median_ms"] * 1e3)
        row.update(extra or {})
        rec.rows.append(row)

    def skip(impl: str, why: str) -> None:
        skip_row(rec, impl, why)

    for impl in impls:
        if impl == "pandas":
            if cfg.count_only and n_pairs > MAX_PAIRS:
                skip(impl, f"pandas.merge would materialize {n_pairs} pairs")
                continue
            add_row(impl, "cpu", lambda: reference.pandas_join(lk, rk, cfg.count_only),
                    r=min(reps, 5), w=min(warmup, 1))
        elif impl == "torch":
            add_row(impl, device, lambda: reference_torch(lk_t, rk_t, cfg.count_only))
        elif impl == "hash-cpu":
            from gpulab.dbjoin.hash_join_model import ModelHashJoin

            model = ModelHashJoin(cfg.load_factor)
            add_row(impl, "cpu", lambda: model.join(lk, rk, cfg.count_only), r=min(reps, 10), w=max(warmup, 1))
        elif impl in ("hash", "hash-graph"):
            why = cuda_hash_unavailable(device)
            if why:
                skip(impl, why)
                continue
            import cupy as cp

            from gpulab.dbjoin.hash_join_cuda import CudaHashJoin, HashJoinPlan, table_capacity

            lk_c, rk_c = cp.from_dlpack(lk_t), cp.from_dlpack(rk_t)
            slots = table_capacity(max(min(nl, nr), 1), cfg.load_factor)
            if impl == "hash":
                hj = CudaHashJoin(cfg.load_factor)
                call = CountedCalls(lambda: hj.join(lk_c, rk_c, cfg.count_only))
                add_row(impl, "cuda", call, extra={"table_slots": slots})
                rec.rows[-1]["retries_per_call"] = call.per_call(hj.retries)
                rec.metrics["hash_retries"] = hj.retries
                continue
            # the prepared statement: buffers allocated and the graph captured here, outside the timed region;
            # the kernels are compiled (NVRTC, once a process) first, so prepare_ms is allocation + capture only
            from gpulab.dbjoin.hash_join_cuda import load_kernels

            load_kernels(lk_c, rk_c)
            t0 = time.perf_counter()
            plan = HashJoinPlan(lk_c, rk_c, cfg.load_factor, count_only=cfg.count_only)
            prepare_ms = (time.perf_counter() - t0) * 1e3
            # timed like `hash`; the checked output is the first run's, whose arrays are views of the plan's
            # buffers: every later replay rewrites the same pairs there (same count), so the check holds
            add_row(impl, "cuda", plan.run, extra={"table_slots": slots, "prepare_ms": prepare_ms})
            row = rec.rows[-1]
            row["graph"] = plan.graph is not None  # after the timed runs: a retry captures again
            add_replay_columns(row, plan.replay_times_ms(reps), rec.metrics.get("copy_bound_us"))
            phases = {} if under_ncu else plan.phase_times_ms(min(reps, 10))  # ncu: profile only the timed runs
            if phases:  # where a replay's time goes: the same launches without the graph, an event per phase
                row["phases_us"] = {p: ms * 1e3 for p, ms in phases.items()}
            rec.metrics["hash_graph_retries"] = plan.retries
            rec.metrics["hash_graph_prepare_ms"] = prepare_ms
            rec.notes.append(
                "hash-graph: a prepared plan (HashJoinPlan): buffers allocated and the whole pipeline (memset, "
                "insert, group, probe, count copy) captured as one CUDA graph before timing, like a prepared "
                "statement (prepare_ms, host wall, not in median_ms); median_ms is the host-side call as for "
                "`hash` (graph launch + stream sync + count read); replay_gpu_*_ms is CUDA-event time of "
                "replays queued back to back on the plan's stream (GPU work only, no host round trip); phases_us "
                "splits one run into memset, insert, group, probe and count copy (the same launches without "
                "the graph, a CUDA event after each phase, median of up to 10 runs; each phase includes its "
                "launch gap)")
            if plan.graph_error:
                rec.notes.append(f"hash-graph: CUDA graph capture failed ({plan.graph_error}); timed the same "
                                 "prepared pipeline launched without a graph")
        elif impl == "tensorcore":
            plan = tensorcore_plan(impl, device, cfg, rec, max(nl, nr))
            if isinstance(plan, str):
                skip(impl, plan)
                continue
            dtype, interp = plan
            from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

            for block in (cfg.tc_block, *cfg.tc_blocks_more):  # --tc-block 64,32: the first is `tensorcore`
                name = impl if block == cfg.tc_block else f"{impl}@{block}"
                tc = TensorCoreJoin(dtype, block)
                call = CountedCalls(lambda tc=tc: tc.join(lk_t, rk_t, cfg.count_only))
                add_row(name, device, call, r=1 if interp else reps, w=0 if interp else warmup,
                        extra=dict(tensorcore_extra(dtype, interp), tc_block=block))
                rec.rows[-1]["partitions"] = tc.last_partitions
                rec.rows[-1]["retries_per_call"] = call.per_call(tc.retries)
                rec.metrics[f"{name}_retries"] = tc.retries
                phases = {} if (interp or under_ncu) else tc.phase_times_ms(lk_t, rk_t, cfg.count_only,
                                                                            min(reps, 10))
                if phases:
                    rec.rows[-1]["phases_us"] = {p: ms * 1e3 for p, ms in phases.items()}
            if any("phases_us" in r for r in rec.rows if r["impl"].startswith(impl + "@") or r["impl"] == impl):
                rec.notes.append("tensorcore: phases_us splits one call into partition_left, partition_right "
                                 "and join (join_retry: the re-run with the exact capacity), a CUDA event after "
                                 "each; a phase includes the host's launch gaps before it (median of up to 10)")

        elif impl == "tensorcore-graph":
            if device != "cuda":
                skip(impl, "needs a CUDA GPU (the tensor-core join captured as one CUDA graph)")
                continue
            plan = tensorcore_plan(impl, device, cfg, rec, max(nl, nr))
            if isinstance(plan, str):
                skip(impl, plan)
                continue
            from gpulab.dbjoin.tensorcore_join import TensorCoreJoin
            from gpulab.dbjoin.tensorcore_plan import TensorCorePlan

            # prepared like hash-graph: buffers allocated, kernels compiled and the graph captured before timing
            t0 = time.perf_counter()
            tplan = TensorCorePlan(TensorCoreJoin(plan[0], cfg.tc_block), lk_t, rk_t, count_only=cfg.count_only)
            prepare_ms = (time.perf_counter() - t0) * 1e3
            add_row(impl, device, tplan.run, extra=dict(tensorcore_extra(plan[0], False), tc_block=cfg.tc_block,
                                                         partitions=tplan.partitions, prepare_ms=prepare_ms))
            row = rec.rows[-1]
            row["graph"] = tplan.graph is not None  # after the timed runs: a retry captures again
            add_replay_columns(row, tplan.replay_times_ms(reps), rec.metrics.get("copy_bound_us"))
            rec.metrics["tensorcore_graph_retries"] = tplan.retries
            rec.notes.append(
                "tensorcore-graph: the tensor-core join as a prepared plan (TensorCorePlan): buffers allocated and "
                "both partitions, the join kernel and the count copy captured as one CUDA graph before timing "
                "(prepare_ms, host wall, compile included, not in median_ms); median_ms is the host-side call "
                "(graph launch + sync + count read), replay_gpu_*_ms CUDA-event time of replays queued back to "
                "back (GPU work only): what the tensorcore row's Python launches add is their difference")
            if tplan.graph_error:
                rec.notes.append(f"tensorcore-graph: CUDA graph capture failed ({tplan.graph_error}); timed the "
                                 "same prepared launches without a graph")

    if any(r.get("retries_per_call") for r in rec.rows):
        rec.notes.append("retries_per_call: the share of calls (warm-up, checked and timed alike) whose first output "
                         "capacity was short, so that their probe or join ran twice and the second run is in "
                         "their time; the *_retries metrics are the same counts summed over all calls")
    # headline numbers
    by = {r["impl"]: r for r in rec.rows if "median_ms" in r}
    headline_times(rec, by)
    rec.summary["output_rows"] = n_pairs
    if "hash" in by and "tensorcore" in by:
        rec.summary["tensorcore_over_hash"] = by["tensorcore"]["median_ms"] / by["hash"]["median_ms"]
    if "hash" in by and "hash-graph" in by:
        rec.summary["hash_over_hash_graph"] = by["hash"]["median_ms"] / by["hash-graph"]["median_ms"]
    for impl in ("hash-graph", "tensorcore-graph"):
        if by.get(impl, {}).get("replay_gpu_median_ms") is not None:
            rec.summary[f"{impl}_replay_gpu_ms"] = by[impl]["replay_gpu_median_ms"]
    require_checked(rec, impls)
    rec.summary["correct"] = all(r.get("correct") for r in rec.rows if r.get("correct") is not None)
    if device == "cuda":
        rec.notes.append("GPU times (median_ms, p10_ms, p90_ms) are CUDA-event times of the whole call from the "
                         "host: for `hash` table allocation, all kernel launches and the one read of the output "
                         "size included; for `hash-graph` the graph launch, the stream sync and the count read "
                         "(its allocation and capture are prepare_ms, outside)")
    if cfg.ncu and not under_ncu:
        _attach_ncu(rec, argv_for_ncu or [])
    return rec


def reference_torch(lk_t, rk_t, count_only: bool):
    from gpulab.dbjoin.torch_join import sort_search_join

    return sort_search_join(lk_t, rk_t, count_only)


def ncu_kernel_regex() -> str:
    """The kernels of the join's --ncu child (hash, tensorcore, torch): the CUDA hash join's, the tensor-core
    partition and join kernels, and the radix sort behind torch's sort + searchsorted."""
    from gpulab.dbjoin import hash_join_cuda, tensorcore_join

    return f"{hash_join_cuda.KERNEL_REGEX}|{tensorcore_join.KERNEL_REGEX}|[Rr]adix"


def _attach_ncu(rec, argv: list[str], kernel_regex: str | None = None) -> None:
    from gpulab.core import ncu

    kernel_regex = kernel_regex or ncu_kernel_regex()
    records = ncu.profile_gpulab(argv, kernel_regex=kernel_regex)
    rows = ncu.summarize_by_kernel(records)
    rec.metrics["ncu"] = rows
    occ = "sm__warps_active.avg.pct_of_peak_sustained_active"
    for r in rows:
        rec.notes.append(f"ncu {r['kernel']}: {r['launches']} launches, "
                         f"{(r.get('gpu__time_duration.sum') or 0) / 1e3:.1f} us, achieved occupancy "
                         f"{r.get(occ) if r.get(occ) is None else round(r[occ], 1)} %, DRAM "
                         f"{((r.get('dram__bytes_read.sum') or 0) + (r.get('dram__bytes_write.sum') or 0)) / 1e6:.1f} MB")
