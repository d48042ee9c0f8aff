"""``gpulab sort bench``: every requested implementation on one input, against numpy, as a Record.

Rows: median/p10/p90 (ms), Gkeys/s, effective GB/s (keys read once + written once, + indices
written with --kv) and its fraction of the copy ceiling measured in the same run, speedup over
numpy (one thread, doing the same job: the requested order; with --kv the stable permutation and the
keys gathered by it), end-to-end time with host transfers (its output checked too), and ``correct``
from an exact comparison with the numpy reference (reference.py). Bitonic rows also carry their passes
over memory (kernel launches that read and write every key) and the roofline those passes imply at the
measured copy bandwidth (``roofline_ms``; ``frac_roofline`` = roofline_ms / median_ms). An
implementation name may carry a configuration (``bitonic-fused@t14f4g5``, see schedule.get_variant);
``--tune`` adds a row for every configuration in schedule.TUNE_CONFIGS. With ``--overlap-chunks K`` the
OVERLAP variants also time the chunked pipelined end to end (``BitonicCuda.sort_host``: K aligned
chunks, transfers overlapped with the sort) next to the serial one (``overlap_ms``,
``overlap_saving`` = 1 - overlap_ms / e2e_ms) and check its output exactly. Without a GPU the
bitonic variants run their exact numpy model (schedule.py) at n <= MODEL_MAX_N as a correctness
check and are not timed (with ``--overlap-chunks``, the chunked model too); cupy and the transfers
are skipped; the notes say so. With ``--ncu`` each selected GPU implementation is profiled in a child of its
own that sorts the same input once (``metrics.ncu``: per implementation and kernel; see ncu_rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from gpulab.core import options, results, timing
from gpulab.core.errors import DeviceError, GpulabError, InputError
from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort import schedule as S

BITONIC = ("bitonic-global", "bitonic-shared", "bitonic-fused")
IMPLS = (*BITONIC, "numpy", "cpu-parallel", "torch", "cupy")
GPU_ONLY = (*BITONIC, "cupy")
DISTS = ("uniform", "sorted", "reversed", "few-unique", "all-equal")
TRANSFERS = ("none", "pageable", "pinned")
OVERLAP = ("bitonic-shared", "bitonic-fused")  # the variants that --overlap-chunks pipelines
MODEL_SMEM = 227 * 1024  # opt-in shared memory a block (H100/H200) for the CPU model's choice of tile
MODEL_MAX_N = 1 << 16


@dataclass
class BenchArgs:
    n: int = 1_000_000
    dtype: str = "int32"
    dist: str = "uniform"
    impl: str | None = None
    order: str = "asc"
    transfer: str = "none"
    reps: int = 20
    kv: bool = False
    seed: int = 0
    ncu: bool = False
    overlap_chunks: int = 0
    tune: bool = False
    graph: bool = False
    impls: list[str] = field(default_factory=list)


def is_bitonic(impl: str) -> bool:
    return impl.partition("@")[0] in BITONIC


def is_overlap(impl: str) -> bool:
    """An implementation whose chunked copy/sort pipeline --overlap-chunks runs."""
    return impl.partition("@")[0] in OVERLAP


def is_gpu_only(impl: str) -> bool:
    return is_bitonic(impl) or impl in GPU_ONLY


def _canonical(name: str) -> str:
    """A configured name that is its variant's default configuration is the variant's own name."""
    base, _, config = name.partition("@")
    return base if config and base in S.VARIANTS and S.VARIANTS[base].config == config else name


def validate(a: BenchArgs) -> BenchArgs:
    if a.n < 0:
        raise InputError(f"--n must be >= 0, got {a.n}")
    if a.n >= 2**31:
        raise InputError(f"--n must be < 2**31, got {a.n}")
    if a.dtype not in K.DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(K.DTYPES)}, got {a.dtype!r}")
    if a.dist not in DISTS:
        raise InputError(f"--dist must be one of {', '.join(DISTS)}, got {a.dist!r}")
    if a.order not in K.ORDERS:
        raise InputError(f"--order must be asc or desc, got {a.order!r}")
    if a.transfer not in TRANSFERS:
        raise InputError(f"--transfer must be one of {', '.join(TRANSFERS)}, got {a.transfer!r}")
    if a.reps < 1:
        raise InputError(f"--reps must be >= 1, got {a.reps}")
    if a.seed < 0:
        raise InputError(f"--seed must be >= 0, got {a.seed}")
    if a.impl is None or a.impl.strip() in ("", "all"):
        a.impls = list(IMPLS)
    else:
        names = [s.strip() for s in a.impl.split(",") if s.strip()]
        unknown = [s for s in names if s not in IMPLS and not (s.partition("@")[2] and is_bitonic(s))]
        if unknown:
            raise InputError(f"unknown implementation {unknown[0]!r}; known: {', '.join(IMPLS)} "
                             f"(a bitonic one may carry a configuration, e.g. bitonic-fused@t14f4g5)")
        if not names:
            raise InputError("--impl names no implementation")
        for name in names:
            if "@" in name:
                S.get_variant(name)  # a one-line InputError for a configuration without kernels
        # one row a configuration: bitonic-fused and bitonic-fused@t14f4g5 are the same sort
        a.impls = list(dict.fromkeys(_canonical(n) for n in names))
    if a.tune:
        default = S.VARIANTS["bitonic-fused"].config
        # the default configuration is bitonic-fused's own row, timed even when --impl leaves it out
        a.impls = list(dict.fromkeys(a.impls + [f"bitonic-fused@{c}" if c != default else "bitonic-fused"
                                                for c in S.TUNE_CONFIGS]))
    validate_overlap(a)
    if a.graph and not any(is_bitonic(i) for i in a.impls):
        raise InputError(f"--graph times the bitonic sorts as CUDA graphs; --impl {','.join(a.impls)} names none")
    if a.ncu and not ncu_impls(a):
        raise InputError(f"--ncu profiles the GPU implementations ({', '.join(GPU_ONLY)}); "
                         f"--impl {','.join(a.impls)} names none")
    return a


def ncu_impls(a: BenchArgs) -> list[str]:
    """The implementations --ncu profiles: the selected GPU ones (validate() made sure there is one; --tune's
    are in a.impls)."""
    return [i for i in a.impls if is_gpu_only(i)]


def ncu_argv(a: BenchArgs, impl: str) -> list[str]:
    """The command that --ncu profiles for ``impl``: the same input (every flag that shapes it, the seed
    included) sorted once by it."""
    return (["sort", "bench", "--n", str(a.n), "--dtype", a.dtype, "--dist", a.dist, "--seed", str(a.seed),
             "--order", a.order, "--impl", impl, "--reps", "1"] + (["--kv"] if a.kv else []))


NCU_KERNELS = "bitonic|cub|sort|Sort"


def ncu_rows(a: BenchArgs) -> list[dict[str, Any]]:
    """--ncu: each selected GPU implementation profiled in a child of its own, its kernels summarized per kernel
    (rows carry ``impl``). One child for all would merge the variants that share a kernel (bitonic-global's and
    bitonic-shared's ``bitonic_pass_*_f1``, the fused configurations' passes and tiles) into one row."""
    from gpulab.core import ncu as ncu_mod

    metrics = (*ncu_mod.DEFAULT_METRICS, "dram__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__throughput.avg.pct_of_peak_sustained_elapsed",
               "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed")
    rows = []
    for impl in ncu_impls(a):
        recs = ncu_mod.profile_gpulab(ncu_argv(a, impl), kernel_regex=NCU_KERNELS, metrics=metrics)
        rows += [{"impl": impl, **r} for r in ncu_mod.summarize_by_kernel(recs)]
    return rows


def validate_overlap(a: BenchArgs) -> None:
    """One-line InputErrors for --overlap-chunks: a power of two, with transfers, chunks of whole tiles."""
    k = a.overlap_chunks
    if k < 0:
        raise InputError(f"--overlap-chunks must be >= 0, got {k}")
    if k == 0:
        return
    if k & (k - 1):
        raise InputError(f"--overlap-chunks must be a power of two (or 0: off), got {k}")
    if a.transfer == "none":
        raise InputError(f"--overlap-chunks {k} needs --transfer pageable or pinned")
    impls = [i for i in a.impls if is_overlap(i)]
    if not impls:
        raise InputError(f"--overlap-chunks {k} needs {' or '.join(OVERLAP)} in --impl")
    for impl in impls:
        try:
            S.check_chunk_log(S.get_variant(impl), a.n, S.chunk_log_for(a.n, k))
        except InputError as e:
            raise InputError(f"--overlap-chunks {k}: {e}") from None


def make_data(n: int, dtype: str, dist: str, seed: int = 0) -> np.ndarray:
    """Deterministic input of one distribution (uniform over the dtype's range; float32 in +-1e6)."""
    if dtype not in K.DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}; supported: {', '.join(K.DTYPES)}")
    if dist not in DISTS:
        raise InputError(f"unknown distribution {dist!r}; known: {', '.join(DISTS)}")
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)

    def uniform(size: int) -> np.ndarray:
        if dt.kind == "f":
            return rng.uniform(-1e6, 1e6, size).astype(dt)
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size, endpoint=True, dtype=dt)

    if dist == "uniform":
        return uniform(n)
    if dist == "sorted":
        return np.sort(uniform(n))
    if dist == "reversed":
        return np.sort(uniform(n))[::-1].copy()
    if dist == "few-unique":
        return rng.choice(uniform(16), n) if n else uniform(0)
    return np.full(n, uniform(1)[0], dtype=dt)


def numpy_sort(x: np.ndarray, order: str, kv: bool) -> Callable[[], tuple[np.ndarray, np.ndarray | None]]:
    """The one-thread numpy baseline doing the GPU sorts' job: the keys in the requested order and, with kv,
    the stable permutation too (the keys then gathered by it), so speedup_vs_numpy compares equal work."""
    if kv:
        def fn():
            p = ref.argsort(x, order)
            return x[p], p
    elif order == "desc":
        def fn():
            return np.sort(x)[::-1].copy(), None  # materialized, as the GPU sorts write their output
    else:
        def fn():
            return np.sort(x), None
    return fn


def _cupy():
    try:
        import cupy as cp

        return cp if cp.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def _pass_split(times: dict, pass_bytes: int, copy_gbs: float | None) -> dict:
    """BitonicCuda.pass_times -> {kind: {launches, ms, GB/s of a pass's keys (and values) read and written,
    its fraction of the copy bandwidth}}; the transform kinds (to_key, from_key) get no GB/s."""
    out = {}
    for kind, t in times.items():
        row = {"launches": t["launches"], "ms": round(t["ms"], 4)}
        if kind.startswith(("tile_", "global_")) and t["ms"] > 0:
            row["gbs"] = round(t["launches"] * pass_bytes / (t["ms"] * 1e-3) / 1e9, 1)
            if copy_gbs:
                row["of_copy"] = round(row["gbs"] / copy_gbs, 3)
        out[kind] = row
    return out


def _row_metrics(t: timing.Timing, n: int, nbytes: int, copy_gbs: float | None) -> dict[str, Any]:
    sec = t.median * 1e-3
    gbs = nbytes / sec / 1e9 if sec > 0 and n else None
    return {"median_ms": t.median, "p10_ms": t.p10, "p90_ms": t.p90,
            "gkeys_s": (n / sec / 1e9) if sec > 0 and n else None, "eff_gbs": gbs,
            "frac_copy": (gbs / copy_gbs) if gbs and copy_gbs else None}


def _overlap_model(rec: results.Record, a: BenchArgs, x: np.ndarray, want_keys, want_perm) -> None:
    """Without a GPU: the chunked schedule of each OVERLAP variant as a numpy model, against numpy."""
    done = [i for i in a.impls if is_overlap(i)] if a.n <= MODEL_MAX_N else []
    for impl in done:
        kk, pp = S.run_chunked_model(K.to_ukey(x, a.order == "desc"), impl, S.chunk_log_for(a.n, a.overlap_chunks),
                                     kv=a.kv)
        problem = ref.mismatch(K.from_ukey(kk, a.dtype, a.order == "desc"), want_keys)
        if problem is None and a.kv:
            problem = ref.mismatch(pp.astype(np.int64), want_perm)
        rec.check(f"{impl}.overlap.model.correct", problem is None, problem)
    ran = (f"; the chunked schedule of {', '.join(done)} ran as a numpy model and was compared with numpy"
           if done else f"; the chunked numpy model runs only at n <= {MODEL_MAX_N}")
    rec.notes.append(f"--overlap-chunks {a.overlap_chunks}: skipped (no CUDA GPU){ran}")


def _overlap(rec: results.Record, row: dict[str, Any], bitonic, host_in, a: BenchArgs, want_keys, want_perm,
             reps: int) -> None:
    """The pipelined end to end (sort_host) of one OVERLAP variant: checked, timed, next to its serial e2e."""
    import torch

    pinned = a.transfer == "pinned"
    out = torch.empty(a.n, dtype=host_in.dtype, pin_memory=pinned).numpy()
    perm = torch.empty(a.n, dtype=torch.int32, pin_memory=pinned).numpy().view(np.uint32) if a.kv else None
    hin = host_in.numpy()

    def fn():
        bitonic.sort_host(hin, out, row["impl"], a.order, a.overlap_chunks, perm)

    fn()
    problem = ref.mismatch(out, want_keys)
    if problem is None and a.kv:
        problem = ref.mismatch(perm.astype(np.int64), want_perm)
    rec.check(f"{row['impl']}.overlap.correct", problem is None, problem)
    w = timing.wall(fn, reps=max(3, min(reps, 10)), warmup=1, sync_cuda=True)
    row.update(overlap_chunks=a.overlap_chunks, overlap_ms=w.median, overlap_saving=1 - w.median / row["e2e_ms"],
               overlap_correct=problem is None)


def _graph_sort(rec: results.Record, row: dict[str, Any], bitonic, impl: str, a: BenchArgs) -> Callable:
    """``impl`` as SortPlan replays: one plan (captured once) per input buffer, so the timed call, the checked
    output and the end to end (its own device buffer) each replay a graph bound to their input. The row says
    how it was timed; a capture that failed is a note, and the sort then runs its launches directly."""
    from gpulab.sort.sort_plan import SortPlan

    plans: dict[tuple[int, int], SortPlan] = {}

    def cfn(c):
        key = (int(c.data.ptr), int(c.shape[0]))
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = SortPlan(bitonic, c, impl, a.order, a.kv)
            if len(plans) == 1:  # the plan of the timed buffer (later ones: the end to end's)
                row["timed"] = "graph replay" if plan.graph is not None else "direct (capture failed)"
            if plan.graph_error:
                which = "timed" if len(plans) == 1 else "end-to-end"
                rec.notes.append(f"{impl}: CUDA graph capture of the {which} sort failed "
                                 f"({plan.graph_error[:200]}); it ran without one")
        return plan.run()
    return cfn


def run(a: BenchArgs) -> results.Record:
    a = validate(a)
    from gpulab.core import ncu as ncu_mod

    device = options.resolve_device(what="gpulab sort bench")
    key_bytes = np.dtype(K.KEY_DTYPE[a.dtype]).itemsize
    under_ncu = ncu_mod.under_ncu()
    if a.ncu and device != "cuda":
        raise DeviceError("--ncu needs a CUDA GPU, and none is selected or visible")
    import torch

    x = make_data(a.n, a.dtype, a.dist, a.seed)
    itemsize = x.dtype.itemsize
    nbytes = 2 * a.n * itemsize + (8 * a.n if a.kv else 0)
    rec = results.Record(name="sort-bench", config={
        "n": a.n, "dtype": a.dtype, "dist": a.dist, "order": a.order, "kv": a.kv, "transfer": a.transfer,
        "reps": a.reps, "seed": a.seed, "impls": a.impls, "device": device, "overlap_chunks": a.overlap_chunks,
        "tune": a.tune, "graph": a.graph})
    want_keys = ref.sort(x, a.order)
    want_perm = ref.argsort(x, a.order) if a.kv else None
    warmup = 0 if under_ncu else 2
    reps = 1 if under_ncu else a.reps

    copy_gbs = None
    if not under_ncu and a.n:
        from gpulab.core import ceilings

        copy_gbs = (ceilings.copy_bandwidth_gbs("cuda") if device == "cuda"
                    else ceilings.copy_bandwidth_gbs("cpu", nbytes=64 << 20, reps=3))
    rec.metrics["copy_ceiling_gbs"] = copy_gbs

    cp = _cupy() if device == "cuda" else None
    bitonic = None
    if device == "cuda" and cp is not None and any(is_bitonic(i) for i in a.impls):
        from gpulab.sort.cuda_sort import BitonicCuda

        bitonic = BitonicCuda()

    def check(impl: str, got_keys, got_perm) -> bool:
        problem = ref.mismatch(np.asarray(got_keys), want_keys)
        if problem is None and a.kv:
            problem = ref.mismatch(np.asarray(got_perm).astype(np.int64), want_perm)
        rec.check(f"{impl}.correct", problem is None, problem)
        return problem is None

    # -- implementations: each returns (fn returning device/host outputs, to_host, where it runs)
    rows: list[dict[str, Any]] = []
    gpu_fns: dict[str, Callable[[Any], Any]] = {}  # impl -> sort of a torch cuda tensor (for end to end)
    numpy_ms = None
    for impl in a.impls:
        row: dict[str, Any] = {"impl": impl}
        if impl == "numpy":
            fn = numpy_sort(x, a.order, a.kv)
            t = timing.benchmark(fn, device="cpu", warmup=1, reps=reps)
            row.update(backend="cpu (1 thread)", **_row_metrics(t, a.n, nbytes, None if device == "cuda" else copy_gbs))
            row["correct"] = check(impl, *fn())  # the timed function's own output
            numpy_ms = t.median
        elif impl == "cpu-parallel":
            from gpulab.sort import cpu_parallel

            cfn = (lambda: cpu_parallel.argsort(x, a.order)) if a.kv else (lambda: cpu_parallel.sort(x, a.order))
            t = timing.benchmark(cfn, device="cpu", warmup=1, reps=reps)
            threads = cpu_parallel.threads()
            row.update(backend=f"cpu ({threads} threads)", **_row_metrics(t, a.n, nbytes, None if device == "cuda" else copy_gbs))
            rec.metrics["cpu_parallel_threads"] = threads
            out = cfn()
            row["correct"] = check(impl, *(out if a.kv else (out, None)))
        elif impl == "torch":
            desc = a.order == "desc"
            try:
                xt = torch.from_numpy(x).to(device)
                tfn = lambda t_: torch.sort(t_, descending=desc, stable=True)  # noqa: E731
                out = tfn(xt)
            except (RuntimeError, TypeError, NotImplementedError) as e:
                row.update(status="skipped")
                rec.notes.append(f"torch: torch.sort does not support {a.dtype} on {device} "
                                 f"({str(e).splitlines()[0][:120]})")
                rows.append(row)
                continue
            t = timing.benchmark(lambda: tfn(xt), device=device, warmup=warmup, reps=reps)
            row.update(backend=f"torch {device}", **_row_metrics(t, a.n, nbytes, copy_gbs))
            row["correct"] = check(impl, out.values.cpu().numpy(), out.indices.cpu().numpy() if a.kv else None)
            if device == "cuda":
                gpu_fns[impl] = lambda t_: tuple(tfn(t_))
        elif is_gpu_only(impl):
            if device != "cuda" or cp is None:
                why = "no CUDA GPU" if device != "cuda" else "cupy is not installed"
                row.update(status="skipped")
                if is_bitonic(impl) and a.n <= MODEL_MAX_N:
                    from gpulab.sort.cuda_sort import fit_variant
                    from gpulab.sort.schedule import run_model

                    # the configuration the kernels would run: a tile bitonic.cu has for these keys (and values),
                    # as the driver picks it on a GPU with an H100's 227 KB of opt-in shared memory
                    v = fit_variant(S.get_variant(impl), key_bytes, a.kv, MODEL_SMEM)
                    kk, pp = run_model(K.to_ukey(x, a.order == "desc"), v, kv=a.kv)
                    ok = check(f"{impl}.model", K.from_ukey(kk, a.dtype, a.order == "desc"), pp)
                    row.update(status="model only", correct=ok, config=v.config, passes=S.passes_over_memory(a.n, v))
                    if v.config != S.get_variant(impl).config:
                        rec.notes.append(f"{impl}: bitonic.cu has no {S.get_variant(impl).config} tile for these keys; "
                                         f"the driver runs {v.config}, which the model ran")
                    rec.notes.append(f"{impl}: not timed ({why}); its exact launch schedule ran as a numpy "
                                     f"model here and was compared with numpy")
                else:
                    rec.notes.append(f"{impl}: skipped ({why})"
                                     + (f"; the numpy model runs only at n <= {MODEL_MAX_N}" if is_bitonic(impl) else ""))
                rows.append(row)
                continue
            xc = cp.asarray(x)
            if impl == "cupy":
                def cfn(c, desc=a.order == "desc"):
                    if a.kv:
                        p = cp.argsort(c) if not desc else (c.shape[0] - 1 - cp.argsort(c[::-1])[::-1])
                        return c[p], p
                    s = cp.sort(c)
                    return (cp.ascontiguousarray(s[::-1]) if desc else s), None  # written out, as the others
                row["backend"] = "cupy (CUB radix)"
            elif a.graph and not under_ncu:
                cfn = _graph_sort(rec, row, bitonic, impl, a)
            else:
                def cfn(c, impl=impl):
                    return bitonic.sort(c, impl, a.order, a.kv)
            if impl != "cupy":
                v = bitonic.effective_variant(S.get_variant(impl), key_bytes, a.kv)
                passes = S.passes_over_memory(a.n, v)
                # bytes the passes move (keys and uint32 values), plus with kv the widening of the permutation to
                # int64 at the end (read 4 + write 8 bytes a key), which is inside the timed call
                moved = passes * 2 * a.n * (key_bytes + (4 if a.kv else 0)) + (12 * a.n if a.kv else 0)
                roof = moved / (copy_gbs * 1e6) if copy_gbs else None
                row.update(backend="CUDA C", config=v.config, passes=passes, roofline_ms=roof)
            if under_ncu:  # the profiled kernels are those of exactly one sort: the timed one, checked
                outs = []
                t = timing.benchmark(lambda: outs.append(cfn(xc)), device="cuda", warmup=0, reps=1)
                out_k, out_p = outs[0]
            else:
                out_k, out_p = cfn(xc)
                t = timing.benchmark(lambda: cfn(xc), device="cuda", warmup=warmup, reps=reps)
            row.update(_row_metrics(t, a.n, nbytes, copy_gbs))
            if row.get("roofline_ms") and t.median > 0:
                row["frac_roofline"] = row["roofline_ms"] / t.median
            if impl != "cupy" and not under_ncu:  # where the sort's time goes, by launch kind
                row["passes_ms"] = _pass_split(bitonic.pass_times(xc, impl, a.order, a.kv, reps=min(reps, 5)),
                                               a.n * 2 * (key_bytes + (4 if a.kv else 0)), copy_gbs)
            row["correct"] = check(impl, cp.asnumpy(out_k), cp.asnumpy(out_p) if a.kv else None)
            gpu_fns[impl] = lambda t_, cfn=cfn: tuple(None if o is None else torch.from_dlpack(cp.ascontiguousarray(o))
                                                      for o in cfn(cp.from_dlpack(t_)))
        rows.append(row)
    for row in rows:
        if numpy_ms and row.get("median_ms"):
            row["speedup_vs_numpy"] = numpy_ms / row["median_ms"]

    if a.graph and device != "cuda":
        rec.notes.append("--graph: no CUDA graph was captured or timed (no CUDA GPU)")
    if device == "cuda" and a.n:
        from gpulab.core.device import probe

        l2 = ((probe() or {}).get("gpu") or {}).get("l2_bytes")
        work = a.n * (key_bytes + (4 if a.kv else 0))
        if l2 and work <= l2:
            rec.notes.append(f"the keys{' and values' if a.kv else ''} ({work / 1e6:.1f} MB) fit in this GPU's L2 "
                             f"({l2 / 1e6:.0f} MB): passes run from the L2, so roofline_ms at the DRAM copy speed "
                             "is no lower bound here, and frac_roofline and frac_copy may exceed 1")

    # -- transfers: host -> device -> host, timed separately and end to end per GPU implementation
    if a.transfer != "none":
        if device != "cuda":
            rec.notes.append(f"--transfer {a.transfer}: skipped (no CUDA GPU)")
            if a.overlap_chunks:
                _overlap_model(rec, a, x, want_keys, want_perm)
        elif a.n and not under_ncu:
            pinned = a.transfer == "pinned"
            host_in = torch.empty(a.n, dtype=getattr(torch, a.dtype), pin_memory=pinned)
            host_in.numpy()[:] = x
            host_out = torch.empty_like(host_in, pin_memory=pinned) if pinned else torch.empty_like(host_in)
            # with kv the end to end also brings the permutation back (int64, as every GPU implementation returns it)
            host_perm = torch.empty(a.n if a.kv else 0, dtype=torch.int64, pin_memory=pinned)
            dev = torch.empty(a.n, dtype=host_in.dtype, device="cuda")
            h2d = timing.benchmark(lambda: dev.copy_(host_in, non_blocking=pinned), device="cuda", warmup=2, reps=reps)
            d2h = timing.benchmark(lambda: host_out.copy_(dev, non_blocking=pinned), device="cuda", warmup=2, reps=reps)
            nb = a.n * itemsize
            rec.metrics["transfer"] = {"host_memory": a.transfer, "bytes": nb,
                                       "h2d_ms": h2d.median, "h2d_gbs": nb / (h2d.median * 1e-3) / 1e9,
                                       "d2h_ms": d2h.median, "d2h_gbs": nb / (d2h.median * 1e-3) / 1e9}
            for row in rows:
                f = gpu_fns.get(row["impl"])
                if f is None:
                    continue

                def e2e(f=f):
                    dev.copy_(host_in, non_blocking=pinned)
                    keys, perm = f(dev)
                    host_out.copy_(keys, non_blocking=pinned)
                    if a.kv:
                        host_perm.copy_(perm, non_blocking=pinned)

                w = timing.wall(e2e, reps=max(3, min(reps, 10)), warmup=1, sync_cuda=True)
                row["h2d_ms"], row["d2h_ms"], row["e2e_ms"] = h2d.median, d2h.median, w.median
                problem = ref.mismatch(host_out.numpy(), want_keys)
                if problem is None and a.kv:
                    problem = ref.mismatch(host_perm.numpy(), want_perm)
                rec.check(f"{row['impl']}.e2e.correct", problem is None, problem)
                if a.overlap_chunks and is_overlap(row["impl"]):
                    _overlap(rec, row, bitonic, host_in, a, want_keys, want_perm, reps)
            if a.overlap_chunks and a.kv:
                rec.notes.append("--overlap-chunks with --kv: the pipelined run copies the permutation back as uint32 "
                                 "(4 bytes a key); the serial e2e as the int64 the implementations return (8 bytes)")
    if not any("correct" in r for r in rows):  # a record of nothing would read as all correct
        why = "; ".join(n for n in rec.notes if n.partition(":")[0] in a.impls)
        raise DeviceError(f"none of --impl {','.join(a.impls)} can run here ({why})")
    rec.rows = rows
    if a.ncu:  # a profiling failure is recorded, not raised: the timed rows above are kept
        try:
            rec.metrics["ncu"] = ncu_rows(a)
        except GpulabError as e:
            rec.check("ncu_profiled", False, str(e))
    timed = [r for r in rows if r.get("median_ms") is not None]
    fused = next((r for r in rows if r["impl"] == "bitonic-fused" and r.get("median_ms")), None)
    rec.summary = {"n": a.n, "dtype": a.dtype, "dist": a.dist, "order": a.order, "device": device,
                   "best": min(timed, key=lambda r: r["median_ms"])["impl"] if timed else None,
                   "fused_ms": fused["median_ms"] if fused else None,
                   "fused_vs_numpy": fused.get("speedup_vs_numpy") if fused else None,
                   "all_correct": rec.ok}
    if a.overlap_chunks:  # with --kv the two runs copy different permutations (see the note): no saving claimed
        rec.summary["fused_overlap_saving"] = fused.get("overlap_saving") if fused and not a.kv else None
    tuned = [r for r in timed if r["impl"].partition("@")[0] == "bitonic-fused"]
    if a.tune and tuned:
        best = min(tuned, key=lambda r: r["median_ms"])
        rec.summary["fused_best_config"] = best.get("config")
        rec.summary["fused_best_ms"] = best["median_ms"]
    return rec
