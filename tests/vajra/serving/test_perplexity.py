"""gpulab perplexity: vajra's teacher-forced scores equal transformers' on the same weights; an FP8 checkpoint is
set against its source (NLL difference, interval, top-1 agreement); bad input is a one-line error."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from gpulab.cli import invoke
from gpulab.core.errors import InputError
from gpulab.vajra import perplexity as P

from ..model.helpers import quantize_cli

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. ") * 6


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def _hf_window_scores(model_dir, windows):
    """(NLL sum, argmax predictions) per window from transformers in float32: the reference."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    sums, preds = [], []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            lp = torch.log_softmax(hf(ids).logits[0, :-1].double(), dim=-1)
            sums.append(float(-lp.gather(1, ids[0, 1:, None]).sum()))
            preds.append(lp.argmax(-1))
    return sums, torch.cat(preds)


def test_make_windows():
    ids = list(range(10))
    assert P.make_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert P.make_windows(ids, 4, max_tokens=9) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    assert P.make_windows([7], 4) == []
    with pytest.raises(InputError, match="--context"):
        P.make_windows(ids, 1)
    with pytest.raises(InputError, match="--max-tokens"):
        P.make_windows(ids, 4, max_tokens=-1)
    # with BOS: every text token is scored (a 1-token tail too, after BOS)
    assert P.make_windows(ids, 4, bos=99) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8], [99, 9]]
    assert P.make_windows([7], 4, bos=99) == [[99, 7]] and P.make_windows([], 4, bos=99) == []
    assert P.make_windows(ids, 2, bos=99) == [[99, t] for t in ids]


def test_interval_is_of_the_token_weighted_difference():
    """20 full windows that differ by 0.004 nats a token and a 1-token tail that differs by 2: the reported
    difference is token-weighted (~0.0042), and so is its interval (a mean of window means would be ~0.099,
    dragged by the tail); one window has no interval."""
    import numpy as np

    rng = np.random.default_rng(0)
    counts = [511] * 20 + [1]
    first = [float(c * 3.0 + rng.normal(0, 0.5)) for c in counts]
    this = [f + c * 0.004 + rng.normal(0, 0.3) for f, c in zip(first, counts)]
    this[-1] = first[-1] + 2.0
    d = (sum(this) - sum(first)) / sum(counts)
    ci = P.nll_difference_ci(first, this, counts, reps=500)
    assert ci["lo"] <= d <= ci["hi"] and ci["hi"] < 0.02
    assert P.nll_difference_ci(first[:1], this[:1], counts[:1]) == {"lo": None, "hi": None}


@pytest.mark.parametrize("batch,bos", [(1, False), (3, False), (3, True)])
def test_scores_match_transformers(tiny_llama, tokenizer, batch, bos):
    """Ragged windows (a short tail), groups that do not divide the windows, with and without BOS: every window's
    NLL equals transformers' within float32 rounding, and the predicted next tokens are the same."""
    from gpulab.vajra.load import load_model

    ids = P._encode(tokenizer, TEXT)
    windows = P.make_windows(ids, 48, max_tokens=200, bos=tokenizer.hf.bos_token_id if bos else None)
    if bos:
        assert len(windows) == 5 and windows[-1][1:] == ids[4 * 47:200]
    else:
        assert len(windows) == 5 and len(windows[-1]) == 200 - 4 * 48
    model = load_model(tiny_llama, device="cpu", attention_backend="torch")
    sums, counts, preds = P.score_windows(model, windows, batch)
    want, want_preds = _hf_window_scores(tiny_llama, windows)
    assert counts == [len(w) - 1 for w in windows]
    assert sums == pytest.approx(want, rel=1e-4)
    assert torch.equal(preds, want_preds)


def test_fp8_against_its_source(tiny_llama, text_file, out_dir, tmp_path):
    """The bf16 source first, its FP8 checkpoint second, the source again third: the record carries each
    model's perplexity, the FP8 one's NLL difference with an interval around it and its top-1 agreement;
    the same weights again differ by exactly nothing."""
    q = tmp_path / "fp8"
    quantize_cli(tiny_llama, q, tmp_path / "qres", "--scheme", "fp8-channel")
    invoke(["--device", "cpu", "--out", str(out_dir), "perplexity", str(tiny_llama), str(q), str(tiny_llama),
            "--text", str(text_file), "--context", "40", "--batch", "2", "--bootstrap-reps", "300"])
    rec = yaml.safe_load(next(out_dir.glob("perplexity-*.yaml")).read_text())
    assert rec["ok"] is True and rec["config"]["device"] == "cpu"
    src, fp8, again = (rec["metrics"][k] for k in (tiny_llama.name, "fp8", f"{tiny_llama.name}-2"))
    assert src["quant"] == "none" and fp8["quant"] == "fp8 channel/dynamic"
    tok = _tok(tiny_llama)
    windows = P.make_windows(P._encode(tok, TEXT), 40, bos=tok.hf.bos_token_id)  # the default: its BOS
    assert rec["config"]["windows"] == len(windows) > 1 and rec["config"]["bos"] == tok.hf.bos_token_id is not None
    assert src["tokens"] == fp8["tokens"] == sum(len(w) - 1 for w in windows)
    assert src["ppl"] == pytest.approx(math.exp(src["nll"]))
    assert fp8["nll_vs_first"] == pytest.approx(fp8["nll"] - src["nll"])
    assert fp8["nll_vs_first"] != 0 and abs(fp8["nll_vs_first"]) < 0.5  # FP8 changes the scores, a little
    lo, hi = fp8["nll_vs_first_ci95"]
    assert lo <= fp8["nll_vs_first"] <= hi
    assert 0.5 < fp8["top1_agreement"] <= 1.0
    assert again["nll_vs_first"] == 0.0 and again["top1_agreement"] == 1.0 and again["nll_vs_first_ci95"] == [0.0, 0.0]
    assert rec["summary"][f"ppl_{tiny_llama.name}"] == pytest.approx(src["ppl"], rel=1e-4)
    assert rec["summary"]["nll_vs_first_fp8"] == pytest.approx(fp8["nll_vs_first"], abs=1e-5)
    # the CPU measures the FP8 weights alone: the record says so
    assert any(n.startswith("fp8: on the CPU FP8 weights are dequantized") for n in rec["notes"])


def _tok(model_dir):
    from gpulab.vajra.detokenizer import load_tokenizer

    return load_tokenizer(model_dir)


def _swap_two_tokens(folder):
    """The same tokenizer with two vocabulary ids swapped: other ids for the same text."""
    f = folder / "tokenizer.json"
    tj = json.loads(f.read_text())
    vocab = tj["model"]["vocab"]
    a, b = "e", "t"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    f.write_text(json.dumps(tj))


def test_bad_input(tiny_llama, text_file, tmp_path):
    run = lambda models, **kw: P.run(models, kw.pop("text", text_file), kw.pop("context", 32), 0,  # noqa: E731
                                     kw.pop("batch", 2), "auto", "auto", bos=kw.pop("bos", None))
    with pytest.raises(InputError, match="file not found"):
        run([tiny_llama], text=tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("a")  # one token: scored after BOS, nothing to score without
    with pytest.raises(InputError, match="too few to score"):
        run([tiny_llama], text=short, bos=False)
    assert run([tiny_llama], text=short).metrics[tiny_llama.name]["tokens"] == 1
    with pytest.raises(InputError, match="max_position_embeddings"):
        run([tiny_llama], context=100000)
    with pytest.raises(InputError, match="--batch"):
        run([tiny_llama], batch=0)
    with pytest.raises(InputError, match="folder not found"):
        run([tmp_path / "nope"])
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    _swap_two_tokens(other)
    with pytest.raises(InputError, match="other token ids"):
        run([tiny_llama, other])
    notok = tmp_path / "notok"
    shutil.copytree(tiny_llama, notok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / f).unlink()
    with pytest.raises(InputError, match="no tokenizer"):
        run([notok])
    for name, bos in (("nobos", None), ("eosbos", "<|eos|>")):
        d = tmp_path / name
        shutil.copytree(tiny_llama, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["bos_token"] = bos
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="has no BOS token"):
        run([tmp_path / "nobos"], bos=True)
    assert run([tmp_path / "nobos"]).config["bos"] is None  # the default: BOS where there is one
    with pytest.raises(InputError, match="different BOS tokens"):
        run([tiny_llama, tmp_path / "eosbos"])
    # --no-bos uses no BOS: tokenizers that differ only in theirs score the same ids
    rec = run([tiny_llama, tmp_path / "nobos"], bos=False)
    assert rec.metrics[tiny_llama.name]["tokens"] == rec.metrics["nobos"]["tokens"] > 0
    small = tmp_path / "smallvocab"  # the tokenizer's ids reach past the model's vocabulary
    shutil.copytree(tiny_llama, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 8
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"outside the model's vocabulary \[0, 8\)"):
        run([small])


@pytest.mark.gpu
def test_gpu_scores_match_cpu_fp32(tiny_llama, tokenizer):
    """On the GPU (bf16 activations, the engine's prefill kernels) the windows' NLL stays within bf16 rounding
    of the CPU float32 scores, and the predicted next tokens mostly agree."""
    from gpulab.vajra.load import load_model

    windows = P.make_windows(P._encode(tokenizer, TEXT), 64, max_tokens=400)
    cpu_sums, _, cpu_preds = P.score_windows(load_model(tiny_llama, device="cpu", attention_backend="torch"),
                                             windows, 4)
    model = load_model(tiny_llama, device="cuda", attention_backend="triton")
    assert model.dtype in (torch.bfloat16, torch.float16)
    sums, counts, preds = P.score_windows(model, windows, 4)
    assert counts == [len(w) - 1 for w in windows]
    assert sum(sums) == pytest.approx(sum(cpu_sums), rel=2e-2)
    assert float((preds == cpu_preds).double().mean()) > 0.9
