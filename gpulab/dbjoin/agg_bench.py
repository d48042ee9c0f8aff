"""``gpulab join bench --aggregate count|sum``: the join-aggregate (see :mod:`gpulab.dbjoin.aggregate`).

Times the tensor-core aggregate (Triton) against the CUDA hash aggregate and the torch aggregate (same device)
and pandas (CPU, groupby each side then merge), and checks each one for exact equality against pandas'
literal merge + groupby (or, when the join has more than ``LITERAL_MAX_PAIRS`` pairs, against pandas'
groupby-then-merge).
"""
from __future__ import annotations

from typing import Any, Callable

from gpulab.core.errors import InputError
from gpulab.dbjoin.hash_aggregate_cuda import KERNEL_REGEX as HASH_AGG_KERNELS
from gpulab.dbjoin.tensorcore_join import PARTITION_KERNELS

AGG_IMPLS = ("hash", "tensorcore", "torch", "pandas")
LITERAL_MAX_PAIRS = 20_000_000  # the literal reference materializes every pair (3 int64 columns each)
# the tensor-core aggregate partitions with the join's Triton passes, then runs its own kernel; ha_: the CUDA
# hash aggregate's kernels; [Rr]adix: the sorts behind torch's unique
KERNEL_REGEX = "|".join(("tc_agg_kernel", *PARTITION_KERNELS, HASH_AGG_KERNELS, "[Rr]adix"))


def run_aggregate(cfg, argv_for_ncu: list[str] | None = None):
    """Build the record (not yet saved). ``cfg`` is a :class:`gpulab.dbjoin.bench.BenchConfig` that
    :func:`gpulab.dbjoin.bench.run` has validated."""
    import torch

    from gpulab.core import ncu as ncu_mod
    from gpulab.core import options, results
    from gpulab.dbjoin import aggregate as A
    from gpulab.dbjoin import bench as B
    from gpulab.dbjoin import reference

    mode = cfg.aggregate
    if mode not in A.AGGREGATES:
        raise InputError(f"--aggregate must be none, count or sum, got {mode!r}")
    if cfg.count_only:
        raise InputError("--count-only and --aggregate exclude each other (--aggregate count counts per key)")
    device = options.resolve_device(what="gpulab join bench --aggregate")
    impls = cfg.impls
    if not any(i in AGG_IMPLS for i in impls):
        raise InputError(f"--aggregate needs one of {', '.join(AGG_IMPLS)} in --impl, got {','.join(impls)}")
    under_ncu = ncu_mod.under_ncu()
    reps, warmup = (1, 1) if under_ncu else (cfg.reps, cfg.warmup)

    left, right = B.load_tables(cfg)
    nl, nr = len(left), len(right)
    lk, lp, rk, rp = left.key, left.payload, right.key, right.payload
    n_pairs = reference.output_size(lk, rk)
    literal = n_pairs <= LITERAL_MAX_PAIRS
    config = {
        "rows": nl, "right_rows": nr, "key_dtype": str(lk.dtype), "aggregate": mode,
        "source": {"left": str(cfg.left), "right": str(cfg.right)} if cfg.left else
        {"generated": True, "match_rate": cfg.match_rate, "dup": cfg.dup, "seed": cfg.seed},
        "impls": impls, "reps": reps, "warmup": warmup, "device": device, "load_factor": cfg.load_factor,
        "tc_dtype": cfg.tc_dtype, "tc_block": cfg.tc_block,
    }
    rec = results.Record(name="join-agg-bench", config=config)
    rec.metrics["left"] = B._key_stats(lk)
    rec.metrics["right"] = B._key_stats(rk)
    rec.metrics["join_pairs"] = n_pairs
    rec.metrics["plans"] = {"hash-agg": "one hash table on the smaller side: per-key counts and sums of both sides",
                            "tensorcore-agg": "partition + tl.dot(E, payload limbs) per partition",
                            "torch-agg": "unique + index_add per side, searchsorted",
                            "pandas-agg": "groupby each side, then merge"}
    ref = A.pandas_aggregate(lk, lp, rk, rp, mode, how="merge" if literal else "pre")
    rec.metrics["groups"] = len(ref)
    rec.metrics["reference"] = "pandas merge+groupby" if literal else "pandas groupby+merge (join too large to list)"
    if literal and n_pairs:
        pre = A.pandas_aggregate(lk, lp, rk, rp, mode, how="pre")
        rec.check("reference-plans-agree", *A.compare_agg(pre, ref, mode))

    tdev = torch.device(device)
    t_in = [torch.from_numpy(a).to(tdev) for a in (lk, lp, rk, rp)]

    def add_row(impl: str, where: str, fn: Callable[[], Any], *, r: int = reps, w: int = warmup,
                extra: dict[str, Any] | None = None) -> None:
        result, row = B.timed_row(impl, where, fn, r, w, nl + nr)
        passed, detail = A.compare_agg(result, ref, mode)
        rec.check(impl, passed, detail)
        row.update({"groups": len(result), "correct": passed})
        row.update(extra or {})
        rec.rows.append(row)

    def skip(impl: str, why: str) -> None:
        B.skip_row(rec, impl, why)

    for impl in impls:
        name = f"{impl}-agg"
        if impl not in AGG_IMPLS:
            skip(name, f"{impl} has no aggregate form (aggregates: {', '.join(AGG_IMPLS)})")
        elif impl == "pandas" and not literal:  # it is the reference itself: timed, not checked against itself
            _, row = B.timed_row(name, "cpu", lambda: A.pandas_aggregate(lk, lp, rk, rp, mode, how="pre"),
                                 min(reps, 5), min(warmup, 1), nl + nr)
            row.update({"groups": len(ref), "correct": None, "reference": True})
            rec.rows.append(row)
            rec.notes.append(f"{name} is the reference here (the join is too large to list, so no plan checks it): "
                             "timed, not checked")
        elif impl == "pandas":
            add_row(name, "cpu", lambda: A.pandas_aggregate(lk, lp, rk, rp, mode, how="pre"),
                    r=min(reps, 5), w=min(warmup, 1))
        elif impl == "torch":
            add_row(name, device, lambda: A.torch_aggregate(*t_in, mode=mode))
        elif impl == "hash":
            why = B.cuda_hash_unavailable(device)
            if why:
                skip(name, why)
                continue
            from gpulab.dbjoin.hash_aggregate_cuda import CudaHashAggregate

            ha = CudaHashAggregate(cfg.load_factor, mode)
            add_row(name, device, lambda: ha.aggregate(*t_in))
        elif impl == "tensorcore":
            plan = B.tensorcore_plan(name, device, cfg, rec, max(nl, nr))
            if isinstance(plan, str):
                skip(name, plan)
                continue
            dtype, interp = plan
            from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

            tc = TensorCoreAggregate(dtype, cfg.tc_block, mode=mode)
            add_row(name, device, lambda: tc.aggregate(*t_in), r=1 if interp else reps,
                    w=0 if interp else warmup, extra=B.tensorcore_extra(dtype, interp))
            rec.rows[-1]["partitions"] = tc.last_partitions

    by = {r["impl"]: r for r in rec.rows if "median_ms" in r}
    B.headline_times(rec, by)
    rec.summary["groups"] = len(ref)
    if device == "cuda" and "tensorcore-agg" in by and "torch-agg" in by:
        rec.summary["tensorcore_over_torch"] = by["tensorcore-agg"]["median_ms"] / by["torch-agg"]["median_ms"]
    if device == "cuda" and "tensorcore-agg" in by and "hash-agg" in by:
        rec.summary["tensorcore_over_hash"] = by["tensorcore-agg"]["median_ms"] / by["hash-agg"]["median_ms"]
    B.require_checked(rec, impls)
    checked = [r["correct"] for r in rec.rows if r.get("correct") is not None]
    rec.summary["correct"] = all(checked) if checked else None  # none checked (only the reference ran): unknown
    if device == "cuda":
        rec.notes.append("GPU times are CUDA-event times of the whole call from the host: partitioning, gathers, "
                         "output allocation, the kernel and the one read of the group count included")
    if cfg.ncu and not under_ncu:
        B._attach_ncu(rec, argv_for_ncu or [], kernel_regex=KERNEL_REGEX)
    return rec
