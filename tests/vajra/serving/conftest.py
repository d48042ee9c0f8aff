from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[3] / "experiments" / "assets" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def tokenizer():
    from gpulab.vajra.detokenizer import load_tokenizer

    return load_tokenizer(ASSETS)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random-init Llama (transformers, fp32) saved with the committed tokenizer files."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    for f in ASSETS.iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    cfg = LlamaConfig.from_pretrained(str(ASSETS))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # larger weights than the init: peaked logits, no near-ties in greedy
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(str(d), safe_serialization=True)
    return d
