"""Typer apps of the vajra serving side: ``gpulab serve``, ``gpulab generate``, ``gpulab serve-bench``.

Each is a Typer app with one command (the root CLI registers them lazily). torch, transformers,
fastapi and uvicorn are imported inside the commands, so ``--help`` stays fast.
"""
from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import List, Optional

import typer

from gpulab.core.errors import GpulabError, InputError

_SETTINGS = {"help_option_names": ["-h", "--help"]}
serve_app = typer.Typer(add_completion=False, context_settings=_SETTINGS, pretty_exceptions_enable=False)
generate_app = typer.Typer(add_completion=False, context_settings=_SETTINGS, pretty_exceptions_enable=False)
bench_app = typer.Typer(add_completion=False, context_settings=_SETTINGS, pretty_exceptions_enable=False)

_MODEL = typer.Argument(..., help="Model folder (config.json, tokenizer, *.safetensors unless --load-format dummy).")
# Engine options shared by serve, generate and serve-bench: name -> (type, typer option). The
# max_num_seqs and load_format defaults differ per command (see _engine_options).
_ENGINE_OPTIONS = {
    "max_num_batched_tokens": (int, typer.Option(2048, help="Token budget of one step (prefill chunk size).")),
    "block_size": (int, typer.Option(16, help="Tokens per KV-cache block.")),
    "num_blocks": (Optional[int], typer.Option(None, help="KV-cache blocks (default: from free GPU memory).")),
    "gpu_memory_utilization": (float, typer.Option(0.90, help="Fraction of GPU memory for weights + cache.")),
    "kv_cache_dtype": (str, typer.Option("auto", help="auto | fp8")),
    "attention_backend": (str, typer.Option("auto", help="auto (triton on a GPU, torch on the CPU) | flashinfer | triton | torch")),
    "linear_backend": (str, typer.Option(
        "auto", help="FP8 linear layers: auto (per step: W8A16, bf16 activations, up to 64 tokens; above, W8A8 with "
                     "FP8 activations where the GPU has FP8 tensor cores, else dequant-jit; dequant on the CPU) | "
                     "w8a8 | w8a16 | dequant-jit | dequant. One backend keeps a token's activation precision "
                     "independent of how many tokens share its step (the rounding still depends on the kernels' "
                     "tiling).")),
    "cuda_graphs": (bool, typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="CUDA graphs for decode steps.")),
    "enable_prefix_caching": (bool, typer.Option(False, "--enable-prefix-caching/--no-enable-prefix-caching",
                                                 help="Reuse the KV-cache blocks of prompts' shared beginnings.")),
}


def _engine_options(max_num_seqs: int, load_format: str):
    """Decorator: adds the engine options to a command's signature (after its own) and hands them to
    it as one dict, ``engine`` (keys: the option names)."""
    options = dict(_ENGINE_OPTIONS)
    options["max_num_seqs"] = (int, typer.Option(max_num_seqs, help="Most sequences in one batch."))
    options["load_format"] = (str, typer.Option(load_format, help="auto | dummy (random weights of the config's "
                                                                  "shapes)"))

    def wrap(fn):
        own = [q for q in inspect.signature(fn).parameters.values() if q.name != "engine"]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t)
                 for n, (t, o) in options.items()]

        @functools.wraps(fn)
        def command(**kw):
            engine = {n: kw.pop(n) for n in options}
            from gpulab.vajra.linear import check_backend_option

            check_backend_option(engine["linear_backend"])  # a misspelt name fails before anything is read
            return fn(engine=engine, **kw)

        command.__signature__ = inspect.Signature(own + extra, return_annotation=None)
        command.__annotations__ = {**typing.get_type_hints(fn), **{n: t for n, (t, _) in options.items()}}
        command.__annotations__.pop("engine", None)
        return command

    return wrap


def _engine_config(engine: dict, max_model_len=None):
    from gpulab.vajra.engine import EngineConfig

    keys = ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks", "gpu_memory_utilization",
            "kv_cache_dtype", "cuda_graphs", "enable_prefix_caching")
    return EngineConfig(max_model_len=max_model_len, **{k: engine[k] for k in keys}).validate()


_PREFILL = typer.Option(None, "--prefill", metavar="NAME=ARG",
                        help="Prompts prefilled by a provider, decoded by this model (disaggregated), e.g. "
                             "stitchkv=RUN_DIR: a kvstitch run's large model + stitches (see gpulab kvstitch export).")


def _load(model_dir: Path, engine: dict, max_model_len=None, prefill: Optional[str] = None):
    """The engine for a model folder, on the device that --device picked."""
    from gpulab.core import options
    from gpulab.vajra.engine import load_engine

    cfg = _engine_config(engine, max_model_len)
    return load_engine(model_dir, device=options.resolve_device(), config=cfg, load_format=engine["load_format"],
                       attention_backend=engine["attention_backend"], linear_backend=engine["linear_backend"],
                       prefill=prefill)


def _server():
    """gpulab.vajra.server.serve, or a one-line error naming the web package that is not installed."""
    try:
        import uvicorn  # noqa: F401  (server.serve imports it only once the model is loaded)

        from gpulab.vajra.server import serve
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise GpulabError(f"gpulab serve needs the package '{e.name}', which is not installed "
                             "(pip install fastapi uvicorn; generate and serve-bench run without them)") from None
        raise
    return serve


def _check_model_dir(model_dir: Path) -> None:
    from gpulab.core.files import read_model_config

    read_model_config(model_dir)


@serve_app.command()
@_engine_options(max_num_seqs=256, load_format="auto")
def serve(
    model_dir: Path = _MODEL,
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    served_model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the folder name)."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default: the model's)."),
    prefill: Optional[str] = _PREFILL,
    engine: dict = None,
) -> None:
    """Serve a Llama-family model (FP8 or BF16) over an OpenAI-compatible HTTP API."""
    _check_model_dir(model_dir)
    if not (0 < port < 65536):
        raise InputError(f"--port must be in 1..65535, got {port}")
    _engine_config(engine, max_model_len)  # bad engine options fail before the server's packages are needed
    run_server = _server()
    from gpulab.vajra.server import check_bind

    check_bind(host, port)  # before the model loads: a wrong host or a busy port is found now
    block_size = engine["block_size"]
    engine = _load(model_dir, engine, max_model_len, prefill)
    name = served_model_name or model_dir.resolve().name
    typer.echo(f"vajra: serving '{name}' on http://{host}:{port}/v1 ({engine.num_blocks} KV blocks of "
               f"{block_size}, max {engine.max_model_len} tokens, CUDA graphs "
               f"{'on' if engine.graphs is not None else 'off'}, prefix caching "
               f"{'on' if engine.block_manager.prefix_caching else 'off'})", err=True)
    for note in engine.notes:
        typer.echo(f"note: {note}", err=True)
    run_server(engine, name, host=host, port=port)


@generate_app.command()
@_engine_options(max_num_seqs=64, load_format="auto")
def generate(
    model_dir: Path = _MODEL,
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text (repeat for several)."),
    max_tokens: int = typer.Option(64, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(-1, help="-1: off."),
    min_p: float = typer.Option(0.0, help="Drop tokens less likely than min_p x the most likely (0: off)."),
    seed: Optional[int] = typer.Option(None),
    stop: List[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt as a user message (chat template)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos"),
    repetition_penalty: float = typer.Option(1.0, help="Over prompt and output tokens (1: off)."),
    frequency_penalty: float = typer.Option(0.0, help="Per occurrence in the output, in [-2, 2]."),
    presence_penalty: float = typer.Option(0.0, help="Once per token in the output, in [-2, 2]."),
    prefill: Optional[str] = _PREFILL,
    engine: dict = None,
) -> None:
    """Generate text for one or more prompts offline and print it."""
    _check_model_dir(model_dir)
    if any(not p for p in prompt):
        raise InputError("--prompt must not be empty")
    from gpulab.vajra.sampling import SamplingParams

    engine = _load(model_dir, engine, prefill=prefill)
    if engine.tokenizer is None:
        raise InputError(f"{model_dir}: no tokenizer in the model folder, so text prompts cannot be encoded")
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                        seed=seed, stop=list(stop), ignore_eos=ignore_eos, repetition_penalty=repetition_penalty,
                        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty
                        ).validate(engine.vocab_size)
    inputs = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompt]
    outs = engine.generate(inputs, sp)
    for p, o in zip(prompt, outs):
        if len(prompt) > 1:
            typer.echo(f"--- {p!r} ({o.num_output_tokens} tokens, {o.finish_reason})")
        typer.echo(o.text)


@bench_app.command()
@_engine_options(max_num_seqs=256, load_format="dummy")
def bench(
    ctx: typer.Context,
    model_dir: Path = _MODEL,
    input_len: int = typer.Option(1000, help="Prompt tokens per request (random ids unless --prompts-file)."),
    output_len: int = typer.Option(1000, help="Generated tokens per request (EOS ignored)."),
    num_prompts: int = typer.Option(200, help="Requests."),
    request_rate: float = typer.Option(float("inf"), help="Poisson arrivals per second; inf: all at once."),
    max_concurrency: Optional[int] = typer.Option(None, help="Most requests in flight."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text prompts, one per line (or JSON {\"prompt\": ...})."),
    prefix_len: int = typer.Option(0, help="Leading tokens every random prompt shares (of --input-len): a "
                                   "common system prompt, for --enable-prefix-caching."),
    compare: str = typer.Option("fp8,bf16", help="Weight precisions to run: fp8, bf16 or both; an entry may set "
                                "its own KV cache: fp8+kvfp8 (FP8 KV), bf16+kvauto (without: --kv-cache-dtype)."),
    hf_baseline: bool = typer.Option(True, "--hf-baseline/--no-hf-baseline", help="Run the transformers floor."),
    hf_num_prompts: int = typer.Option(8, help="Prompts in the transformers generate batch."),
    decode_steps: int = typer.Option(64, help="Decode steps timed at batch 1."),
    seed: int = typer.Option(0),
    budget_s: Optional[float] = typer.Option(None, help="Time box (s) for the whole command: each precision's run "
                                             "stops at its share and reports what it produced (time_boxed)."),
    engine: dict = None,
) -> None:
    """Serving benchmark: TTFT/TPOT/ITL/e2e, tok/s, batch-1 decode vs roofline; FP8 vs BF16 vs HF generate."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    import math

    _check_model_dir(model_dir)
    if math.isnan(request_rate):
        raise InputError("--request-rate must be a number > 0 or inf")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
        raise InputError(f"--budget-s must be a number of seconds > 0, got {budget_s}")
    from gpulab.core.clickcompat import refuse_unused

    refuse_unused(ctx, {"hf_num_prompts": "--hf-num-prompts"}, hf_baseline, "--hf-baseline")
    from gpulab.vajra.bench import run

    args = dict(input_len=input_len, output_len=output_len, num_prompts=num_prompts, request_rate=request_rate,
                max_concurrency=max_concurrency, prompts_file=str(prompts_file) if prompts_file else None,
                prefix_len=prefix_len,
                compare=compare, hf_baseline=hf_baseline, hf_num_prompts=hf_num_prompts, decode_steps=decode_steps,
                seed=seed, budget_s=budget_s, **engine)
    rec = run(model_dir, args)
    rec.save()
    rec.print()
