"""``gpulab sort``: CUDA bitonic sorts, transfers and CPU/library baselines (heavy imports inside)."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="CUDA bitonic sorts, transfers and CPU/library baselines.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """CUDA bitonic sorts (global, shared, register-fused) against numpy, numba, torch and cupy."""


@app.command("bench")
def bench(
    n: int = typer.Option(1_000_000, "--n", help="Number of keys (>= 0)."),
    dtype: str = typer.Option("int32", "--dtype", help="int32 | uint32 | float32 | int64"),
    dist: str = typer.Option("uniform", "--dist", help="uniform | sorted | reversed | few-unique | all-equal"),
    impl: Optional[str] = typer.Option(
        None, "--impl", help="Comma-separated: bitonic-global,bitonic-shared,bitonic-fused,numpy,cpu-parallel,"
                             "torch,cupy (default: all; unavailable ones are skipped with a note). A bitonic name "
                             "may carry a configuration: bitonic-fused@t14f4g5 (tile 2^14 keys, 4 strides fused per "
                             "shared-memory step, 5 per global pass)."),
    order: str = typer.Option("asc", "--order", help="asc | desc (desc puts NaN first, as np.sort(x)[::-1])."),
    transfer: str = typer.Option("none", "--transfer", help="none | pageable | pinned host memory."),
    reps: int = typer.Option(20, "--reps", help="Timed repetitions per implementation."),
    kv: bool = typer.Option(False, "--kv", help="Key-value: also return the stable argsort permutation."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the input."),
    ncu: bool = typer.Option(False, "--ncu", help="Profile the GPU kernels under Nsight Compute."),
    overlap_chunks: int = typer.Option(
        0, "--overlap-chunks", help="With --transfer pageable|pinned: also time bitonic-shared/fused pipelined in K "
                                    "aligned chunks (a power of two), transfers overlapped with the sort (0: off)."),
    tune: bool = typer.Option(False, "--tune", help="Also time every tuning configuration of bitonic-fused "
                                                    "(bitonic-fused@t..f..g.. rows, each checked like the others)."),
    graph: bool = typer.Option(False, "--graph", help="Time each bitonic sort as the replay of one CUDA graph of "
                                                      "all its launches (sort_plan.SortPlan): without the host's "
                                                      "cost per launch, which bounds sorts of small n."),
) -> None:
    """Sort one input with every implementation; write a result YAML and print the table."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    from gpulab.sort.bench import BenchArgs, run

    rec = run(BenchArgs(n=n, dtype=dtype, dist=dist, impl=impl, order=order, transfer=transfer, reps=reps,
                        kv=kv, seed=seed, ncu=ncu, overlap_chunks=overlap_chunks, tune=tune, graph=graph))
    rec.save()
    rec.print()
