"""Several processes on the CPU (gloo over loopback): DDP training equals one process on the same global
batch, resumes a checkpoint, and the disaggregated prefill -> decode run decodes the same tokens as one
process. Every launch has a timeout, and the process group times out too (KVSTITCH_DIST_TIMEOUT_S)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpulab.core.errors import InputError
from gpulab.stitchkv import distributed as Dist
from gpulab.stitchkv import store as S
from gpulab.stitchkv import train as T
from tests.stitchkv.test_cli import one_line_error, run_cli
from tests.stitchkv.test_train import cfg_for

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 120


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free rendezvous port) of ``gpulab --device cpu <args>``, killed on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "gpulab", "--device", "cpu", *args]
    env = {**os.environ, "KVSTITCH_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close_files(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{a.name}:{k}: {m}")


TRAIN_ARGS = ["--stage", "all", "--steps", "4", "--lora-steps", "3", "--batch", "4", "--prompt-len", "16",
              "--cont-len", "8", "--ckpt-every", "0", "--init", "ls", "--ls-batches", "2", "--lr", "3e-3",
              "--lora-lr", "3e-3", "--lora-r", "4", "--lora-alpha", "8"]


def test_ddp_train_equals_single_process(pair_dirs, corpus_file, tmp_path, capsys):
    large, small = pair_dirs
    common = ["kvstitch", "train", "--large", str(large), "--small", str(small), "--data", str(corpus_file), *TRAIN_ARGS]
    code, _, err = run_cli(["--device", "cpu", "--out", str(tmp_path / "res1"), *common,
                            "--run-dir", str(tmp_path / "run1")], capsys)
    assert code == 0, err
    p = torchrun(["--out", str(tmp_path / "res2"), *common, "--run-dir", str(tmp_path / "run2")])
    assert p.returncode == 0, p.stdout[-3000:]

    recs = sorted((tmp_path / "res2").glob("*.yaml"))
    assert [r.name.startswith("kvstitch-train-") for r in recs] == [True], recs  # rank 0 alone writes
    one = yaml.safe_load(next((tmp_path / "res1").glob("kvstitch-train-*.yaml")).read_text())
    two = yaml.safe_load(recs[0].read_text())
    assert two["ok"] and two["metrics"]["distributed"]["world_size"] == 2
    assert two["metrics"]["distributed"]["per_rank_batch"] == 2 and one["metrics"]["distributed"]["world_size"] == 1
    for st in ("warmup", "lora"):
        h1, h2 = one["metrics"][st]["loss_history"], two["metrics"][st]["loss_history"]
        assert len(h2) == len(h1) > 0
        assert h2 == pytest.approx(h1, rel=1e-4, abs=1e-7), st
    r1, r2 = tmp_path / "run1", tmp_path / "run2"
    _assert_close_files(r1 / "warmup" / "stitch.safetensors", r2 / "warmup" / "stitch.safetensors")
    _assert_close_files(r1 / "lora" / "stitch.safetensors", r2 / "lora" / "stitch.safetensors")
    _assert_close_files(r1 / "lora" / "adapter" / "adapter_model.safetensors",
                        r2 / "lora" / "adapter" / "adapter_model.safetensors")
    assert not (r2 / "checkpoint.pt").exists()
    # and the training moved the stitches at all (a comparison of two untrained banks would prove nothing)
    w0 = _tensors(r2 / "warmup" / "stitch.safetensors")
    w1 = _tensors(r2 / "lora" / "stitch.safetensors")
    assert any(float((w0[k] - w1[k]).abs().max()) > 1e-6 for k in w0)


def test_ddp_resumes_a_checkpoint(pair_dirs, corpus_file, tmp_path, monkeypatch):
    """A warm-up cut after its step-4 checkpoint is finished by 2 ranks; the result equals one uninterrupted process."""
    full = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "full", steps=6), "cpu", log=lambda m: None)
    cfg = cfg_for(pair_dirs, corpus_file, tmp_path / "cut", steps=6, ckpt_every=2)
    real, calls = T.warmup_step_loss, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "warmup_step_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, "cpu", log=lambda m: None)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    large, small = pair_dirs
    p = torchrun(["--out", str(tmp_path / "res"), "kvstitch", "train", "--large", str(large), "--small", str(small),
                  "--data", str(corpus_file), "--run-dir", str(tmp_path / "cut"), "--stage", "warmup", "--steps", "6",
                  "--batch", "4", "--prompt-len", "16", "--cont-len", "8", "--ckpt-every", "2", "--init", "random",
                  "--lr", "3e-3", "--ls-batches", "2"])
    assert p.returncode == 0, p.stdout[-3000:]
    assert "warmup: resuming at step 4" in p.stdout
    rec = yaml.safe_load(next((tmp_path / "res").glob("kvstitch-train-*.yaml")).read_text())
    assert rec["metrics"]["warmup"]["loss_history"] == pytest.approx(full["warmup"]["loss_history"], rel=1e-4)
    _assert_close_files(tmp_path / "full" / "warmup" / "stitch.safetensors",
                        tmp_path / "cut" / "warmup" / "stitch.safetensors")
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_disaggregated_decode_equals_single_process(pair_dirs, corpus_file, tmp_path, capsys):
    """Self-launched 2 ranks (gloo): rank 0 prefills + stitches, rank 1 decodes; tokens equal one process."""
    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.evaluate import _batches
    from gpulab.stitchkv.generate import greedy_stitched
    from gpulab.stitchkv.models import load_pair

    run = tmp_path / "run"
    T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=3, lora_steps=3), "cpu", log=lambda m: None)
    res = tmp_path / "res"
    code, _, err = run_cli(["--device", "cpu", "--out", str(res), "kvstitch", "serve-disagg", "--run", str(run),
                            "--prompts", "5", "--gen-len", "6", "--batch", "2", "--prompt-len", "12",
                            "--timeout", "90"], capsys)
    assert code == 0, err
    files = sorted(res.glob("*.yaml"))
    assert len(files) == 1 and files[0].name.startswith("kvstitch-disagg-")
    from gpulab.core import results

    assert files[0] in results.written  # the child's record is reported to `gpulab run`
    rec = yaml.safe_load(files[0].read_text())
    assert rec["ok"], rec["checks"]
    assert rec["checks"]["disagg_tokens_equal_single_process"]["passed"]
    assert rec["config"]["stage"] == "lora" and rec["config"]["backend"] == "gloo"
    row = rec["rows"][0]
    assert row["variant"] == "disagg-lora" and row["ttft_ms"] > 0 and row["tpot_ms"] > 0 and row["handover_ms"] > 0
    # the hand-over is the small model's cache: 2 (K, V) x layers x kv heads x head_dim x prompt x 4 B + the first token
    assert row["handover_bytes_per_seq"] == 2 * 2 * 1 * 16 * 12 * 4 + 8
    # independent reference, in this process: the single-process stitched decode of the same prompts
    pair = load_pair(*pair_dirs)
    small_l, bank_l = S.load_stage2(pair.small, run / "lora")
    windows = D.eval_windows(D.load_corpus(corpus_file, pair.tokenizer), 5, 12, 6)
    want = {}
    with torch.no_grad():
        for prompt, _, sel in _batches(windows, 2):
            g = greedy_stitched(pair.large, small_l, bank_l, prompt, 6)
            for r, i in enumerate(sel):
                want[i] = g.tokens[r].tolist()
    assert rec["metrics"]["tokens"] == [want[i] for i in sorted(want)]


def test_serve_disagg_bad_input(pair_dirs, corpus_file, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["kvstitch", "serve-disagg", "--run", str(tmp_path / "none")], capsys)
    one_line_error(code, err, "no run.yaml")
    run = tmp_path / "run"
    T.train(cfg_for(pair_dirs, corpus_file, run, steps=1), "cpu", log=lambda m: None)  # warm-up only
    code, _, err = run_cli(["kvstitch", "serve-disagg", "--run", str(run), "--stage", "lora"], capsys)
    one_line_error(code, err, "no stage-2 (lora) result")
    code, _, err = run_cli(["kvstitch", "serve-disagg", "--run", str(run), "--stage", "best"], capsys)
    one_line_error(code, err, "--stage must be one of")
    code, _, err = run_cli(["kvstitch", "serve-disagg", "--run", str(run), "--gen-len", "1"], capsys)
    one_line_error(code, err, "--gen-len >= 2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, _, err = run_cli(["kvstitch", "serve-disagg", "--run", str(run)], capsys)
    one_line_error(code, err, "needs 2 ranks", "WORLD_SIZE=3")


def test_ddp_batch_must_split_evenly(pair_dirs, corpus_file, tmp_path):
    with pytest.raises(InputError, match="not divisible by the 2 ranks"):
        T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "run", batch=3), "cpu", log=lambda m: None,
                dist_ctx=Dist.Ctx(rank=0, world=2))


def _echo(rank: int, port: int, q) -> None:  # a spawned process: gloo point-to-point of the hand-over helpers
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    ctx = Dist.Ctx(rank=rank, world=2, backend="gloo", device="cpu")
    g = torch.Generator().manual_seed(0)
    sent = [torch.randn(2, 3, 5, generator=g).to(torch.bfloat16), torch.arange(7), torch.randn(4, generator=g),
            torch.zeros(0, 3, dtype=torch.float16)]
    try:
        if rank == 0:
            nbytes = Dist.send_tensors(sent, 1, ctx)
            back = Dist.recv_tensors(1, ctx)
            ok = nbytes == 30 * 2 + 7 * 8 + 4 * 4 and len(back) == len(sent) and all(
                b.dtype == s.dtype and b.shape == s.shape and torch.equal(b, s) for b, s in zip(back, sent))
            q.put(ok)
        else:
            Dist.send_tensors(Dist.recv_tensors(0, ctx), 0, ctx)
    finally:
        dist.destroy_process_group()


def test_handover_helpers_roundtrip_bit_exact():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = Dist.free_port()
    procs = [ctx.Process(target=_echo, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        ok = q.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert ok is True
    assert all(p.exitcode == 0 for p in procs)


def test_rank_shards_partition_the_global_batch(pair_dirs, corpus_file, tmp_path):
    import json

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import load_pair

    tok = load_pair(*pair_dirs).tokenizer
    cfg = {"batch": 4, "prompt_len": 8, "cont_len": 4}
    corpus = D.load_corpus(corpus_file, tok)
    for skip in (0, 3):
        glob = T.rank_batches(corpus, cfg, 5, skip)
        ranks = [T.rank_batches(corpus, cfg, 5, skip, r, 2) for r in range(2)]
        for _ in range(3):
            gp, gc = next(glob)
            (p0, c0), (p1, c1) = next(ranks[0]), next(ranks[1])
            assert p0.shape == (2, 8) and not torch.equal(p0, p1)
            assert torch.equal(torch.cat([p0, p1]), gp) and torch.equal(torch.cat([c0, c1]), gc)
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": f"the king {i}", "reference": f"love {i}"}) for i in range(20)) + "\n")
    corpus = D.load_corpus(j, tok)
    single = T.rank_batches(corpus, cfg, 1, 2)
    ranks = [T.rank_batches(corpus, cfg, 1, 1, r, 2) for r in range(2)]  # step 1 of 2 ranks = records 2, 3
    for _ in range(3):
        a, b = next(single), next(single)
        assert torch.equal(next(ranks[0])[0], a[0]) and torch.equal(next(ranks[1])[0], b[0])


def test_disagg_handover_bytes_of_jsonl_prompts_of_different_lengths(pair_dirs, tmp_path, capsys):
    """.jsonl prompts are shorter than --prompt-len and differ: the expected hand-over is their own lengths."""
    import json

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import load_tokenizer

    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": " ".join(["the king"] * (1 + i % 4)), "reference": f"speak {i} of love"})
                           for i in range(50)) + "\n")
    run = tmp_path / "run"
    res = T.train(cfg_for(pair_dirs, j, run, steps=1), "cpu", log=lambda m: None)  # warm-up only
    assert any("--batch 4 is not used for training on .jsonl data" in n for n in res["notes"])
    windows = D.eval_windows(D.load_corpus(j, load_tokenizer(pair_dirs[0], "large")), 5, 32, 3)
    lens = [len(p) for p, _ in windows]
    assert len(windows) == 5 and len(set(lens)) > 1 and max(lens) < 32
    out = tmp_path / "res"
    code, _, err = run_cli(["--device", "cpu", "--out", str(out), "kvstitch", "serve-disagg", "--run", str(run),
                            "--stage", "warmup", "--prompts", "5", "--gen-len", "3", "--batch", "2", "--prompt-len",
                            "32", "--no-check", "--timeout", "90"], capsys)
    assert code == 0, err
    rec = yaml.safe_load(next(out.glob("kvstitch-disagg-*.yaml")).read_text())
    assert rec["checks"]["handover_bytes_equal_stitched_cache"]["passed"], rec["checks"]
    # (K, V) x 2 layers x 1 KV head x head_dim 16 x each prompt's tokens x 4 B, + one int64 first token per prompt
    assert rec["metrics"]["handover_bytes_total"] == 2 * 2 * 1 * 16 * sum(lens) * 4 + 5 * 8


def test_close_waits_for_every_rank_before_leaving_the_group(monkeypatch):
    """A finished command's ranks leave the group together (barrier, then destroy: a rank tearing its gloo
    connections down while rank 0 still writes the record could abort); an error path leaves without the barrier,
    and a second close does nothing."""
    import torch.distributed as dist

    from gpulab.stitchkv.distributed import Ctx

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.append("destroy"))
    ctx = Ctx(rank=1, world=2, backend="gloo", owns_group=True)
    ctx.close(sync=True)
    ctx.close()
    assert seen == ["barrier", "destroy"]
    seen.clear()
    Ctx(rank=0, world=2, backend="gloo", owns_group=True).close()
    assert seen == ["destroy"]
    seen.clear()
    Ctx(rank=0, world=1, owns_group=False).close(sync=True)
    assert seen == []
