"""Edge cases of the vajra engine, scheduler, CUDA-graph padding, server usage and bench math that the broader
tests do not pin down: finish-reason precedence at max_tokens, context-length and cache-capacity boundaries,
the watermark and max_prefill_chunk at admission, which sequence is preempted and where it goes back in the
queue, the oldest prefill's recovery from a cache full of half-prefilled sequences, the token budget with
imported prompts, and the padding rows of a decode graph (fake model, no GPU)."""
from __future__ import annotations

import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.vajra.block_manager import BlockManager
from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.interface import PrefilledPrompt
from gpulab.vajra.sampling import SamplingParams
from gpulab.vajra.scheduler import Scheduler, Sequence

from .fake_model import FakeModel, expected_logits, reference_greedy

VOCAB = 97


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def run_all(eng, max_steps=500):
    outs = {}
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        steps += 1
        assert steps < max_steps, "the engine makes no progress"
    return outs


def generate(eng, prompts, params, max_steps=500):
    """eng.generate with a step cap (a scheduling bug fails the test instead of hanging it)."""
    ids = [eng.add_request(p, params).request_id for p in prompts]
    outs = run_all(eng, max_steps)
    return [outs[i] for i in ids]


# --- engine: finishing and request validation ---------------------------------------------------------------

def test_eos_on_the_last_allowed_token_finishes_with_stop():
    """An EOS (or stop token id) sampled as the max_tokens-th token ends the sequence with "stop", not "length"
    (as vLLM: the stop condition is checked first)."""
    prompt = [3, 1, 4, 1, 5]
    ref = reference_greedy(prompt, 12, VOCAB)
    k = next(i for i in range(2, 12) if ref[i] not in ref[:i])
    eng = LLMEngine(FakeModel(VOCAB, eos=(ref[k],)), None, EngineConfig(num_blocks=50, block_size=4))
    (o,) = generate(eng, [prompt], greedy(k + 1))
    assert o.output_token_ids == ref[:k + 1] and o.finish_reason == "stop"
    (o,) = generate(eng, [prompt], greedy(k + 1, ignore_eos=True))
    assert o.output_token_ids == ref[:k + 1] and o.finish_reason == "length"
    (o,) = generate(eng, [prompt], greedy(k + 1, ignore_eos=True, stop_token_ids=[ref[k]]))
    assert o.output_token_ids == ref[:k + 1] and o.finish_reason == "stop"
    assert eng.block_manager.num_used == 0


def test_context_length_and_cache_capacity_boundaries():
    """--max-model-len above the model's is clamped to the model's; a request of exactly the context length, and
    one that needs exactly every block of the cache, are served; one token more is refused."""
    eng = LLMEngine(FakeModel(VOCAB, max_model_len=64), None,
                    EngineConfig(num_blocks=100, block_size=4, max_model_len=1000))
    assert eng.max_model_len == 64
    with pytest.raises(InputError, match="maximum context length is 64"):
        eng.add_request(list(range(60)), greedy(5))
    eng.add_request(list(range(60)), greedy(4), request_id="fits")
    o = run_all(eng)["fits"]
    assert o.output_token_ids == reference_greedy(list(range(60)), 4, VOCAB) and o.finish_reason == "length"

    eng = LLMEngine(FakeModel(VOCAB, max_model_len=128), None, EngineConfig(num_blocks=9, block_size=4))
    assert eng.block_manager.capacity_blocks == 8
    with pytest.raises(InputError, match="KV-cache blocks"):
        eng.add_request(list(range(30)), greedy(3))  # 33 tokens: 9 blocks
    eng.add_request(list(range(30)), greedy(2), request_id="all")  # 32 tokens: every block
    o = run_all(eng)["all"]
    assert o.output_token_ids == reference_greedy(list(range(30)), 2, VOCAB)
    assert eng.block_manager.num_used == 0


def test_a_finished_request_forgets_its_id():
    """A finished request's id is released: it can be used again, and aborting it is a no-op."""
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=50, block_size=4))
    for _ in range(2):
        eng.add_request([1, 2, 3], greedy(2), request_id="x")
        assert run_all(eng)["x"].output_token_ids == reference_greedy([1, 2, 3], 2, VOCAB)
    assert not eng._by_request and eng.num_unfinished == 0
    assert not eng.abort("x")


# --- scheduler: chunking, watermark, preemption ---------------------------------------------------------------

def test_max_prefill_chunk_caps_every_chunk():
    """max_prefill_chunk bounds a prompt's first chunk (admission) as well as the later ones."""
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=50, block_size=4, max_num_batched_tokens=64,
                                                         max_prefill_chunk=3))
    eng.step_log = []
    prompt = list(range(10))
    (o,) = generate(eng, [prompt], greedy(2))
    assert [s["tokens"] for s in eng.step_log] == [3, 3, 3, 1, 1]
    assert o.output_token_ids == reference_greedy(prompt, 2, VOCAB)


def test_sampled_rows_when_an_unfinished_chunk_comes_first():
    """A step whose first sequence is a non-final prefill chunk (max_prefill_chunk) and whose second finishes its
    prompt: the second's token is sampled from its own logits row, not the first row of the batch."""
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=50, block_size=4, max_num_batched_tokens=64,
                                                         max_prefill_chunk=4))
    eng.step_log = []
    prompts = [list(range(1, 11)), [40, 41, 42]]
    outs = generate(eng, prompts, greedy(3))
    assert eng.step_log[0]["tokens"] == 7  # 4 of the first prompt (no sample), all 3 of the second
    for p, o in zip(prompts, outs):
        assert o.output_token_ids == reference_greedy(p, 3, VOCAB)


def _seq(i, n, arrival=0.0, imported=None):
    s = Sequence(i, f"r{i}", list(range(1, n + 1)), greedy(1), arrival_time=arrival)
    s.imported = imported
    return s


def test_watermark_is_kept_free_when_admitting_beside_running_sequences():
    """With sequences running, admission leaves watermark * capacity blocks free: a prompt that does not fit
    beside the reserve gets a partial first chunk (the blocks above the reserve); an imported prompt (all of its
    blocks at once) waits."""
    bm = BlockManager(11, 4)  # capacity 10; watermark 0.3: 3 blocks kept free
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.3)
    assert sch.watermark_blocks == 3
    a, b = _seq(1, 8), _seq(2, 28)
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    # a alone: no reserve (2 blocks); b beside it: 8 free - 3 reserved = 5 blocks = 20 tokens
    assert [(s.seq.seq_id, s.num_tokens, s.sample) for s in out.scheduled] == [(1, 8, True), (2, 20, False)]
    assert bm.num_free == 3

    bm = BlockManager(11, 4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.3)
    a, big, small = _seq(1, 8), _seq(2, 28, imported=object()), _seq(3, 20, imported=object())
    for s in (a, big):
        sch.add(s)
    out = sch.schedule()
    assert out.imported == [] and list(sch.waiting) == [big]  # 7 blocks + 3 reserved > 8 free
    assert bm.num_free == 8
    sch.waiting.clear()
    sch.add(small)
    out = sch.schedule()
    assert out.imported == [small] and bm.num_free == 3  # 5 blocks + 3 reserved fit


@pytest.mark.parametrize("arrivals,want_waiting", [((0.0, 1.0, 2.0), ["b", "c"]), ((0.0, 2.0, 1.0), ["c", "b"])])
def test_preemption_takes_the_newest_and_requeues_it_in_arrival_order(arrivals, want_waiting):
    """The oldest running sequence needs a block and none is free: the newest running one is preempted (not the
    one asking), and it goes back into the waiting queue in arrival order (ahead of a later request, behind an
    earlier one); every output is still exact."""
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=3, block_size=4, max_num_batched_tokens=64,
                                                         watermark=0.0))
    reqs = {"a": ([5, 6, 7, 8], 4), "b": ([9, 10], 2), "c": ([11, 12, 13, 14], 4)}
    seqs = {rid: eng.add_request(p, greedy(n), request_id=rid, arrival_time=t)
            for (rid, (p, n)), t in zip(reqs.items(), arrivals)}
    eng.step()  # a (1 block) and b (1 block) admitted; c finds no block
    assert [s.request_id for s in eng.scheduler.running] == ["a", "b"]
    assert [s.request_id for s in eng.scheduler.waiting] == ["c"]
    eng.step()  # a's 5th token needs a second block: b is preempted
    assert seqs["a"].num_preemptions == 0 and seqs["b"].num_preemptions == 1
    assert [s.request_id for s in eng.scheduler.waiting] == want_waiting
    outs = run_all(eng)
    for rid, (p, n) in reqs.items():
        assert outs[rid].output_token_ids == reference_greedy(p, n, VOCAB), rid
    assert eng.block_manager.num_used == 0


def test_oldest_prefill_preempts_the_newest_when_half_prefilled_sequences_fill_the_cache():
    """Two long prompts prefilled in chunks side by side fill the cache before either is through: the oldest
    gets its next chunk by preempting the newest (no deadlock), and both finish with exact outputs."""
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=6, block_size=4, max_num_batched_tokens=8,
                                                         max_prefill_chunk=4, watermark=0.0))
    prompts = [list(range(1, 15)), list(range(20, 34))]
    for i, p in enumerate(prompts):
        eng.add_request(p, greedy(1), request_id=str(i))
    outs = run_all(eng, max_steps=60)
    assert eng.scheduler.num_preemptions >= 1
    for i, p in enumerate(prompts):
        assert outs[str(i)].output_token_ids == reference_greedy(p, 1, VOCAB)
    assert eng.block_manager.num_used == 0


class FakePrefill:
    """A prefill provider for FakeModel: the K/V FakeModel itself would write (token id, position) and its
    last-token logits."""

    name = "fake"

    def __call__(self, ids):
        n = len(ids)
        k = torch.full((n, 1, 4), -1.0)
        k[:, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        k[:, 0, 1] = torch.arange(n, dtype=torch.float32)
        v = torch.ones(n, 1, 4)
        return PrefilledPrompt(logits=expected_logits(list(ids), VOCAB), kv=[(k, v), (k.clone(), v.clone())])


def _fake_layout_write_kv(layer, k, v, slot_mapping, k_scale=1.0, v_scale=1.0):
    """write_kv in FakeModel's own cache layout (its 'slot view')."""
    flat = layer.view(-1, 2, 1, 4)
    flat[slot_mapping, 0, 0, 0] = k[:, 0, 0]
    flat[slot_mapping, 0, 0, 1] = k[:, 0, 1]
    flat[slot_mapping, 1, 0, 0] = 1.0


def test_decodes_of_imported_prompts_stay_within_the_token_budget(monkeypatch):
    """Imported prompts are admitted without a prefill chunk (several in one step); their decodes still get at
    most max_num_batched_tokens tokens a step, the oldest first."""
    from gpulab.vajra import reference

    monkeypatch.setattr(reference, "write_kv", _fake_layout_write_kv)
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=2,
                                                         max_num_seqs=4), prefill=FakePrefill())
    eng.step_log = []
    prompts = [[i + 1, i + 2, i + 3] for i in range(4)]
    for i, p in enumerate(prompts):
        eng.add_request(p, greedy(4), request_id=str(i))
    outs = run_all(eng)
    assert eng.step_log and max(s["tokens"] for s in eng.step_log) <= 2
    for i, p in enumerate(prompts):
        assert outs[str(i)].output_token_ids == reference_greedy(p, 4, VOCAB)
    assert eng.block_manager.num_used == 0


# --- CUDA-graph decode runner (CPU stand-in: the 'graph' re-runs the fake model on the static buffers) -----------

def test_graph_capture_sizes_and_fits():
    from gpulab.vajra.cuda_graphs import DecodeGraphRunner

    assert DecodeGraphRunner.capture_sizes(1) == [1]
    assert DecodeGraphRunner.capture_sizes(4) == [1, 2, 4]
    assert DecodeGraphRunner.capture_sizes(16) == [1, 2, 4, 8, 16]
    assert DecodeGraphRunner.capture_sizes(33) == [1, 2, 4, 8, 16, 24, 32, 33]
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=20, block_size=4, max_num_seqs=33))
    runner = DecodeGraphRunner(eng, DecodeGraphRunner.capture_sizes(33))
    assert runner.fits(33) and runner.fits(1) and not runner.fits(34)


class _FakeGraph:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


def test_graph_padding_rows_never_touch_real_sequences():
    """A decode batch of B sequences replays the graph of the next captured size: the padding rows decode token 0
    at position 0 into the null block, whatever the buffers held from a larger batch before (a stale slot would
    overwrite a live sequence's K/V, a stale position or context length breaks the padding row), and only the B
    real rows come back."""
    from gpulab.vajra.cuda_graphs import DecodeGraphRunner

    model = FakeModel(VOCAB)
    eng = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4))
    runner = DecodeGraphRunner(eng, [1, 4])
    for b in runner.sizes:
        batch = runner._batch(b)
        runner.outputs[b] = torch.zeros(b, VOCAB)
        runner.graphs[b] = _FakeGraph(lambda batch=batch: model.forward(batch, eng.kv), runner.outputs[b])
    eng.graphs = runner
    seen = []
    real_run = runner.run

    def spy(batch):
        out = real_run(batch)
        seen.append((batch.num_seqs, tuple(out.shape)))
        return out

    runner.run = spy
    # a finishes first: b, c, d (rows 1..3 before) decode as rows 0..2 padded to 4; row 3 held d's slot
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7, 8], "c": [9, 10], "d": [11, 12, 13, 14, 15, 16]}
    max_tokens = {"a": 2, "b": 9, "c": 9, "d": 7}
    for rid, p in prompts.items():
        eng.add_request(p, greedy(max_tokens[rid]), request_id=rid)
    outs = run_all(eng)
    assert {(4, (4, VOCAB)), (3, (3, VOCAB)), (2, (2, VOCAB))} <= set(seen)
    assert all(n == shape[0] for n, shape in seen)
    for rid, p in prompts.items():
        assert outs[rid].output_token_ids == reference_greedy(p, max_tokens[rid], VOCAB), rid
    assert eng.block_manager.num_used == 0
    assert int(runner.slot_mapping[3]) == 0 and int(runner.positions[3]) == 0 and int(runner.context_lens[3]) == 1


# --- attention backend dispatch ------------------------------------------------------------------------------------

def test_attention_backend_choice_on_the_cpu_and_flashinfer_decode_kernels():
    """auto is the torch reference on the CPU (its K/V store is not the Triton kernel); flashinfer's decode needs
    its tensor-core kernels exactly for the GQA group sizes its CUDA-core kernels are not built for."""
    from gpulab.vajra.attention import flashinfer_decode_tensor_cores, make_backend

    be = make_backend("auto", device=torch.device("cpu"), num_heads=4, num_kv_heads=2, head_dim=8, scale=0.5,
                      act_dtype=torch.float32)
    assert be.name == "torch" and not be.graph_capturable and not be.fused_store
    for hq, hkv in ((32, 8), (8, 8), (24, 8), (16, 8), (64, 8)):
        assert not flashinfer_decode_tensor_cores(hq, hkv), (hq, hkv)
    for hq, hkv in ((28, 4), (40, 8), (48, 8), (80, 8)):  # groups 7, 5, 6, 10
        assert flashinfer_decode_tensor_cores(hq, hkv), (hq, hkv)


# --- serve-bench metrics ---------------------------------------------------------------------------------------------

def _bench_run(monkeypatch, deadline=30.0):
    """bench.drive on the fake model under an irregular fake clock (every latency distinct, ITLs out of order);
    returns its result, the engine and the sequences it added."""
    import random
    import time

    from gpulab.vajra import bench

    rng = random.Random(7)
    now = [1000.0]

    def clock():
        now[0] += rng.choice([0.001, 0.004, 0.0005, 0.013, 0.002])
        return now[0]

    eng = LLMEngine(FakeModel(VOCAB, max_model_len=128), None,
                    EngineConfig(num_blocks=200, block_size=4, max_num_batched_tokens=16, max_num_seqs=3))
    seqs, add = [], eng.add_request

    def keep(ids, sp, arrival_time=None):
        seqs.append(add(ids, sp, arrival_time=arrival_time))
        return seqs[-1]

    eng.add_request = keep
    prompts = [[i + 1] * (3 + 5 * i) for i in range(5)]
    monkeypatch.setattr(time, "perf_counter", clock)
    try:
        # (a deadline far beyond the run's ~0.4 s of fake time: a bug that stalls a request ends the run)
        res = bench.drive(eng, prompts, 6, float("inf"), None, 0, deadline=now[0] + deadline)
    finally:
        monkeypatch.undo()
    return res, eng, seqs


def _want_stats(res, name, values_ms):
    import numpy as np

    assert res[f"{name}_mean_ms"] == pytest.approx(float(np.mean(values_ms)), rel=1e-9), name
    assert res[f"{name}_median_ms"] == pytest.approx(float(np.percentile(values_ms, 50)), rel=1e-9), name
    assert res[f"{name}_p99_ms"] == pytest.approx(float(np.percentile(values_ms, 99)), rel=1e-9), name


def test_serve_bench_latency_and_throughput_math(monkeypatch):
    """TTFT from arrival to the first token; TPOT over the tokens after the first; ITL over every gap between
    tokens (its percentiles on those gaps, not on per-request means); e2e from arrival to the last token; output
    tok/s and requests/s over the run's whole duration; host_share of the run in the same unit."""
    res, eng, seqs = _bench_run(monkeypatch)
    assert not res["time_boxed"] and len(seqs) == 5 and all(s.finish_reason == "length" and len(s.token_times) == 6 for s in seqs)
    ttft = [(s.token_times[0] - s.arrival_time) * 1e3 for s in seqs]
    tpot = [(s.token_times[-1] - s.token_times[0]) / 5 * 1e3 for s in seqs]
    itl = [(b - a) * 1e3 for s in seqs for a, b in zip(s.token_times, s.token_times[1:])]
    e2e = [(s.token_times[-1] - s.arrival_time) * 1e3 for s in seqs]
    assert itl != sorted(itl) and len(set(tpot)) > 1  # the clock makes the figures distinguishable
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        _want_stats(res, name, values)
    d = res["duration_s"]
    assert d >= max(s.token_times[-1] for s in seqs) - min(s.arrival_time for s in seqs)
    assert res["output_tokens"] == 30 and res["completed"] == 5
    assert res["output_tok_s"] == pytest.approx(30 / d) and res["requests_s"] == pytest.approx(5 / d)
    assert res["total_tok_s"] == pytest.approx((30 + sum(len(s.prompt_token_ids) for s in seqs)) / d)
    assert res["host_share"] == pytest.approx(sum(st["host_ms"] for st in eng.step_log) / (d * 1e3))
    assert 0 < res["host_share"] < 1


def test_serve_bench_time_boxed_counts_every_produced_token(monkeypatch):
    """Under a time box, output tokens count what every request produced (aborted ones too), not only the
    completed requests'; e2e covers the completed ones only."""
    res, eng, seqs = _bench_run(monkeypatch, deadline=0.25)
    assert res["time_boxed"] and 0 < res["completed"] < 5
    produced = sum(s.num_output for s in seqs)
    assert res["output_tokens"] == produced == sum(len(o) for o in res["outputs"])
    assert produced > 6 * res["completed"]  # an aborted request had produced tokens
    assert res["output_tok_s"] == pytest.approx(produced / res["duration_s"])
    assert res["requests_s"] == pytest.approx(res["completed"] / res["duration_s"])
    e2e = [(s.token_times[-1] - s.arrival_time) * 1e3 for s in seqs if s.finish_reason == "length"]
    _want_stats(res, "e2e", e2e)
    assert eng.block_manager.num_used == 0


# --- the async engine's inbox -----------------------------------------------------------------------------------

def _wait(cond, timeout=10.0):
    import time

    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()


def test_async_engine_abort_queued_with_its_add_wins():
    """A request added and aborted before the engine thread drains its inbox (a client gone at once) is aborted,
    not generated to max_tokens."""
    from gpulab.vajra.async_engine import AsyncEngine

    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=50, block_size=4))
    added, real_add = [], eng.add_request
    eng.add_request = lambda *a, **k: added.append(real_add(*a, **k)) or added[-1]
    ae = AsyncEngine(eng)
    ae._adds.append(("x", [1, 2, 3], greedy(50)))  # the inbox as submit() and abort() leave it
    ae._aborts.append("x")
    ae.start()
    try:
        assert _wait(lambda: added and not eng.has_unfinished())
    finally:
        ae.shutdown()
    assert added[0].finish_reason == "abort" and added[0].num_output == 0
    assert eng.block_manager.num_used == 0


def test_async_stream_delivers_every_token_and_forgets_the_request():
    import asyncio

    from gpulab.vajra.async_engine import AsyncEngine

    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=50, block_size=4))
    ae = AsyncEngine(eng).start()

    async def consume():
        return [o async for o in ae.stream("y", [1, 2, 3], greedy(4))]

    try:
        outs = asyncio.run(consume())
    finally:
        ae.shutdown()
    assert [t for o in outs for t in o.new_token_ids] == reference_greedy([1, 2, 3], 4, VOCAB)
    assert [o.finished for o in outs] == [False] * 3 + [True] and outs[-1].finish_reason == "length"
    assert not ae._streams and not ae._aborts and eng.block_manager.num_used == 0


# --- the server: finish reasons of a stream that ends on EOS -----------------------------------------------------

def test_streamed_completion_ending_on_eos_sends_its_finish_reason(tokenizer):
    """The EOS token that ends a sequence adds no text: its chunk still goes out with finish_reason "stop" (and
    the non-streamed answer says "stop"; usage counts the prompt once and every output token)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from gpulab.vajra.server import AsyncEngine, ServerThread, build_app

    vocab = tokenizer.vocab_size
    prompt = tokenizer.encode("My lord,")
    ref = reference_greedy(prompt, 12, vocab)
    k = 3  # " you", " but", "d", then EOS: its chunk has no text
    assert ref[k] not in ref[:k]
    eng = LLMEngine(FakeModel(vocab, max_model_len=256, eos=(ref[k],)), tokenizer,
                    EngineConfig(num_blocks=64, block_size=8))
    ae = AsyncEngine(eng).start()
    try:
        with ServerThread(build_app(ae, "tiny")) as srv:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30).json()
            assert r["choices"][0]["finish_reason"] == "stop"
            assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": k + 1,
                                  "total_tokens": len(prompt) + k + 1}
            chunks = []
            with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        import json

                        chunks.append(json.loads(line[6:]))
            reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert reasons == [None] * k + ["stop"]
            assert chunks[-1]["choices"][0]["text"] == ""
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == r["choices"][0]["text"]
    finally:
        ae.shutdown()
    assert eng.block_manager.num_used == 0


def test_engine_input_checks_from_review():
    vocab = 64
    eng = LLMEngine(FakeModel(vocab, max_model_len=64), None, EngineConfig(num_blocks=40, block_size=4))
    with pytest.raises(InputError, match="stop strings need the model folder's tokenizer"):
        eng.add_request([1, 2], SamplingParams(max_tokens=3, stop=["a"]))
    with pytest.raises(InputError, match="token ids must be integers, got 1.7"):
        eng.add_request([1.7, 2], SamplingParams(max_tokens=3))
    with pytest.raises(InputError, match="got '3'"):
        eng.add_request([1, "3"], SamplingParams(max_tokens=3))
    # generate checks every prompt before queueing any: a bad third prompt leaves nothing behind
    with pytest.raises(InputError, match="maximum context length"):
        eng.generate([[1, 2], [3, 4], [5] * 70], SamplingParams(max_tokens=2))
    assert eng.num_unfinished == 0 and eng.block_manager.num_used == 0
    for bad, match in ((dict(max_prefill_chunk=-1), "max_prefill_chunk"), (dict(max_prefill_chunk=0), "max_prefill"),
                       (dict(watermark=-0.5), "watermark"), (dict(watermark=1.0), "watermark")):
        with pytest.raises(InputError, match=match):
            EngineConfig(**bad).validate()


def test_tensor_and_numpy_prompts_are_token_ids():
    import numpy as np

    eng = LLMEngine(FakeModel(64, max_model_len=64), None, EngineConfig(num_blocks=40, block_size=4))
    a = eng.add_request(torch.tensor([1, 2, 3]), SamplingParams(max_tokens=2))
    b = eng.add_request(np.array([4, 5], dtype=np.int64), SamplingParams(max_tokens=2))
    assert a.token_ids[:3] == [1, 2, 3] and b.token_ids[:2] == [4, 5]
    assert all(type(t) is int for t in a.token_ids + b.token_ids)


def test_stop_string_completed_by_the_held_back_tail_at_the_length_limit_finishes_with_stop():
    """A byte-level token that ends in part of a character (" " + the first byte of a CJK character) is held back
    until the end; at max_tokens the flush adds its text, and a stop string found there cuts the text: the
    finish reason is then "stop" with that stop string (it said "length" beside the cut text)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gpulab.vajra.detokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    space, e6 = "Ġ", "æ"  # the byte-level forms of b" " and b"\xe6"
    vocab[space + e6] = len(vocab)
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[(space, e6)]))
    rust.decoder = decoders.ByteLevel()
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust))
    t = vocab[space + e6]
    assert tok.decode([t]) == " \ufffd"
    eng = LLMEngine(FakeModel(len(vocab), max_model_len=64), tok, EngineConfig(num_blocks=16, block_size=4))
    prompt = [vocab["a"], vocab["b"]]
    [out] = generate(eng, [prompt], greedy(1, stop=[" "], logit_bias={t: 100.0}))
    assert out.output_token_ids == [t]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", " ", "")
    [out] = generate(eng, [prompt], greedy(1, stop=["zz"], logit_bias={t: 100.0}))  # no stop string: length
    assert (out.finish_reason, out.stop_reason, out.text) == ("length", None, " \ufffd")


def test_step_log_ms_is_the_whole_step(monkeypatch):
    """A step's logged ms runs from its first clock read to its last: it left out the bookkeeping after the
    token timestamps, which host_ms counts, so ms - host_ms was not the model's time and the batch-1 decode step
    (serve-bench's decode_b1_ms, "host work included") read short."""
    from gpulab.vajra import engine as E

    eng = LLMEngine(FakeModel(VOCAB, max_model_len=64), None, EngineConfig(num_blocks=16, block_size=4))
    eng.add_request([1, 2, 3], greedy(3))
    eng.step_log = []
    calls = []

    def clock():
        calls.append(float(len(calls)))
        return calls[-1]

    monkeypatch.setattr(E.time, "perf_counter", clock)
    while eng.has_unfinished():
        start = len(calls)
        eng.step()
        step = eng.step_log[-1]
        assert step["ms"] == pytest.approx((calls[-1] - calls[start]) * 1e3)
        assert step["ms"] >= step["host_ms"] + step["drain_ms"]
