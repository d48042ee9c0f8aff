"""A kvstitch run served by vajra: `kvstitch export` writes the decode model, the `stitchkv` prefill
provider hands vajra the large model's first-token logits and the stitched cache; vajra's greedy tokens
equal kvstitch's own single-process stitched decode (large prefill + stitches, small decode)."""
from __future__ import annotations

import pytest
import torch

from gpulab.cli import invoke
from gpulab.core.errors import GpulabError, InputError

N_OUT = 8


def _stitched_tokens(run, stage, prompts_ids):
    from gpulab.stitchkv.store import load_small, run_config
    from gpulab.stitchkv.generate import greedy_stitched
    from gpulab.stitchkv.models import load_model

    cfg = run_config(run)
    large = load_model(cfg["large"], "large", "cpu")
    small, bank = load_small(cfg, run, stage, "cpu")
    with torch.no_grad():
        return [greedy_stitched(large, small, bank, torch.tensor([ids]), N_OUT).tokens[0].tolist()
                for ids in prompts_ids]


@pytest.mark.parametrize("stage", ["lora", "warmup"])
def test_vajra_decodes_the_stitched_cache_like_kvstitch(tiny_run, tmp_path, stage):
    from gpulab.stitchkv.export import export_small
    from gpulab.vajra.engine import EngineConfig, load_engine
    from gpulab.vajra.sampling import SamplingParams

    out = tmp_path / f"small-{stage}"
    assert export_small(tiny_run, out, stage) == stage
    eng = load_engine(out, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@{stage}",
                      config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4))
    assert eng.prefill.stage == stage
    texts = ["the king and the queen", "my lord speak", "thou art not the day of love"]
    ids = [eng.encode(t) for t in texts]
    outs = eng.generate(ids, SamplingParams(max_tokens=N_OUT, temperature=0.0, ignore_eos=True))
    assert [o.output_token_ids for o in outs] == _stitched_tokens(tiny_run, stage, ids)
    assert eng.block_manager.num_used == 0


class _Recording:
    """The engine's sampler, keeping a copy of every logits batch it samples from."""

    def __init__(self, sampler, seen):
        self.sampler, self.seen = sampler, seen

    def __call__(self, logits, params, ids):
        self.seen.append(logits.clone())
        return self.sampler(logits, params, ids)

    def forget(self, seq_id):
        self.sampler.forget(seq_id)


@pytest.mark.parametrize("stage", ["lora", "warmup"])
def test_first_decode_logits_read_the_stitched_cache(tiny_run, tmp_path, stage):
    """Tokens alone are a weak check on tiny random models (attention barely moves their logits): the
    engine's logits after the first output token must equal the small model's on the stitched cache."""
    from gpulab.stitchkv.store import load_small, run_config
    from gpulab.stitchkv.export import export_small
    from gpulab.stitchkv.models import cache_kwarg, load_model
    from gpulab.stitchkv.stitch import stitched_cache
    from gpulab.vajra.engine import EngineConfig, load_engine
    from gpulab.vajra.sampling import SamplingParams

    out = tmp_path / "small"
    export_small(tiny_run, out, stage)
    eng = load_engine(out, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@{stage}",
                      config=EngineConfig(num_blocks=32, block_size=4))
    seen = []
    eng.sampler = _Recording(eng.sampler, seen)
    ids = eng.encode("the king and the queen of night")
    o = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0]
    cfg = run_config(tiny_run)
    large = load_model(cfg["large"], "large", "cpu")
    small, bank = load_small(cfg, tiny_run, stage, "cpu")
    with torch.no_grad():
        logits0, cache = stitched_cache(large, small, bank, torch.tensor([ids]))
        first = torch.tensor([[o.output_token_ids[0]]])
        want = small(input_ids=first, use_cache=True, **{cache_kwarg(small): cache}).logits[0, -1].float()
    assert len(seen) == 2
    torch.testing.assert_close(seen[0][0], logits0[0].float(), rtol=0, atol=0)  # the provider's, as given
    torch.testing.assert_close(seen[1][0], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_export_and_provider_errors(tiny_run, tmp_path):
    from gpulab.stitchkv.export import export_small
    from gpulab.stitchkv.provider import load

    out = tmp_path / "small"
    export_small(tiny_run, out)
    with pytest.raises(InputError, match="^--out-dir .* exists"):  # the option's own name (--out is the results')
        export_small(tiny_run, out)
    export_small(tiny_run, out, overwrite=True)
    with pytest.raises(InputError, match="is or holds the run's run folder"):
        export_small(tiny_run, tiny_run, overwrite=True)
    with pytest.raises(InputError, match="is or holds the run's run folder"):  # a parent: --overwrite deleted it
        export_small(tiny_run, tiny_run.parent, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds files that are not a model folder"):
        export_small(tiny_run, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="^--out-dir .*notes.txt/small: .*notes.txt is not a folder"):  # not an
        export_small(tiny_run, other / "notes.txt" / "small")  # OSError after the merge
    with pytest.raises(InputError, match="run folder not found"):
        load(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="--stage must be one of"):
        load(f"{tiny_run}@stage3")


def test_an_export_made_before_its_stage_was_retrained_is_refused(pair_dirs, corpus_file, tiny_run, tmp_path):
    """The export records what its stage folder held; retrained since, the run's stitches would be decoded by the
    older LoRA-merged model, silently."""
    import shutil

    from gpulab.stitchkv import train as T
    from gpulab.stitchkv.export import export_small
    from gpulab.stitchkv.provider import load
    from tests.stitchkv.test_train import cfg_for

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "small"
    export_small(run, out)
    provider = load(str(run))
    provider.check_model(out)  # fine
    T.train(cfg_for(pair_dirs, corpus_file, run, stage="lora", steps=1, lora_steps=2, lora_lr=5e-2), "cpu",
            log=lambda m: None)
    with pytest.raises(InputError, match="was exported before run .* stage 'lora' was retrained; export it again"):
        load(str(run)).check_model(out)
    export_small(run, out, overwrite=True)
    load(str(run)).check_model(out)
    # a warm-up's export is the small model itself: a retrained warm-up does not make it stale
    warm = tmp_path / "warm"
    export_small(run, warm, "warmup")
    T.train(cfg_for(pair_dirs, corpus_file, run, stage="warmup", steps=2), "cpu", log=lambda m: None)
    load(f"{run}@warmup").check_model(warm)


def test_generate_cli_with_the_stitchkv_provider(tiny_run, tmp_path, capsys):
    out = tmp_path / "small"
    invoke(["kvstitch", "export", "--run", str(tiny_run), "-o", str(out)])
    assert f"--prefill stitchkv={tiny_run}" in capsys.readouterr().out
    base = ["--device", "cpu", "generate", str(out), "--prompt", "the king", "--max-tokens", "6", "--ignore-eos",
            "--num-blocks", "32", "--attention-backend", "torch"]
    # the module:function form works without the installed entry point (e.g. a PYTHONPATH checkout)
    invoke(base + ["--prefill", f"gpulab.stitchkv.provider:load={tiny_run}"])
    assert capsys.readouterr().out.strip()
    with pytest.raises(GpulabError, match="run folder not found"):
        invoke(base + ["--prefill", f"gpulab.stitchkv.provider:load={tmp_path / 'nope'}"])


def test_provider_arg_with_at_signs_in_the_path(tmp_path):
    """Only a known stage name after the last '@' is a stage: a run folder whose path holds '@' is read whole."""
    from gpulab.stitchkv.provider import parse_arg

    at = tmp_path / "runs@2024" / "r@1"
    at.mkdir(parents=True)
    assert parse_arg(str(at)) == (at, "auto")
    assert parse_arg(f"{at}@lora") == (at, "lora") and parse_arg(f"{at}@warmup") == (at, "warmup")
    named = tmp_path / "x@lora"  # a folder named like a stage suffix: @auto makes it unambiguous
    named.mkdir()
    assert parse_arg(f"{named}@auto") == (named, "auto")
    with pytest.raises(InputError, match=r"run folder not found: .*x$"):
        parse_arg(str(named))  # x@lora is RUN@STAGE: the folder x does not exist
    with pytest.raises(InputError, match=r"@stage3 is no stage: --stage must be one of auto, warmup, lora"):
        parse_arg(f"{at}@stage3")
    with pytest.raises(InputError, match="run folder not found"):
        parse_arg(str(tmp_path / "nope@lora"))


def test_the_served_folder_must_be_this_runs_decode_model(tiny_run, tmp_path):
    """Another stage's export, or the run's small model without its LoRA, decodes a cache it was not trained
    with: refused at load, with what to serve instead."""
    from gpulab.stitchkv.export import export_small
    from gpulab.stitchkv.store import run_config
    from gpulab.vajra.engine import EngineConfig, load_engine

    warm = tmp_path / "small-warmup"
    export_small(tiny_run, warm, "warmup")
    cfg = EngineConfig(num_blocks=32, block_size=4)
    with pytest.raises(InputError, match="exported decode model of run .* stage 'warmup', not of .* stage 'lora'"):
        load_engine(warm, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@lora", config=cfg)
    small = run_config(tiny_run)["small"]
    with pytest.raises(InputError, match="small model without its stage-2 LoRA"):
        load_engine(small, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@lora", config=cfg)
    eng = load_engine(small, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@warmup",
                      config=cfg)  # the warm-up stage decodes with the small model as it is
    assert eng.prefill.stage == "warmup"


def test_another_small_model_is_refused_for_the_warmup_stage(tiny_run, tmp_path):
    """Without an export marker, stage warmup must serve the run's own small model (by its fingerprint)."""
    import json
    import shutil

    from gpulab.stitchkv.store import run_config
    from gpulab.vajra.engine import EngineConfig, load_engine

    other = tmp_path / "other-small"
    shutil.copytree(run_config(tiny_run)["small"], other)
    c = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**c, "rms_norm_eps": 1e-5}))  # another model
    with pytest.raises(InputError, match="is not run .*'s small model"):
        load_engine(other, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@warmup",
                    config=EngineConfig(num_blocks=32, block_size=4))
    f = tmp_path / "afile"
    f.write_text("x")
    from gpulab.stitchkv.export import export_small

    with pytest.raises(InputError, match="not a model folder"):
        export_small(tiny_run, f, overwrite=True)


def test_provider_refuses_empty_prompts_and_prompts_past_a_models_context(tiny_run, tmp_path):
    """The provider is called by any engine (the module:function contract), not only behind vajra's own checks:
    an empty prompt, or one longer than the large (prefill) model's context, is a one-line InputError, never a
    raw IndexError or a prefill at positions the large model was never trained on."""
    from gpulab.stitchkv.export import export_small
    from gpulab.stitchkv.models import base_model
    from gpulab.stitchkv.provider import load
    from gpulab.vajra.engine import EngineConfig, load_engine
    from gpulab.vajra.sampling import SamplingParams

    provider = load(str(tiny_run))
    with pytest.raises(InputError, match="^the prompt is empty$"):
        provider([])
    ctx = base_model(provider.large).config.max_position_embeddings
    assert len(provider(list(range(ctx))).kv[0][0]) == ctx  # a prompt that fills the context is fine
    with pytest.raises(InputError, match=rf"^the prompt has {ctx + 1} tokens; the large model's context is {ctx}"):
        provider(list(range(4, 4 + ctx + 1)))
    # a large model with a shorter context than the served small one: vajra checks only the small model's
    out = tmp_path / "small"
    export_small(tiny_run, out)
    eng = load_engine(out, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}",
                      config=EngineConfig(num_blocks=64, block_size=4))
    base_model(eng.prefill.large).config.max_position_embeddings = 8
    with pytest.raises(InputError, match="the prompt has 10 tokens; the large model's context is 8"):
        eng.add_request(list(range(2, 12)), SamplingParams(max_tokens=4))
    assert not eng.has_unfinished() and eng.block_manager.num_used == 0


def _by_hand(run, stage, ids, n_out):
    """Reference written out: the large model's prefill, the (hidden-mode) stitches and the small model's RoPE
    (its own base, positions 0..P-1) applied by hand, then the small model's greedy decode from that cache,
    the first token from the large model's last-position logits. (logits of each output position, tokens)."""
    from gpulab.stitchkv.models import base_model, cache_kwarg, load_model, output_cache
    from gpulab.stitchkv.stitch import build_cache
    from gpulab.stitchkv.store import load_small, run_config

    cfg = run_config(run)
    large = load_model(cfg["large"], "large", "cpu")
    small, bank = load_small(cfg, run, stage, "cpu")
    assert bank.mode == "hidden"
    c = base_model(small).config
    hd, p = c.hidden_size // c.num_attention_heads, len(ids)
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
    assert theta == 500.0  # the small model's base (the large model's is 10000)
    ang = torch.arange(p).float()[:, None] * (1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    with torch.no_grad():
        out = large(input_ids=torch.tensor([ids]), output_hidden_states=True)
        kv = []
        for l, a in enumerate(bank.align):
            y = bank.maps[l](large.model.layers[a].input_layernorm(out.hidden_states[a]))
            attn = base_model(small).model.layers[l].self_attn
            k = attn.k_proj(y).view(1, p, -1, hd).transpose(1, 2)
            v = attn.v_proj(y).view(1, p, -1, hd).transpose(1, 2)
            kv.append((k * cos + torch.cat([-k[..., hd // 2:], k[..., :hd // 2]], -1) * sin, v))
        cache, logits = build_cache(kv), [out.logits[0, -1]]
        toks = [int(logits[0].argmax())]
        for _ in range(n_out - 1):
            o = small(input_ids=torch.tensor([[toks[-1]]]), use_cache=True, **{cache_kwarg(small): cache})
            cache = output_cache(o)
            logits.append(o.logits[0, -1])
            toks.append(int(logits[-1].argmax()))
    return logits, toks


@pytest.mark.parametrize("stage", ["lora", "warmup"])
def test_served_logits_equal_a_reference_written_out_by_hand(tiny_run, tmp_path, stage):
    """Prompts of different lengths in one batch, and one prompt twice (n choices share one prefill): every
    logits row vajra samples from equals the by-hand reference's at that output position."""
    from gpulab.stitchkv.export import export_small
    from gpulab.vajra.engine import EngineConfig, load_engine
    from gpulab.vajra.sampling import SamplingParams

    out = tmp_path / "small"
    export_small(tiny_run, out, stage)
    eng = load_engine(out, device="cpu", attention_backend="torch", prefill=f"stitchkv={tiny_run}@{stage}",
                      config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4))
    seen: dict[int, list] = {}

    class Rec(_Recording):
        def __call__(self, logits, params, ids):
            for row, sid in enumerate(ids):
                seen.setdefault(sid, []).append(logits[row].clone())
            return self.sampler(logits, params, ids)

    eng.sampler = Rec(eng.sampler, [])
    prompts = [eng.encode(t) for t in ("the king and the queen", "my lord speak",
                                       "thou art not the day of love and death blood heart")]
    prompts.append(prompts[0])
    assert len({len(p) for p in prompts}) == 3
    params = SamplingParams(max_tokens=N_OUT, temperature=0.0, ignore_eos=True)
    seqs = [eng.add_request(p, params) for p in prompts]
    while eng.has_unfinished():
        eng.step()
    for seq, ids in zip(seqs, prompts):
        want, toks = _by_hand(tiny_run, stage, ids, N_OUT)
        assert seq.output_token_ids == toks and len(seen[seq.seq_id]) == N_OUT
        for got, w in zip(seen[seq.seq_id], want):
            torch.testing.assert_close(got, w.float(), rtol=1e-4, atol=1e-4 * float(w.abs().max()))
