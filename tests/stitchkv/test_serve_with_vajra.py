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
