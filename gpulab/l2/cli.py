"""``gpulab l2``: L2 persistence and next-layer prefetch policies for DNN inference.

Heavy imports (torch, triton, cuda-python) happen inside the command.
"""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="L2 persistence and next-layer prefetch policies for DNN inference.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """L2 persistence and next-layer prefetch policies for DNN inference."""


def _check_options_apply(ctx: typer.Context, workload: str, policy: str) -> None:
    """An option given for another workload, or for policies that are not run, would be ignored (and recorded
    in the config as if it had been used): a one-line error instead."""
    from gpulab.core.clickcompat import given_options
    from gpulab.core.errors import InputError, series
    from gpulab.l2 import policy as P
    from gpulab.l2.bench import POLICY_OPTIONS, WORKLOAD_OPTIONS, WORKLOADS, option_applies

    if workload not in WORKLOADS:
        return  # RunConfig.validate says so
    policies = P.parse_policies(policy)
    for name in (*WORKLOAD_OPTIONS, *POLICY_OPTIONS):
        flag = "--" + name.replace("_", "-")
        if not option_applies(name, workload, policies) and given_options(ctx, {name: flag}):
            if name in WORKLOAD_OPTIONS:
                raise InputError(f"{flag} applies to --workload {series(WORKLOAD_OPTIONS[name])}, not {workload}")
            raise InputError(f"{flag} applies to the policies that {POLICY_OPTIONS[name]} (not to "
                             f"{', '.join(policies)})")


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    workload: str = typer.Option("mlp", "--workload",
                                 help="mlp | cnn | ofa (weight-shared OFA-style supernet) | matformer (weight-shared "
                                      "nested-FFN supernet, decode-sized batches)"),
    policy: str = typer.Option("default,persist,prefetch,auto", "--policy",
                               help="comma list of default, persist, prefetch, persist+prefetch, auto (or all)"),
    batch: int = typer.Option(8, "--batch", help="inputs per inference"),
    width: Optional[int] = typer.Option(None, "--width", help="mlp width / cnn channels / matformer model width "
                                                                   "(default 2048 / 256 / 1024)"),
    width_mult: float = typer.Option(1.0, "--width-mult", help="ofa width multiplier (1.0 ~ 10 MiB fp16 weights)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="mlp/cnn/matformer layers (default 8)"),
    image: Optional[int] = typer.Option(None, "--image", help="cnn/ofa image side (default 28 / 224)"),
    subnets: int = typer.Option(8, "--subnets", help="ofa/matformer: subnets in the request stream (the last is the "
                                                     "largest)"),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32 (the CPU uses float32)"),
    impl: str = typer.Option("triton", "--impl", help="mlp/cnn/matformer kernels: triton (hand-written) | cublas "
                                                      "(cuBLAS/cuDNN through torch) | torch (the fp32 reference; ofa "
                                                      "runs torch's ops)"),
    reps: int = typer.Option(30, "--reps", help="timed inferences per policy per round"),
    rounds: int = typer.Option(5, "--rounds", help="interleaved measurement rounds (auto needs >= 2)"),
    warmup: int = typer.Option(3, "--warmup", help="untimed inferences before each round"),
    pollute_mib: float = typer.Option(0.0, "--pollute-mib", help="other traffic (MiB) before each inference, untimed"),
    set_aside_mib: Optional[float] = typer.Option(None, "--set-aside-mib", help="persisting set-aside (default: max)"),
    window_mib: Optional[float] = typer.Option(None, "--window-mib",
                                               help="window over the hottest weights (default: the set-aside, "
                                                    "hitRatio 1; larger: hitRatio = set-aside / window)"),
    prefetch_kernel: str = typer.Option("auto", "--prefetch-kernel", help="auto | ptx | evict_last | bulk | read"),
    lookahead: int = typer.Option(1, "--lookahead", help="layers prefetched ahead"),
    prefetch_budget: float = typer.Option(0.5, "--prefetch-budget", help="fraction of L2 for in-flight weights"),
    seed: int = typer.Option(0, "--seed"),
    graph: bool = typer.Option(False, "--graph/--no-graph", help="replay each inference as a CUDA graph (GPU)"),
    ncu_flag: bool = typer.Option(False, "--ncu", help="also profile DRAM bytes and L2 hit rate per policy (ncu)"),
) -> None:
    """Latency per inference (median, p90) under each L2 policy, speedup over default; YAML + table."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    from gpulab.l2.bench import RunConfig, run

    _check_options_apply(ctx, workload, policy)
    cfg = RunConfig(workload=workload, policies=tuple(policy.split(",")), batch=batch, width=width,
                    width_mult=width_mult, layers=layers, image=image, subnets=subnets, dtype=dtype, impl=impl,
                    reps=reps, rounds=rounds, warmup=warmup, pollute_mib=pollute_mib, set_aside_mib=set_aside_mib,
                    window_mib=window_mib, prefetch_kernel=prefetch_kernel, lookahead=lookahead,
                    prefetch_budget=prefetch_budget, seed=seed, graph=graph, ncu=ncu_flag)
    rec = run(cfg)
    rec.save()
    rec.print()
