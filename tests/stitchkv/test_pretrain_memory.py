"""Pretraining's host memory stays flat over the steps (a list of per-step detached losses once grew glibc's
heap by about one logits tensor a step on the CPU: 24 GB and an OOM kill after 2,000 steps)."""
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gpulab.stitchkv.models import tiny_llama  # noqa: E402
from gpulab.stitchkv.pretrain import train_lm  # noqa: E402

STATM = Path("/proc/self/statm")


def rss_mib() -> float:
    import os

    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not STATM.exists(), reason="reads the resident set from /proc")
def test_pretraining_host_memory_does_not_grow_with_the_steps():
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (40_000,))
    model = tiny_llama("tiny-1layer", 1024, 256, seed=1)
    seen: list[tuple[int, float]] = []

    def log(line: str) -> None:  # called at steps 0, 20, 40, 60, 80 and 99
        seen.append((int(line.split("step ")[1].split(":")[0]), rss_mib()))

    hist = train_lm(model, ids, 36_000, 100, 32, 112, 1e-3, 0, "cpu", log, "t")
    assert len(hist) == 100 and all(isinstance(x, float) for x in hist)
    assert hist[-1] < hist[0]  # it trained
    (s0, m0), (s1, m1) = seen[1], seen[-1]
    assert (s0, s1) == (20, 99)
    # one logits tensor (32 x 112 x 1024 fp32) is 14 MiB: the old growth was ~10 MiB a step, ~800 MiB here
    assert m1 - m0 < 250, f"host memory grew {m1 - m0:.0f} MiB over steps {s0}-{s1}"
