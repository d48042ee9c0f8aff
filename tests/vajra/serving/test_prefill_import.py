"""Prompts prefilled by a provider (disaggregated inference), decoded by the engine: the K/V written
into the paged cache and the first token sampled from the provider's logits give exactly the tokens
of a plain engine when the provider computes the same model; also under preemption (the prompt is
imported again, only generated tokens are recomputed) and through `gpulab generate --prefill`."""
from __future__ import annotations

import pytest

from gpulab.cli import invoke
from gpulab.core.errors import GpulabError, InputError
from gpulab.vajra.engine import EngineConfig, LLMEngine, load_engine
from gpulab.vajra.sampling import SamplingParams
from tests.vajra.serving.hf_prefill import HFPrefill

PROMPTS = ["To be, or not to be", "My lord,", "Now is the winter of our discontent made glorious summer",
           "O Romeo, Romeo! wherefore art thou"]
N_OUT = 10
GREEDY = SamplingParams(max_tokens=N_OUT, temperature=0.0, ignore_eos=True)


def _engine(folder, prefill=None, **cfg):
    kw = dict(num_blocks=64, block_size=4, max_num_seqs=4)
    kw.update(cfg)
    eng = load_engine(folder, device="cpu", attention_backend="torch", config=EngineConfig(**kw))
    if prefill is not None:
        eng.prefill = prefill
    return eng


@pytest.fixture(scope="module")
def plain_tokens(tiny_llama):
    return [o.output_token_ids for o in _engine(tiny_llama).generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("cfg", [dict(), dict(num_blocks=14, max_num_batched_tokens=8)])
def test_imported_prompts_decode_like_the_plain_engine(tiny_llama, plain_tokens, cfg):
    provider = HFPrefill(str(tiny_llama))
    eng = _engine(tiny_llama, provider, **cfg)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.output_token_ids for o in outs] == plain_tokens
    assert provider.calls == len(PROMPTS)  # once per request, also when preempted (the import is kept)
    assert eng.block_manager.num_used == 0
    if cfg:
        assert eng.scheduler.num_preemptions > 0


def test_one_prefill_for_the_choices_of_a_prompt(tiny_llama, plain_tokens):
    """Requests added back to back with one prompt (an API request's n choices) share the provider's result;
    a different prompt, or the same one after a step, is prefilled again."""
    provider = HFPrefill(str(tiny_llama))
    eng = _engine(tiny_llama, provider)
    seqs = [eng.add_request(PROMPTS[0], GREEDY, request_id=f"a{i}") for i in range(3)]
    assert provider.calls == 1 and seqs[0].imported is seqs[2].imported
    eng.add_request(PROMPTS[1], GREEDY, request_id="b")
    eng.add_request(PROMPTS[0], GREEDY, request_id="a3")
    assert provider.calls == 3
    eng.step()
    eng.add_request(PROMPTS[1], GREEDY, request_id="b1")
    assert provider.calls == 4
    outs = {}
    while eng.has_unfinished():
        outs.update({o.request_id: o.output_token_ids for o in eng.step() if o.finished})
    assert [outs[f"a{i}"] for i in range(4)] == [plain_tokens[0]] * 4
    assert outs["b"] == outs["b1"] == plain_tokens[1]
    assert eng.block_manager.num_used == 0


def test_first_token_only_and_sampling_params(tiny_llama, plain_tokens):
    eng = _engine(tiny_llama, HFPrefill(str(tiny_llama)))
    outs = eng.generate(PROMPTS[:2], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert [o.output_token_ids for o in outs] == [t[:1] for t in plain_tokens[:2]]
    assert all(o.finish_reason == "length" for o in outs) and eng.block_manager.num_used == 0
    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    a = [o.output_token_ids for o in eng.generate(PROMPTS[:2], seeded)]
    b = [o.output_token_ids for o in eng.generate(PROMPTS[:2], seeded)]
    assert a == b


def test_provider_output_must_fit_the_model(tiny_llama):
    eng = _engine(tiny_llama, HFPrefill(str(tiny_llama), drop_layer=True))
    with pytest.raises(InputError, match="K/V for 1 layers, the model has 2") as e:
        eng.add_request("My lord,", GREEDY)
    assert "\n" not in str(e.value)


def test_provider_specs(tiny_llama):
    from gpulab.vajra.prefill import load_provider, parse_spec

    assert parse_spec("stitchkv=/a=b") == ("stitchkv", "/a=b")
    for bad in ("stitchkv", "=x", "name="):
        with pytest.raises(InputError, match="NAME=ARG"):
            parse_spec(bad)
    with pytest.raises(InputError, match="unknown prefill provider 'nope'"):
        load_provider("nope=x", device="cpu")
    with pytest.raises(InputError, match="cannot be loaded"):
        load_provider("tests.vajra.serving.hf_prefill:missing=x", device="cpu")
    p = load_provider(f"tests.vajra.serving.hf_prefill:load={tiny_llama}", device="cpu")
    assert isinstance(p, HFPrefill)


def test_generate_cli_with_prefill(tiny_llama, capsys):
    base = ["--device", "cpu", "generate", str(tiny_llama), "--prompt", "My lord", "--max-tokens", "8",
            "--num-blocks", "32", "--attention-backend", "torch"]
    invoke(base)
    want = capsys.readouterr().out
    invoke(base + ["--prefill", f"tests.vajra.serving.hf_prefill:load={tiny_llama}"])
    assert capsys.readouterr().out == want
    with pytest.raises(GpulabError, match="K/V for 1 layers"):
        invoke(base + ["--prefill", f"tests.vajra.serving.hf_prefill:load_broken={tiny_llama}"])


def test_engine_without_provider_is_unchanged(tiny_llama):
    assert isinstance(_engine(tiny_llama), LLMEngine) and _engine(tiny_llama).prefill is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_imported_prompts_decode_like_the_plain_engine(tiny_llama, backend):
    """On a GPU (fp32, so that transformers' prefill and vajra's agree to rounding): imported prompts decode to the
    plain engine's tokens, with the Triton backend through CUDA graphs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4)
    plain = load_engine(tiny_llama, device="cuda", attention_backend=backend, dtype="fp32", config=cfg)
    want = [o.output_token_ids for o in plain.generate(PROMPTS, GREEDY)]
    eng = load_engine(tiny_llama, device="cuda", attention_backend=backend, dtype="fp32", config=cfg)
    eng.prefill = HFPrefill(str(tiny_llama), device="cuda")
    if backend == "triton":
        assert eng.graphs is not None, eng.notes
    assert [o.output_token_ids for o in eng.generate(PROMPTS, GREEDY)] == want
    assert eng.block_manager.num_used == 0


def test_server_with_a_prefill_provider(tiny_llama, plain_tokens):
    """The OpenAI server over an engine with a provider: the same text as the plain engine; a provider whose
    output does not fit the model is a 400 naming it, not a hang or a crashed engine."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from gpulab.vajra.server import AsyncEngine, ServerThread, build_app

    eng = _engine(tiny_llama, HFPrefill(str(tiny_llama)))
    want = eng.tokenizer.decode(plain_tokens[1])
    ae = AsyncEngine(eng).start()
    try:
        with ServerThread(build_app(ae, "tiny")) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
            r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=N_OUT, temperature=0,
                                     extra_body={"ignore_eos": True})
            assert r.choices[0].text == want
            eng.prefill = HFPrefill(str(tiny_llama), drop_layer=True)
            with pytest.raises(openai.BadRequestError, match="K/V for 1 layers"):
                c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0)
            assert ae.alive
    finally:
        ae.shutdown()


def test_memory_profile_runs_the_provider(tiny_llama, monkeypatch):
    """Sizing the KV cache from free GPU memory also runs the prefill provider once (its activations share the
    GPU between steps); here the CUDA calls are no-ops and the profile runs on the CPU model."""
    import torch

    calls = []

    class Provider:
        name = "probe"

        def __call__(self, ids):
            calls.append(len(ids))
            return None

    eng = _engine(tiny_llama, max_num_batched_tokens=40)
    eng.prefill = Provider()
    for fn in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, **k: None)
    eng._profile_peak_memory()
    assert calls == [min(eng.max_model_len - 1, 40)] == [eng.provider_profile_len()]
    assert any("prefill provider 'probe'" in n for n in eng.notes)


def test_sizing_may_leave_notes(monkeypatch):
    """The KV-cache sizing runs inside the engine's constructor and may add notes (the provider's profile)."""
    from gpulab.vajra.engine import LLMEngine

    from .fake_model import FakeModel

    def size(self):
        self.notes.append("sized")
        return 16

    monkeypatch.setattr(LLMEngine, "_size_cache", size)
    eng = LLMEngine(FakeModel(97, max_model_len=64), None, EngineConfig(block_size=4))
    assert eng.num_blocks == 16 and eng.notes[0] == "sized"
