"""``gpulab join``: hash join on tensor cores (Triton) against a CUDA hash table.

Heavy imports (torch, numba, triton, cupy, pandas) happen inside the commands.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hash join on tensor cores (Triton) against a CUDA hash table.")


# The options that shape generated tables; with --left/--right they have nothing to act on.
_GENERATION_OPTIONS = {"rows": "--rows", "right_rows": "--right-rows", "match_rate": "--match-rate", "dup": "--dup",
                       "seed": "--seed", "key_dtype": "--key-dtype"}


# the generation options that `bench` and `gen` share (one declaration: the same help and defaults)
_RIGHT_ROWS = typer.Option(None, "--right-rows", help="Rows of the right (build) table; default --rows.")
_MATCH_RATE = typer.Option(0.5, "--match-rate", help="Fraction of left rows whose key is in the right table.")
_DUP = typer.Option("unique", "--dup", help="Key duplicates: unique | zipf:S (Zipf-skewed on both sides).")
_SEED = typer.Option(0, "--seed", help="Random seed of the generated tables.")
_KEY_DTYPE = typer.Option("int32", "--key-dtype", help="int32 | int64 (generated keys span the whole range).")


@app.command()
def bench(
    ctx: typer.Context,
    rows: int = typer.Option(100_000, "--rows", help="Rows of the left (probe) table when generating."),
    right_rows: Optional[int] = _RIGHT_ROWS,
    match_rate: float = _MATCH_RATE,
    dup: str = _DUP,
    seed: int = _SEED,
    key_dtype: str = _KEY_DTYPE,
    left: Optional[Path] = typer.Option(None, "--left", help="Left table file (.npz/.csv/.parquet: columns key, payload)."),
    right: Optional[Path] = typer.Option(None, "--right", help="Right table file (same format as --left)."),
    impl: str = typer.Option("hash,hash-graph,hash-cpu,tensorcore,tensorcore-graph,torch,pandas", "--impl",
                             help="Comma-separated: hash (CUDA C), hash-graph (the same prepared once and "
                                  "replayed as one CUDA graph), hash-cpu (numba model of it), tensorcore "
                                  "(Triton), tensorcore-graph (the same as one CUDA graph), torch "
                                  "(sort+searchsorted), pandas (merge)."),
    count_only: bool = typer.Option(False, "--count-only", help="Count the output pairs instead of writing them."),
    reps: int = typer.Option(20, "--reps", help="Timed repetitions per implementation."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed calls first."),
    load_factor: float = typer.Option(0.5, "--load-factor", help="Hash table fill (build rows / slots)."),
    tc_dtype: str = typer.Option("fp16", "--tc-dtype", help="Tensor-core code type: fp16 | bf16 | int8 | fp32."),
    tc_block: Optional[str] = typer.Option(None, "--tc-block",
                                           help="Tensor-core tile size (BM = BN): 16, 32, 64 or 128 (default 32 for "
                                                "the join, 64 for --aggregate); a list (32,64) also times the "
                                                "tensorcore join with each further size (rows tensorcore@64)."),
    max_interpret_rows: int = typer.Option(4096, "--max-interpret-rows",
                                           help="Without a GPU, run the Triton join under the interpreter only "
                                                "up to this many rows."),
    ncu: bool = typer.Option(False, "--ncu", help="Also profile the GPU kernels with Nsight Compute."),
    aggregate: str = typer.Option("none", "--aggregate",
                                  help="none | count | sum: instead of listing pairs, per join key COUNT(*) "
                                       "(count) and SUM(left.payload), SUM(right.payload) over the join (sum); "
                                       "impls hash (CUDA), tensorcore, torch, pandas."),
) -> None:
    """Time every join implementation on one pair of tables; check each against pandas.merge; write YAML."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    from gpulab.core import options
    from gpulab.dbjoin import bench as B
    from gpulab.dbjoin.tensorcore_join import CODE_DTYPES

    if left is not None and right is not None:
        from gpulab.core.clickcompat import given_options

        ignored = given_options(ctx, _GENERATION_OPTIONS)
        if ignored:
            from gpulab.core.errors import InputError

            raise InputError(f"{', '.join(ignored)}: for generated tables only (with --left/--right the tables "
                             "come from the files)")
    if key_dtype not in ("int32", "int64"):
        from gpulab.core.errors import InputError

        raise InputError(f"--key-dtype must be int32 or int64, got {key_dtype!r}")
    if tc_dtype not in CODE_DTYPES:
        from gpulab.core.errors import InputError

        raise InputError(f"--tc-dtype must be one of {', '.join(CODE_DTYPES)}, got {tc_dtype!r}")
    if aggregate not in ("none", "count", "sum"):
        from gpulab.core.errors import InputError

        raise InputError(f"--aggregate must be none, count or sum, got {aggregate!r}")
    impls = B.parse_impls(impl)
    from gpulab.core.clickcompat import refuse_unused

    not_in = f" (not in --impl {','.join(impls)})"
    # with --aggregate only `hash` has an aggregate form (hash-graph and hash-cpu are skipped)
    hash_impls = ("hash",) if aggregate != "none" else ("hash", "hash-graph", "hash-cpu")
    refuse_unused(ctx, {"load_factor": "--load-factor"}, any(i in hash_impls for i in impls),
                  "--impl hash with --aggregate" if aggregate != "none" else "the hash implementations", not_in)
    refuse_unused(ctx, {"tc_dtype": "--tc-dtype", "tc_block": "--tc-block"},
                  any(i in ("tensorcore", "tensorcore-graph") for i in impls), "--impl tensorcore", not_in)
    # the interpreter runs only `tensorcore` (tensorcore-graph needs a GPU)
    refuse_unused(ctx, {"max_interpret_rows": "--max-interpret-rows"}, "tensorcore" in impls, "--impl tensorcore",
                  not_in)
    tc_blocks = B.parse_blocks(tc_block) if tc_block is not None else [B.default_block(aggregate)]
    if len(tc_blocks) > 1 and "tensorcore" not in impls:
        from gpulab.core.errors import InputError

        raise InputError(f"--tc-block {tc_block} times the tensorcore join at each size; without --impl tensorcore "
                         "it takes one size")
    if len(tc_blocks) > 1 and aggregate != "none":
        from gpulab.core.errors import InputError

        raise InputError(f"--tc-block takes one tile size with --aggregate, got {tc_block!r}")
    cfg = B.BenchConfig(rows=rows, right_rows=right_rows, match_rate=match_rate, dup=dup, seed=seed,
                        key_dtype=key_dtype, left=left, right=right, impls=impls, count_only=count_only, reps=reps,
                        warmup=warmup, load_factor=load_factor, tc_dtype=tc_dtype, tc_block=tc_blocks[0],
                        tc_blocks_more=tc_blocks[1:],
                        max_interpret_rows=max_interpret_rows, ncu=ncu, aggregate=aggregate)
    argv = []
    if options.get().device != "auto":
        argv += ["--device", options.get().device]
    profiled = [i for i in impls if i in ("hash", "tensorcore", "torch")] or ["hash"]
    argv += ["join", "bench", "--impl", ",".join(profiled), "--reps", "1", "--warmup", "1"]
    if "hash" in profiled:
        argv += ["--load-factor", str(load_factor)]
    if "tensorcore" in profiled:
        argv += ["--tc-dtype", tc_dtype, "--tc-block", ",".join(map(str, tc_blocks))]
    if left is not None and right is not None:
        argv += ["--left", str(left.resolve()), "--right", str(right.resolve())]
    else:
        argv += ["--rows", str(rows), "--match-rate", str(match_rate), "--dup", dup, "--seed", str(seed),
                 "--key-dtype", key_dtype]
        if right_rows is not None:
            argv += ["--right-rows", str(right_rows)]
    if count_only:
        argv.append("--count-only")
    if aggregate != "none":
        argv += ["--aggregate", aggregate]
    rec = B.run(cfg, argv_for_ncu=argv)
    rec.save()
    rec.print()


@app.command()
def gen(
    left_path: Path = typer.Argument(..., help="Output file of the left table (.npz, .csv, .parquet)."),
    right_path: Path = typer.Argument(..., help="Output file of the right table."),
    rows: int = typer.Option(1000, "--rows", help="Rows of the left (probe) table."),
    right_rows: Optional[int] = _RIGHT_ROWS,
    match_rate: float = _MATCH_RATE,
    dup: str = _DUP,
    seed: int = _SEED,
    key_dtype: str = _KEY_DTYPE,
) -> None:
    """Write a generated pair of tables (the same ones `bench` would generate) to files."""
    from gpulab.core import atomic
    from gpulab.core.errors import InputError
    from gpulab.dbjoin import tables

    for p in (left_path, right_path):  # both checked before either is written
        tables.check_output_path(p)
    if left_path.resolve() == right_path.resolve():
        raise InputError(f"the left and right tables would both be written to {left_path}")
    lt, rt = tables.generate(rows, right_rows, match_rate, dup, seed, key_dtype)
    # renamed into place only once both are written: a failure on the second (disk full, permissions) leaves
    # neither file new nor half-written
    atomic.write_all([tables.table_writer(lt, left_path), tables.table_writer(rt, right_path)])
    for t, p in ((lt, left_path), (rt, right_path)):
        typer.echo(f"wrote {p} ({len(t)} rows, {t.key_dtype} keys)")
