"""The split-KV Triton decode kernel (``paged_decode_attention``) against the SDPA reference, and the
Triton backend's dispatch to it: under TRITON_INTERPRET=1 in fp32 on the CPU; bf16/fp8 accuracy and
CUDA-graph replay after the context lengths change on a GPU."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from gpulab.vajra import reference as R
from gpulab.vajra.paged_attention import _fp8_math_q

from .helpers import paged_cache

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _decode_case(lens, page, hkv, group, d, dt=torch.float32, extra_cols=2, seed=0, device="cpu"):
    """A paged cache holding ``lens[i]`` tokens of sequence i (its pages scattered), one query token per
    sequence (the last cached one). -> q [B, Hq, D], cache, context_lens, block_tables, k_scale, v_scale."""
    cache, cl, bt, ks, vs, g = paged_cache(lens, page, hkv, d, dt, extra_cols, seed)
    q = torch.randn(len(lens), hkv * group, d, generator=g)
    return q.to(device), cache.to(device), cl.to(device), bt.to(device), ks, vs


def _reference(q, cache, cl, bt, ks, vs):
    d = q.shape[-1]
    return R.paged_attention(q, cache, torch.ones_like(cl), cl, bt, d ** -0.5, ks, vs)


# (group, page, head_dim, BN): GQA 1/2/4, page 1 and 16 (BN below and above the page), head_dim 16 and 64
SHAPES = [(1, 16, 16, 32), (2, 16, 16, 16), (4, 16, 16, 32), (4, 1, 16, 16), (2, 1, 64, 32), (4, 16, 64, 16)]


@pytest.mark.parametrize("group,page,d,bn", SHAPES, ids=[f"g{g}-p{p}-d{d}-bn{b}" for g, p, d, b in SHAPES])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_kernel_matches_sdpa(group, page, d, bn, splits):
    """Lengths 1, exactly two pages, 37 and 100 in one batch: with several splits the short ones leave
    splits empty (m = -inf, l = 0 partials the merge must ignore)."""
    from gpulab.vajra.paged_attention import paged_decode_attention

    lens = [1, 2 * page, 37, 100]
    q, cache, cl, bt, ks, vs = _decode_case(lens, page, hkv=2, group=group, d=d)
    want = _reference(q, cache, cl, bt, ks, vs)
    got = paged_decode_attention(q, cache, bt, cl, d ** -0.5, ks, vs, num_splits=splits, BN=bn, native=False)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 2e-5


@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_fp8_cache(dt, splits):
    """FP8 KV cache (bytes decoded in the kernel, as under the interpreter), k/v scales applied."""
    from gpulab.vajra.paged_attention import paged_decode_attention

    q, cache, cl, bt, ks, vs = _decode_case([1, 16, 45], 16, hkv=2, group=4, d=16, dt=dt)
    want = _reference(q, cache, cl, bt, ks, vs)
    got = paged_decode_attention(q, cache, bt, cl, 16 ** -0.5, ks, vs, num_splits=splits, native=False)
    assert float((got - want).abs().max()) < 2e-5


def test_decode_kernel_same_grid_new_lengths():
    """What a CUDA-graph replay relies on: the same buffers, grid and split count (nothing read on the
    host), new context lengths and queries written in place -> still the reference's output."""
    from gpulab.vajra.paged_attention import paged_decode_attention

    q, cache, cl, bt, ks, vs = _decode_case([70, 70, 70], 8, hkv=2, group=2, d=16, extra_cols=0)
    for lens, seed in (([70, 3, 41], 1), ([1, 64, 17], 2)):
        cl.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)))
        want = _reference(q, cache, cl, bt, ks, vs)
        got = paged_decode_attention(q, cache, bt, cl, 16 ** -0.5, num_splits=4, BN=16, native=False)
        assert float((got - want).abs().max()) < 2e-5


def test_decode_num_splits_heuristic(monkeypatch):
    """GPU policy (SM count faked): about two programs per SM while batch x Hkv is small, a power of two,
    1 once batch x Hkv fills the GPU, capped by the block-table width; a fixed small value on the CPU."""
    from gpulab.vajra import paged_attention as P

    cpu = P.decode_num_splits(1, 8, 8192, 16, torch.device("cpu"))
    assert cpu == P.DECODE_CPU_SPLITS
    assert P.decode_num_splits(1, 8, 1, 16, torch.device("cpu")) == 1  # one page: one split
    monkeypatch.setattr(P, "interpreted", lambda: False)
    monkeypatch.setattr(P, "sm_count", lambda device: 132)
    gpu = torch.device("cuda")
    got = {b: P.decode_num_splits(b, 8, 8192, 16, gpu, BN=64) for b in (1, 2, 4, 8, 16, 32, 33, 256)}
    assert got == {1: 32, 2: 16, 4: 8, 8: 4, 16: 2, 32: 2, 33: 1, 256: 1}
    assert P.decode_num_splits(1, 8, 8, 16, gpu, BN=64) == 2  # 8 pages = two BN tiles
    assert P.decode_num_splits(1, 32, 8192, 16, gpu, BN=64) == 8  # MHA: 32 KV heads


def test_decode_kernel_rejects_bad_input():
    from gpulab.vajra.paged_attention import paged_decode_attention

    q, cache, cl, bt, ks, vs = _decode_case([5, 9], 4, hkv=2, group=2, d=16)
    with pytest.raises(ValueError, match="one new token per sequence"):
        paged_decode_attention(q[:1], cache, bt, cl, 0.25)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q[:, :3], cache, bt, cl, 0.25)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, cache, bt, cl, 0.25, num_splits=0)


@pytest.mark.parametrize("dt", [E4, E5])
def test_fp8_cache_with_16_bit_queries_multiplies_in_fp16(dt):
    """16-bit queries over an FP8 cache: both kernels multiply the stored values in fp16 (the k scale folded
    into the scores', the v scale into the output). Under the interpreter in fp16 (raw bytes), within
    flash-attention's bound: twice the error of the SDPA reference run in fp16 on the same inputs."""
    from gpulab.vajra.paged_attention import _fp8_math_in_fp16, make_metadata, paged_attention, paged_decode_attention

    q, cache, cl, bt, ks, vs = _decode_case([1, 16, 45], 16, hkv=2, group=4, d=16, dt=dt)
    q16 = (q * 3).half()  # a spread of scores: the softmax is not flat
    assert _fp8_math_in_fp16(True, q16) and not _fp8_math_in_fp16(True, q16.float())
    want32 = _reference(q16.float(), cache, cl, bt, ks, vs)
    want_lp = _reference(q16, cache, cl, bt, ks, vs)
    for splits in (1, 3):
        got = paged_decode_attention(q16, cache, bt, cl, 16 ** -0.5, ks, vs, num_splits=splits, native=False)
        assert got.dtype == torch.float16
        _lp_bound(got, want32, want_lp, slack=2e-4)
    g = torch.Generator().manual_seed(5)
    qp = (torch.randn(int(cl.sum()), 8, 16, generator=g) * 3).half()  # prefill: every sequence's whole context
    got = paged_attention(qp, cache, bt, make_metadata(cl, cl), 16 ** -0.5, ks, vs, native=False)
    want32 = R.paged_attention(qp.float(), cache, cl, cl, bt, 16 ** -0.5, ks, vs)
    _lp_bound(got, want32, R.paged_attention(qp, cache, cl, cl, bt, 16 ** -0.5, ks, vs), slack=2e-4)


def test_v_ptx_probe_refuses_a_kernel_that_misplaces_values(monkeypatch):
    """The probe that guards V's inline-PTX conversion (GPU only) compares both kernels with the reference on
    sequences whose first rows see one key each: run here with stand-ins for the kernels (the interpreter's
    path), it passes the true kernels and refuses ones whose output columns are rotated by one (as a
    misplaced byte would leave them); a refused conversion is not used."""
    from gpulab.vajra import paged_attention as P

    real_decode, real_varlen = P.paged_decode_attention, P.paged_attention
    cases = ((None, None), ("decode", "decode kernel (1 split): max error"),
             ("decode-split", "decode kernel (2 splits): max error"), ("varlen", "prefill kernel (BM 16)"))
    for broken, want in cases:
        def fake(real, name):
            def run(*a, **k):
                out = real(*a, **{**k, "native": False})
                split = name == "decode" and k.get("num_splits") == 2  # the partials-and-merge path only
                return out.roll(1, -1) if broken in (name, name + "-split" if split else "-") else out
            return run

        monkeypatch.setattr(P, "_V_PTX_PROBLEMS", {})
        monkeypatch.setattr(P, "native_fp8", lambda t: True)
        monkeypatch.setattr(P, "ptx_usable", lambda device, target: True)  # the recipe's own probe (GPU only)
        monkeypatch.setattr(P, "conversion_problem", lambda device, target: None)
        monkeypatch.setattr(P, "paged_decode_attention", fake(real_decode, "decode"))
        monkeypatch.setattr(P, "paged_attention", fake(real_varlen, "varlen"))
        why = P.fp8_v_ptx_problem("cpu", torch.float16, 4, 2, 16)
        assert (why is None) if want is None else why.startswith(want), why
        q, cache = torch.zeros(1, 4, 16, dtype=torch.float16), torch.zeros(1, 2, 16, 2, 16, dtype=torch.uint8).view(E4)
        assert P._v_ptx(q, cache, True, None) == (want is None)
        assert not P._v_ptx(q, cache.view(torch.uint8).view(E5), True, None)  # e5m2: Triton's cast
        assert not P._v_ptx(q.float(), cache, True, None)  # fp32 queries: fp32 math
    # the kernels' probe first runs the recipe's own (every code; at load, so that a capture finds it done)
    monkeypatch.setattr(P, "_V_PTX_PROBLEMS", {})
    monkeypatch.setattr(P, "conversion_problem", lambda device, target: f"{target} recipe off")
    assert P.fp8_v_ptx_problem("cpu", torch.float16, 4, 2, 16) == "the e4m3 -> fp16 recipe: f16 recipe off"


def _backend_step(ql, cl, page=4, hq=8, hkv=2, d=16, dt=torch.float32, decode_only=True, seed=0):
    """One attention call through TritonAttention (it writes this step's K/V over the last ``ql[i]``
    positions of each sequence, then attends), and the reference on the updated cache."""
    from gpulab.vajra.attention import TritonAttention
    from gpulab.vajra.interface import ForwardBatch, KVCache

    _, cache, clt, bt, ks, vs = _decode_case(cl, page, hkv, hq // hkv, d, dt=dt, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = sum(ql)
    q = torch.randn(t, hq, d, generator=g)
    k, v = torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g)
    pos = torch.cat([torch.arange(c - n, c) for n, c in zip(ql, cl)])
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(ql)])
    slots = bt[seq, pos // page].long() * page + pos % page
    qlt = torch.tensor(ql, dtype=torch.int32)
    batch = ForwardBatch(torch.zeros(t, dtype=torch.long), pos, qlt, clt, slots, bt, is_decode_only=decode_only)
    kv = KVCache([cache], page, cache.shape[0], cache.dtype, k_scale=ks, v_scale=vs)
    be = TritonAttention(hq, hkv, d, scale=d ** -0.5, device=torch.device("cpu"))
    state = be.begin(batch, kv)
    assert be.uses_decode_kernel(q, state) == all(n == 1 for n in ql)
    got = be(q, k, v, cache, batch, kv, state, 0)
    want = R.paged_attention(q, cache, qlt, clt, bt, d ** -0.5, ks, vs)
    return got, want


@pytest.mark.parametrize("dt", [torch.float32, E4])
def test_triton_backend_dispatches_decode_to_the_split_kernel(dt, monkeypatch):
    """A decode-only step goes through paged_decode_attention (max_query_len 1, no host read), a mixed
    step through the varlen kernel; both give the reference's output after writing the step's K/V."""
    import os

    from gpulab.vajra import paged_attention as P

    if os.environ.get("TRITON_INTERPRET", "") != "1":  # its tensors are CPU tensors (the GPU: -m gpu tests)
        pytest.skip("needs the Triton interpreter")
    calls = []
    real_decode, real_varlen = P.paged_decode_attention, P.paged_attention
    monkeypatch.setattr(P, "paged_decode_attention", lambda *a, **k: calls.append("decode") or real_decode(*a, **k))
    monkeypatch.setattr(P, "paged_attention", lambda *a, **k: calls.append("varlen") or real_varlen(*a, **k))
    got, want = _backend_step([1, 1, 1], [1, 8, 30], dt=dt)
    assert calls == ["decode"]
    assert float((got - want).abs().max()) < 2e-5
    calls.clear()
    got, want = _backend_step([3, 1], [3, 21], dt=dt, decode_only=False)
    assert calls == ["varlen"]
    assert float((got - want).abs().max()) < 2e-5


def test_kernel_bench_attention_rows_under_interpreter(out_dir):
    """`serve-kernels --no-gemms --no-decode` under the interpreter: the decode-attention rows (tiny size)
    run and check against the reference."""
    import os

    from typer.testing import CliRunner

    from gpulab.core import results
    from gpulab.vajra.kernel_bench import app

    if os.environ.get("TRITON_INTERPRET", "") != "1":
        pytest.skip("the CPU run of the attention rows needs the Triton interpreter")
    r = CliRunner().invoke(app, ["--size", "small", "--reps", "1", "--no-gemms", "--no-decode",
                                 "--attention", "triton"])
    assert r.exit_code == 0, r.output
    rec = results.load(sorted(out_dir.glob("vajra-kernels-*.yaml"))[-1])
    impls = {row["impl"] for row in rec["rows"] if row["gemm"] == "attn decode"}
    assert impls == {"triton-decode", "triton-varlen", "triton-decode fp8"}
    assert rec["ok"]
    for key, us in rec["metrics"]["attn_decode_us"].items():  # the FP8 cache's speed-up, one per configuration
        assert rec["summary"][f"attn_{key}_fp8_kv_speedup"] == round(us["triton-decode"] / us["triton-decode fp8"], 3)


# ---------------------------------------------------------------------------------------- GPU only


def _lp_bound(got, want32, want_lp, slack=1e-3):
    """flash-attention's test criterion: the kernel's error against the fp32 reference is at most twice
    the error of the same reference run in low precision (plus a small absolute slack)."""
    err = float((got.float() - want32).abs().max())
    lp = float((want_lp.float() - want32).abs().max())
    assert err <= 2 * lp + slack, (err, lp)


@pytest.mark.gpu
@pytest.mark.parametrize("kv,group", [("bf16", 4), ("bf16", 1), ("fp8", 4)])
def test_gpu_decode_kernel_bf16(kv, group):
    from gpulab.vajra.paged_attention import paged_decode_attention

    dt = E4 if kv == "fp8" else torch.float32
    lens = [1, 16, 333, 2048, 4000]
    q, cache, cl, bt, ks, vs = _decode_case(lens, 16, hkv=8 // group, group=group, d=128,
                                            dt=dt, device="cuda")
    if kv == "bf16":
        cache = cache.to(torch.bfloat16)
    qb = q.to(torch.bfloat16)
    want32 = _reference(qb.float(), cache, cl, bt, ks, vs)
    want_lp = _reference(qb, cache, cl, bt, ks, vs)  # SDPA in bf16 on the same inputs
    for splits in (None, 1, 7):
        got = paged_decode_attention(qb, cache, bt, cl, 128 ** -0.5, ks, vs, num_splits=splits)
        assert got.dtype == torch.bfloat16
        _lp_bound(got, want32, want_lp)


@pytest.mark.gpu
def test_gpu_decode_kernel_cuda_graph_replay_new_lengths():
    """Capture one decode call (Llama-3.1-8B heads, a block table as wide as a long max_model_len) in a
    CUDA graph, then change context lengths and queries in place and replay: the reference's output."""
    from gpulab.vajra.paged_attention import paged_decode_attention

    lens = [3000, 3000, 3000, 3000]
    q, cache, cl, bt, ks, vs = _decode_case(lens, 16, hkv=8, group=4, d=128, extra_cols=300, device="cuda")
    cache = cache.to(torch.bfloat16)
    q = q.to(torch.bfloat16)
    fn = lambda: paged_decode_attention(q, cache, bt, cl, 128 ** -0.5)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    gen = torch.Generator(device="cuda").manual_seed(3)
    for new in ([3000, 1, 17, 2048], [1, 1, 1, 1], [16, 32, 1500, 2999]):
        cl.copy_(torch.tensor(new, dtype=torch.int32, device="cuda"))
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen).to(torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        want32 = _reference(q.float(), cache, cl, bt, ks, vs)
        _lp_bound(out, want32, _reference(q, cache, cl, bt, ks, vs))


@pytest.mark.gpu
def test_gpu_fp8_v_ptx_conversion_passes_its_probe_and_matches_tritons_cast():
    """On a GPU with native e4m3 (sm_89+): the inline-PTX conversion of V passes the probe at Llama-3.1-8B's head
    layout, and both kernels give the same outputs with it as with Triton's own cast (both exact conversions),
    each within flash-attention's bound of the fp32 reference."""
    from gpulab.vajra import paged_attention as P
    from gpulab.vajra.fp8_kernels import native_fp8_for

    if not native_fp8_for(torch.cuda.get_device_capability(), E4):
        pytest.skip("no native e4m3 on this GPU (the raw-byte path serves)")
    assert P.fp8_v_ptx_problem("cuda", torch.bfloat16, 32, 8, 128) is None
    lens = [1, 16, 333, 2048]
    q, cache, cl, bt, ks, vs = _decode_case(lens, 16, hkv=8, group=4, d=128, dt=E4, device="cuda")
    qb = (q * 2).to(torch.bfloat16)
    want32 = _reference(qb.float(), cache, cl, bt, ks, vs)
    outs = [P.paged_decode_attention(qb, cache, bt, cl, 128 ** -0.5, ks, vs, v_ptx=flag) for flag in (True, False)]
    assert float((outs[0].float() - outs[1].float()).abs().max()) <= 1e-2 * float(want32.abs().max())
    for got in outs:
        _lp_bound(got, want32, _reference(qb, cache, cl, bt, ks, vs))
    qp = (torch.randn(sum(lens), 32, 128, device="cuda") * 2).to(torch.bfloat16)
    meta = P.make_metadata(cl, cl)
    want32 = R.paged_attention(qp.float(), cache, cl, cl, bt, 128 ** -0.5, ks, vs)
    want_lp = R.paged_attention(qp, cache, cl, cl, bt, 128 ** -0.5, ks, vs)
    for bm in (16, 64):
        outs = [P.paged_attention(qp, cache, bt, meta, 128 ** -0.5, ks, vs, BM=bm, v_ptx=flag) for flag in (True, False)]
        assert float((outs[0].float() - outs[1].float()).abs().max()) <= 1e-2 * float(want32.abs().max())
        for got in outs:
            _lp_bound(got, want32, want_lp)


@triton.jit
def _fp8_math_q_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, _fp8_math_q(tl.load(x_ptr + offs), True))


def test_fp8_math_query_keeps_nan_and_infinities_and_clamps_beyond_fp16():
    """A bf16 query enters an FP8 tile's fp16 math exactly within fp16's range, clamped to +-65504 beyond it;
    NaN and infinities stay (the output is then NaN, as the reference's), never a finite stand-in."""
    vals = [3.0, -0.15625, 1e5, -3e38, float("nan"), float("inf"), float("-inf"), 65504.0]
    x = torch.tensor(vals, dtype=torch.float32).to(torch.bfloat16)
    y = torch.empty(8, dtype=torch.float16)
    try:
        _fp8_math_q_kernel[(1,)](x, y, N=8)
    except Exception as e:  # noqa: BLE001 - older interpreters have no bf16
        pytest.skip(f"this Triton's interpreter runs no bf16 kernel ({type(e).__name__}: {str(e)[:100]})")
    got = y.float().tolist()
    assert got[:4] == [3.0, -0.15625, 65504.0, -65504.0] and got[7] == 65504.0
    assert got[4] != got[4] and got[5] == float("inf") and got[6] == float("-inf")
