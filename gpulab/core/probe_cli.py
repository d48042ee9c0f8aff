"""``gpulab probe``: write this machine's device record (and, with --ceilings, measured ceilings)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False)


@app.command()
def probe(
    ceilings: bool = typer.Option(False, "--ceilings", help="Also measure copy GB/s, bf16/fp8 TFLOP/s, H2D GB/s."),
) -> None:
    """Probe the device (GPU, compute capability, SMs, memory, L2, persisting L2, versions)."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    from gpulab.core import ceilings as ceil
    from gpulab.core import device as dev
    from gpulab.core import options, results

    record = results.Record(name="probe", config={"ceilings": ceilings})
    info = dev.probe()
    record.device = info
    gpu = info.get("gpu") or {}
    backend = options.resolve_device()
    record.summary = {"device": dev.describe(info), "backend": info["backend"]}
    if gpu:
        for key in ("compute_capability", "sm_count", "memory_bytes", "l2_bytes", "persisting_l2_max_bytes",
                    "access_policy_max_window_bytes", "driver"):
            record.summary[key] = gpu.get(key)
    if ceilings:
        measured = ceil.measure(backend)
        record.metrics["ceilings"] = measured
        if backend != "cuda":
            record.notes.append("bf16/fp8 matmul TFLOP/s and host-to-device GB/s need a CUDA GPU: only the "
                                "CPU's copy bandwidth was measured")
        record.summary.update({k: v for k, v in measured.items() if v is not None})
    path = record.save()
    record.print(title=f"probe: {dev.describe(info)}")
    typer.echo(f"wrote {path}")
