"""The three commands: serve-bench writes a YAML record; generate prints greedy text; bad input is one line."""
from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys

import pytest
import yaml

from gpulab.cli import invoke
from gpulab.core.errors import GpulabError, InputError


def test_serve_bench_writes_yaml(out_dir, tiny_assets):
    invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "24",
            "--output-len", "6", "--num-prompts", "4", "--num-blocks", "48", "--decode-steps", "4",
            "--hf-num-prompts", "2", "--request-rate", "200", "--max-concurrency", "3"])
    files = list(out_dir.glob("serve-bench-*.yaml"))
    assert len(files) == 1
    rec = yaml.safe_load(files[0].read_text())
    assert rec["ok"] is True
    impls = [r["impl"] for r in rec["rows"]]
    assert impls == ["vajra-fp8", "vajra-bf16", "hf-generate"]
    v = rec["metrics"]["variants"]["vajra-fp8"]
    assert v["output_tokens"] == 24 and v["completed"] == 4
    for k in ("ttft_p99_ms", "tpot_median_ms", "itl_mean_ms", "e2e_p99_ms", "decode_b1_ms", "roofline_frac"):
        assert v[k] > 0
    assert "fp8_over_bf16" in rec["summary"] and rec["summary"]["fp8_over_bf16"] is None  # not a CPU figure
    assert v["host_ms_decode_median"] > 0 and 0 < v["host_share"] <= 1  # the engine's own CPU time per step
    assert v["drain_ms_decode_median"] is None  # no deferred detokenization on the CPU: nothing overlaps
    assert v["requests_s"] == pytest.approx(4 / v["duration_s"])


def test_serve_bench_shared_prefix_with_prefix_caching(out_dir, tiny_assets):
    """--prefix-len P: the random prompts share their first P tokens; with --enable-prefix-caching the later requests
    find them cached (the warm-up's blocks are forgotten first), and the table gains the hit rate."""
    invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "24",
            "--prefix-len", "16", "--output-len", "3", "--num-prompts", "4", "--num-blocks", "48",
            "--decode-steps", "2", "--compare", "bf16", "--no-hf-baseline", "--max-concurrency", "1",
            "--block-size", "4", "--enable-prefix-caching"])
    rec = yaml.safe_load(next(out_dir.glob("serve-bench-*.yaml")).read_text())
    assert rec["ok"] is True and rec["config"]["prefix_len"] == 16
    v = rec["metrics"]["variants"]["vajra-bf16"]
    # one request at a time: the first finds nothing, each of the other three its 16 shared tokens
    assert v["prefix_tokens_queried"] == 4 * 24 and v["prefix_tokens_hit"] == 3 * 16
    assert rec["rows"][0]["prefix_hit_rate"] == pytest.approx(0.5)


def test_serve_bench_kv_suffix_and_failed_entry(out_dir, tiny_assets, monkeypatch):
    """--compare entries with their own KV cache; an entry that fails at run time is a failed check with its
    error, and the next entry still runs."""
    from gpulab.vajra import bench

    real, calls = bench.drive, []

    def flaky(engine, *a, **kw):
        calls.append(engine.config.kv_cache_dtype)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return real(engine, *a, **kw)

    monkeypatch.setattr(bench, "drive", flaky)
    invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "16",
            "--output-len", "4", "--num-prompts", "3", "--num-blocks", "48", "--decode-steps", "2",
            "--no-hf-baseline", "--compare", "fp8+kvfp8,bf16+kvfp8,bf16"])  # (one set-up given twice: refused)
    rec = yaml.safe_load(next(out_dir.glob("serve-bench-*.yaml")).read_text())
    assert calls == ["fp8", "fp8", "auto"]
    assert [r["impl"] for r in rec["rows"]] == ["vajra-fp8+kvfp8", "vajra-bf16"]
    assert rec["metrics"]["variants"]["vajra-fp8+kvfp8"]["kv_cache"] == "fp8"
    assert rec["metrics"]["variants"]["vajra-bf16"]["kv_cache"] == "auto"
    failed = rec["checks"]["vajra-bf16+kvfp8: ran"]
    assert failed["passed"] is False and "RuntimeError: CUDA error: an illegal memory access" in str(failed)
    assert rec["ok"] is False and "fp8+kvfp8_over_bf16" in rec["summary"]
    assert "fp8+kvfp8_over_bf16+kvfp8" not in rec["summary"]


def test_serve_bench_entry_skipped_by_the_budget_is_a_failed_check(out_dir, tiny_assets):
    invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "16",
            "--output-len", "4", "--num-prompts", "3", "--num-blocks", "48", "--no-hf-baseline",
            "--compare", "fp8,bf16", "--budget-s", "0.5"])
    rec = yaml.safe_load(next(out_dir.glob("serve-bench-*.yaml")).read_text())
    assert rec["ok"] is False and rec["rows"] == []
    for name in ("fp8", "bf16"):
        c = rec["checks"][f"vajra-{name}: ran"]
        assert c["passed"] is False and "--budget-s 0.5 is spent" in c["detail"]


def test_serve_bench_entry_errors_on_input(out_dir, tiny_assets, monkeypatch):
    """An entry that fails on its input (no room for its KV cache) is a failed check when another entry runs; when
    every entry fails so, the command is that one-line error."""
    from gpulab.core.errors import InputError
    from gpulab.vajra import bench

    real, calls = bench.drive, []

    def no_room(engine, *a, **kw):
        calls.append(1)
        if len(calls) == 1 or fail_all:
            raise InputError("no room for the KV cache of 3 sequences")
        return real(engine, *a, **kw)

    argv = ["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "16",
            "--output-len", "4", "--num-prompts", "3", "--num-blocks", "48", "--decode-steps", "2",
            "--no-hf-baseline", "--compare", "bf16,fp8"]
    monkeypatch.setattr(bench, "drive", no_room)
    fail_all = False
    invoke(argv)
    rec = yaml.safe_load(next(out_dir.glob("serve-bench-*.yaml")).read_text())
    assert [r["impl"] for r in rec["rows"]] == ["vajra-fp8"]
    assert "InputError: no room for the KV cache" in str(rec["checks"]["vajra-bf16: ran"])
    fail_all = True
    with pytest.raises(GpulabError, match="no room for the KV cache of 3 sequences"):
        invoke(argv)


def test_serve_bench_stops_after_the_gpu_context_fails(out_dir, tiny_assets, monkeypatch):
    """A failure in the clean-up after an entry (a sticky CUDA error fails every later call) keeps the rows that
    ran and runs no further entry."""
    import types

    from gpulab.vajra import bench

    def collect():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "gc", types.SimpleNamespace(collect=collect))
    invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "16",
            "--output-len", "4", "--num-prompts", "3", "--num-blocks", "48", "--decode-steps", "2",
            "--compare", "fp8,bf16"])
    rec = yaml.safe_load(next(out_dir.glob("serve-bench-*.yaml")).read_text())
    assert [r["impl"] for r in rec["rows"]] == ["vajra-fp8"]  # neither bf16 nor the HF floor ran after it
    assert any(n.startswith("the entries after vajra-fp8 were not run: the GPU context failed") for n in rec["notes"])


def test_parse_compare():
    from gpulab.vajra.bench import parse_compare

    assert parse_compare("fp8, bf16", "auto") == [("fp8", "fp8", "auto"), ("bf16", "bf16", "auto")]
    assert parse_compare("fp8+kvfp8,fp8", "auto") == [("fp8+kvfp8", "fp8", "fp8"), ("fp8", "fp8", "auto")]
    assert parse_compare("bf16+kvauto", "fp8") == [("bf16+kvauto", "bf16", "auto")]
    assert parse_compare("bf16+kvauto,bf16", "fp8") == [("bf16+kvauto", "bf16", "auto"), ("bf16", "bf16", "fp8")]
    # two names for one set-up (an entry without +kv takes --kv-cache-dtype) ran it twice
    for text, kv, twice in (("fp8,fp8+kvauto", "auto", "fp8 and fp8+kvauto"),
                            ("bf16+kvfp8,fp8, bf16", "fp8", "bf16+kvfp8 and bf16")):
        with pytest.raises(GpulabError, match=rf"^--compare gives {re.escape(twice)}: the same set-up"):
            parse_compare(text, kv)
    for bad in ("fp8+kvint4", "int4", "fp8+", " , ", "fp8+kv"):
        with pytest.raises(GpulabError, match="--compare takes fp8 and/or bf16"):
            parse_compare(bad, "auto")


def test_drive_time_box_aborts_and_reports(monkeypatch):
    """serve-bench's run under --budget-s: at the deadline the requests not yet admitted are dropped and those in
    flight aborted; every KV block comes back and the figures cover what was produced (time_boxed)."""
    import itertools

    from gpulab.vajra import bench
    from gpulab.vajra.engine import EngineConfig, LLMEngine

    from .fake_model import FakeModel

    clock = itertools.count()  # a clock that advances one second per reading: the box closes after a few steps
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    eng = LLMEngine(FakeModel(97, max_model_len=128), None, EngineConfig(num_blocks=200, max_num_seqs=4))
    prompts = [[i % 97 + 1] * 10 for i in range(12)]
    res = bench.drive(eng, prompts, 20, float("inf"), None, 0, deadline=60.0)
    assert res["time_boxed"] and res["num_prompts_asked"] == 12
    assert 0 < res["output_tokens"] < 12 * 20 and res["completed"] < 12
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished()
    assert res["ttft_median_ms"] > 0 and res["output_tok_s"] > 0
    # completed requests per second (as vLLM's benchmark), not the admitted ones; only prefilled prompts count
    assert res["requests_s"] == pytest.approx(res["completed"] / res["duration_s"])
    prefilled = sum(10 for o in res["outputs"] if o)
    assert res["total_tok_s"] == pytest.approx((res["output_tokens"] + prefilled) / res["duration_s"])
    assert prefilled < 12 * 10
    assert math.isnan(res["e2e_median_ms"]) == (res["completed"] == 0)  # end to end of finished requests only
    monkeypatch.undo()
    full = bench.drive(LLMEngine(FakeModel(97, max_model_len=128), None, EngineConfig(num_blocks=200)), prompts[:3],
                       5, float("inf"), None, 0, deadline=None)
    assert not full["time_boxed"] and full["completed"] == 3 and full["lengths_ok"]


def test_drive_latency_starts_when_a_client_would_send():
    """TTFT and e2e latency count from the request's Poisson arrival (not from when the loop got to it, which
    hides the wait behind a running step), and with --max-concurrency from when a slot became free."""
    import random
    import time

    from gpulab.vajra import bench
    from gpulab.vajra.engine import EngineConfig, LLMEngine

    from .fake_model import FakeModel

    def spied():
        eng = LLMEngine(FakeModel(97, max_model_len=128), None, EngineConfig(num_blocks=200))
        seen, add = [], eng.add_request

        def add_and_keep(ids, sp, arrival_time=None):
            seen.append(add(ids, sp, arrival_time=arrival_time))
            return seen[-1]

        eng.add_request = add_and_keep
        return eng, seen

    prompts = [[i + 1] * 6 for i in range(5)]
    eng, seen = spied()
    bench.drive(eng, prompts, 4, 200.0, None, 3)
    rng, want, t = random.Random(4), [], 0.0
    for _ in prompts:
        want.append(t)
        t += rng.expovariate(200.0)
    assert [s.arrival_time - seen[0].arrival_time for s in seen] == pytest.approx(want, abs=1e-9)
    eng, seen = spied()
    t0 = time.perf_counter()
    bench.drive(eng, prompts[:3], 4, float("inf"), 1, 0)
    assert t0 <= seen[0].arrival_time <= seen[0].token_times[0]
    for a, b in zip(seen, seen[1:]):  # one slot: each is sent when the one before it finished
        assert a.token_times[-1] <= b.arrival_time <= b.token_times[0]


def test_generate_prints_greedy_text(tiny_llama, capsys):
    from gpulab.vajra.engine import EngineConfig, load_engine
    from gpulab.vajra.sampling import SamplingParams

    eng = load_engine(tiny_llama, device="cpu", config=EngineConfig(num_blocks=32))
    want = eng.generate(["My lord"], SamplingParams(max_tokens=8, temperature=0.0))[0].text
    invoke(["--device", "cpu", "generate", str(tiny_llama), "--prompt", "My lord", "--max-tokens", "8",
            "--num-blocks", "32"])
    assert capsys.readouterr().out == want + "\n"
    # the penalties reach the engine: the same text as the engine's own run with them
    sp = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5)
    plain, want = want, eng.generate(["My lord"], sp)[0].text
    assert want != plain
    invoke(["--device", "cpu", "generate", str(tiny_llama), "--prompt", "My lord", "--max-tokens", "8",
            "--num-blocks", "32", "--repetition-penalty", "1.5", "--frequency-penalty", "0.5"])
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.parametrize("argv,msg", [
    (["generate", "/nonexistent/model", "--prompt", "x"], "model folder not found"),
    (["serve-bench", "{assets}", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["serve-bench", "{assets}", "--compare", "int4"], "--compare takes fp8"),
    (["serve-bench", "{assets}", "--compare", "fp8,fp8"], "^--compare gives fp8 twice$"),
    (["serve-bench", "{assets}", "--compare", "bf16+kvfp8, fp8,bf16+kvfp8"], "^--compare gives bf16\\+kvfp8 twice$"),
    (["serve-bench", "{assets}", "--compare", "fp8,fp8+kvauto"],
     "^--compare gives fp8 and fp8\\+kvauto: the same set-up"),
    (["serve-bench", "{assets}", "--no-hf-baseline", "--hf-num-prompts", "2"],
     "^--hf-num-prompts applies only to --hf-baseline$"),
    (["serve-bench", "{assets}", "--kv-cache-dtype", "fp4"], "--kv-cache-dtype must be auto or fp8"),
    (["serve-bench", "{assets}", "--hf-num-prompts", "0"], "--hf-num-prompts must be >= 1"),
    (["serve-bench", "{assets}", "--budget-s", "0"], "--budget-s must be a number of seconds > 0"),
    (["serve-bench", "{assets}", "--input-len", "8", "--prefix-len", "9"], "--prefix-len must be in 0..--input-len"),
    (["serve-bench", "{assets}", "--prefix-len", "4", "--prompts-file", "{assets}/config.json"],
     "--prefix-len shapes the random prompts"),
    (["generate", "{assets}", "--prompt", "x", "--enable-prefix-caching", "--prefill", "stitchkv=/nowhere"],
     "--enable-prefix-caching does not work with --prefill"),
    (["serve-bench", "{assets}", "--load-format", "auto", "--compare", "fp8"], "fp8 needs a quantized checkpoint"),
    (["serve", "{assets}", "--max-num-seqs", "0"], "--max-num-seqs must be an integer >= 1"),
    (["serve", "{assets}", "--port", "70000"], "--port must be in"),
    (["generate", "{assets}", "--prompt", "x", "--temperature", "-1", "--load-format", "dummy"], "temperature"),
    (["generate", "{assets}", "--prompt", "x", "--min-p", "1.5", "--load-format", "dummy"], "min_p must be"),
    (["generate", "{assets}", "--prompt", "x", "--presence-penalty", "3", "--load-format", "dummy"],
     "presence_penalty must be a number in"),
    (["generate", "{assets}", "--prompt", "x", "--attention-backend", "xformers"],
     "--attention-backend must be auto, torch, triton or flashinfer, got 'xformers'"),
    (["serve-bench", "{assets}", "--linear-backend", "int4"],
     "--linear-backend must be auto, dequant, w8a8, w8a16 or dequant-jit, got 'int4'"),
])
def test_bad_input_is_one_line(tiny_assets, argv, msg):
    argv = [a.replace("{assets}", str(tiny_assets)) for a in argv]
    with pytest.raises(GpulabError, match=msg.replace("-", r"\-")):
        invoke(["--device", "cpu", *argv])


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_web_packages_is_one_line(tiny_assets, monkeypatch, missing):
    """The GPU machine has neither fastapi nor uvicorn: serve says so before loading anything."""
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ModuleNotFoundError(name=missing)
    monkeypatch.delitem(sys.modules, "gpulab.vajra.server", raising=False)
    absent = [m for m in ("fastapi", "uvicorn") if m == missing or importlib.util.find_spec(m) is None]
    with pytest.raises(GpulabError, match=f"gpulab serve needs the package '({'|'.join(absent)})', which is not "):
        invoke(["--device", "cpu", "serve", str(tiny_assets), "--load-format", "dummy"])
    with pytest.raises(GpulabError, match="--max-num-seqs must be"):  # option errors still come first
        invoke(["--device", "cpu", "serve", str(tiny_assets), "--max-num-seqs", "0"])


def test_serve_checks_its_address_before_loading_the_model(tiny_assets, monkeypatch):
    """An address that does not resolve, or a busy port, is a one-line error before the model loads (uvicorn found
    it after the load and exited 3 with its own log lines)."""
    import socket

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from gpulab.vajra import cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(InputError, match="^--host 256.1.1.1: not an address of this machine"):
        invoke(["--device", "cpu", "serve", str(tiny_assets), "--host", "256.1.1.1", "--port", "8123"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"^--host 127.0.0.1 --port {port}: cannot bind"):
            invoke(["--device", "cpu", "serve", str(tiny_assets), "--port", str(port)])
        # a hostname binds IPv4 as uvicorn does (not getaddrinfo's first answer, which may be ::1 for localhost)
        with pytest.raises(InputError, match=f"^--host localhost --port {port}: cannot bind"):
            invoke(["--device", "cpu", "serve", str(tiny_assets), "--host", "localhost", "--port", str(port)])
    from gpulab.vajra.server import check_bind

    check_bind("", 0)  # every interface, as uvicorn takes it
    real = socket.getaddrinfo

    def ipv6_only(host, port, family=0, *a, **k):  # a name of IPv6 addresses only ('ip6-localhost')
        if host == "ip6-only.test":
            if family == socket.AF_INET:
                raise socket.gaierror(-2, "Name or service not known")
            return real("::1", port, socket.AF_INET6, *a, **k)
        return real(host, port, family, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_only)
    check_bind("ip6-only.test", 0)


def test_help_imports_nothing_heavy():
    code = ("import sys; from gpulab.cli import main\n"
            "sys.argv=['gpulab','serve-bench','--help']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "bad=[m for m in ('torch','transformers','fastapi','uvicorn') if m in sys.modules]\n"
            "print('HEAVY', bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in r.stdout and "--input-len" in r.stdout


def test_spec_hbm_matches_whole_device_names():
    from gpulab.vajra.bench import spec_hbm

    assert spec_hbm("NVIDIA H100 80GB HBM3") == 3.35e12 and spec_hbm("NVIDIA H200") == 4.8e12
    assert spec_hbm("NVIDIA H100 PCIe") == 2.0e12 and spec_hbm("NVIDIA L40S") == 0.864e12
    assert spec_hbm("NVIDIA GH200 480GB") is None and spec_hbm("") is None  # not the H200's 4.8 TB/s


@pytest.mark.parametrize("line", ['{"prompt": 5}', '{"prompt": null}', '{"prompt": ["a", "b"]}'])
def test_serve_bench_bad_prompts_file_fails_before_any_model_loads(out_dir, tiny_assets, tmp_path, monkeypatch, line):
    from gpulab.vajra import bench

    pf = tmp_path / "p.txt"
    pf.write_text(line + "\n")
    monkeypatch.setattr(bench, "run_variant", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match="line 1 is not JSON with a 'prompt' string"):
        invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "8",
                "--output-len", "2", "--num-prompts", "2", "--no-hf-baseline", "--decode-steps", "2",
                "--prompts-file", str(pf)])


def test_serve_bench_lengths_past_the_context_fail_first(out_dir, tiny_assets, monkeypatch):
    from gpulab.vajra import bench

    monkeypatch.setattr(bench, "run_variant", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra, what in ((["--output-len", "2", "--decode-steps", "600"], "--input-len \\+ --decode-steps \\+ 1 = 609"),
                        (["--output-len", "600", "--decode-steps", "2"], "--input-len \\+ --output-len = 608")):
        with pytest.raises(InputError, match=what):
            invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "8",
                    "--num-prompts", "2", "--no-hf-baseline", *extra])


def test_decode_batch1_kv_bytes_are_at_the_mean_context():
    """V1: `steps` batch-1 decode steps after an `input_len` prefill read the KV of input_len + (steps + 1) / 2
    tokens on average per step (what roofline_ms adds to the weight bytes)."""
    from types import SimpleNamespace

    from gpulab.vajra import bench

    class Engine:
        def __init__(self):
            self.step_log, self.left = [], 0
            self.model = SimpleNamespace(info=SimpleNamespace(num_layers=2),
                                         kv_bytes_per_block=lambda bs, dt: 100 * bs)
            self.config = SimpleNamespace(kv_cache_dtype="fp8")

        def add_request(self, ids, sp):
            self.left = sp.max_tokens

        def has_unfinished(self):
            return self.left > 0

        def step(self):  # the first step is the prefill (it makes the first token)
            self.step_log.append({"ms": 2.0, "host_ms": 0.5, "decode_only": bool(self.step_log)})
            self.left -= 1
            return []

    d = bench.decode_batch1(Engine(), input_len=10, steps=4, vocab=50, seed=0)
    assert d["kv_bytes_read"] == pytest.approx(100 * (10 + 5 / 2))
    assert d["decode_b1_ms"] == 2.0 and d["decode_b1_steps"] == 4


def test_serve_bench_roofline_is_bytes_over_the_copy_ceiling(out_dir, tiny_assets, monkeypatch):
    """V2: roofline_ms = (weight bytes + KV bytes read) / (copy GB/s * 1e9) in ms; roofline_frac = it / decode."""
    from gpulab.core import ceilings

    monkeypatch.setattr(ceilings, "copy_bandwidth_gbs", lambda *a, **k: 50.0)
    invoke(["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "24",
            "--output-len", "3", "--num-prompts", "2", "--num-blocks", "48", "--decode-steps", "4",
            "--compare", "bf16", "--no-hf-baseline"])
    rec = yaml.safe_load(next(out_dir.glob("serve-bench-*.yaml")).read_text())
    v = rec["metrics"]["variants"]["vajra-bf16"]
    moved = v["weight_bytes"] + v["kv_bytes_read"]
    assert v["roofline_ms"] == pytest.approx(moved / 50e9 * 1e3, rel=1e-9)
    assert v["roofline_frac"] == pytest.approx(v["roofline_ms"] / v["decode_b1_ms"], rel=1e-9)


def test_the_hf_floor_serves_every_prompt_at_its_own_length(tiny_llama):
    """Prompts of several lengths (a prompts file): the floor ran only those at least as long as the first, cut to
    its length, while hf_batch claimed all of them. Left-padded and masked, each gives the tokens it gives alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpulab.vajra.bench import hf_floor

    prompts = [[1, 5, 9, 13, 17, 21], [1, 7], [1, 3, 4, 8, 2, 6, 11, 12, 30]]
    got = hf_floor(tiny_llama, "auto", "cpu", prompts, 4)
    assert got["num_prompts"] == 3 and got["output_tok_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    n = max(map(len, prompts))
    batch = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    mask = (torch.arange(n)[None] >= torch.tensor([n - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
            assert out[i, n:].tolist() == alone[0, len(p):].tolist(), i
    # a pad id outside the vocabulary (-1 in some converted configs) is not fed to the model
    import json
    import shutil

    odd = tiny_llama.parent / "pad-minus-one"
    if not odd.exists():
        shutil.copytree(tiny_llama, odd)
        cfg = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps({**cfg, "pad_token_id": -1}))
    assert hf_floor(odd, "auto", "cpu", prompts, 2)["num_prompts"] == 3


def test_serve_bench_linear_backend_reaches_every_fp8_linear(out_dir, tiny_assets, monkeypatch):
    """--linear-backend w8a8 on the CPU: every FP8 linear runs W8A8 (torch._scaled_mm runs on the CPU), not the
    dequantized weights; the record says so, and the chunking check is exact (fp32: nothing switches with the
    step's token count)."""
    import torch

    from gpulab.core.errors import DeviceError
    from gpulab.vajra import linear

    calls = []
    real = linear.Linear._w8a8
    monkeypatch.setattr(linear.Linear, "_w8a8", lambda self, x: calls.append(x.shape[0]) or real(self, x))
    argv = ["--device", "cpu", "--out", str(out_dir), "serve-bench", str(tiny_assets), "--input-len", "24",
            "--output-len", "4", "--num-prompts", "3", "--num-blocks", "48", "--decode-steps", "2",
            "--compare", "fp8", "--no-hf-baseline", "--linear-backend", "w8a8", "--load-format", "dummy"]
    if linear.w8a8_unavailable(torch.device("cpu"), True):  # e.g. torch 2.11: per-tensor scales only on the CPU
        with pytest.raises(DeviceError, match="linear backend 'w8a8' cannot run here") as e:
            invoke(argv)
        assert "\n" not in str(e.value) and not calls
        return
    invoke(argv)
    [f] = out_dir.glob("serve-bench-*.yaml")
    rec = yaml.safe_load(f.read_text())
    assert rec["ok"] and rec["config"]["linear_backend"] == "w8a8"
    assert 1 in calls and max(calls) > 1  # decode steps and prefill chunks alike
    assert any("through the w8a8 backend" in n for n in rec["notes"])
    assert rec["checks"]["vajra-fp8: greedy tokens independent of chunking"]["passed"]


def test_w8a8_accumulation_is_said_only_where_w8a8_runs(monkeypatch):
    """serve-bench's row says whether W8A8 accumulates fast only for a model where some linear can run W8A8 on a
    GPU (None otherwise), asking about that linear's scale kind."""
    from types import SimpleNamespace

    from gpulab.vajra import bench
    from gpulab.vajra import linear as L

    asked = []
    monkeypatch.setattr(L, "fast_accum_in_use", lambda dev, rowwise=True: asked.append((dev.type, rowwise)) or True)

    def lin(dev="cuda", ok=True, backend="auto", act="dynamic", strategy="channel", quant=True):
        qw = SimpleNamespace(q=SimpleNamespace(device=SimpleNamespace(type=dev)), act=act, strategy=strategy)
        return SimpleNamespace(qw=qw if quant else None, w8a8_ok=ok, backend=backend)

    def model(*lins):
        return SimpleNamespace(linears=lambda: {str(i): x for i, x in enumerate(lins)})

    assert bench.w8a8_accumulation(model(lin(quant=False))) is None  # BF16 weights
    assert bench.w8a8_accumulation(model(lin(ok=False))) is None  # no FP8 tensor cores / probe refused
    assert bench.w8a8_accumulation(model(lin(backend="w8a16"))) is None  # --linear-backend w8a16
    assert bench.w8a8_accumulation(model(lin(dev="cpu"))) is None and asked == []
    assert bench.w8a8_accumulation(model(lin(quant=False), lin(act="static", strategy="tensor"))) is True
    assert bench.w8a8_accumulation(model(lin())) is True
    assert asked == [("cuda", False), ("cuda", True)]
    assert bench.w8a8_accumulation(SimpleNamespace()) is None  # a model without linears()


@pytest.mark.parametrize("steps", [1, 4])
def test_decode_batch1_times_the_decode_steps_asked_for(steps):
    """--decode-steps N times N decode steps at batch 1 (the prefill's step, which makes the first token, is not
    one of them): --decode-steps 1 gives a figure, not NaN; the KV bytes are at those steps' mean context (the
    step making token j + 1 reads the prompt's K/V and the j tokens before it)."""
    from gpulab.vajra import bench
    from gpulab.vajra.engine import EngineConfig, LLMEngine

    from .fake_model import FakeModel

    eng = LLMEngine(FakeModel(97, max_model_len=128), None, EngineConfig(num_blocks=200))
    d = bench.decode_batch1(eng, input_len=10, steps=steps, vocab=97, seed=0)
    assert d["decode_b1_steps"] == steps and math.isfinite(d["decode_b1_ms"])
    ctx = sum(10 + j for j in range(1, steps + 1)) / steps
    assert d["kv_bytes_read"] == pytest.approx(eng.model.kv_bytes_per_block(1) * ctx)
