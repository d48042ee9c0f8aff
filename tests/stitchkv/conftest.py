"""Tiny random-init pairs with a tokenizer trained in code (no downloads, no data files)."""
from __future__ import annotations

import random

import pytest

WORDS = ("king queen lord lady sword crown night day love death blood heart speak hear "
         "come go stay fly the a of to and my thy thou art is was be not").split()


def synthetic_text(n_lines: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + ".")
    return "\n".join(lines) + "\n"


LARGE = dict(hidden=48, layers=3, heads=4, kv_heads=2, intermediate=96)
SMALL = dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(synthetic_text())
    return p


@pytest.fixture(scope="session")
def tokenizer(corpus_file):
    from gpulab.stitchkv.models import train_tokenizer

    return train_tokenizer(corpus_file.read_text(), vocab_size=300)


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory, tokenizer):
    """large/ and small/ model folders: different widths, layers, KV heads, head_dim and rope_theta."""
    from gpulab.stitchkv.models import save_model, tiny_llama

    root = tmp_path_factory.mktemp("pair")
    large = tiny_llama(LARGE, len(tokenizer), 256, seed=1, rope_theta=10000.0)
    small = tiny_llama(SMALL, len(tokenizer), 256, seed=2, rope_theta=500.0)
    save_model(large, tokenizer, root / "large")
    save_model(small, tokenizer, root / "small")
    return root / "large", root / "small"


@pytest.fixture(scope="session")
def tiny_run(pair_dirs, corpus_file, tmp_path_factory):
    """A run folder with both stages trained (1 step each); tests that change it work on a copy."""
    from gpulab.stitchkv import train as T
    from tests.stitchkv.test_train import cfg_for

    run = tmp_path_factory.mktemp("kvrun") / "run"
    T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=1, lora_steps=1), "cpu", log=lambda m: None)
    return run


@pytest.fixture
def models(tokenizer):
    import torch

    from gpulab.stitchkv.models import tiny_llama

    torch.manual_seed(0)
    large = tiny_llama(LARGE, len(tokenizer), 256, seed=1, rope_theta=10000.0).eval()
    small = tiny_llama(SMALL, len(tokenizer), 256, seed=2, rope_theta=500.0).eval()
    return large, small


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one intra-op thread is ~100x faster than two on a shared, loaded 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
