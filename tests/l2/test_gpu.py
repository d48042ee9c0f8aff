"""GPU-only paths (run on the device machine with `pytest -m gpu tests/l2`)."""
import pytest
import torch
import yaml

from gpulab.core.errors import InputError
from gpulab.l2 import cuda_l2

pytestmark = pytest.mark.gpu
MIB = 1 << 20


def test_persisting_limit_set_and_restored():
    lim = cuda_l2.device_limits()
    assert lim["l2_bytes"] > 0
    if lim["persisting_l2_max_bytes"] <= 0:
        pytest.skip("this GPU has no persisting L2")
    old = cuda_l2.get_persisting_limit()
    want = min(lim["persisting_l2_max_bytes"], 4 * MIB)
    cuda_l2.set_persisting_limit(want)
    try:
        # the driver rounds up to its set-aside granularity: on an H200 (2026-11-27) 4 MiB asked, 7.5 MiB granted
        assert want <= cuda_l2.get_persisting_limit() <= lim["persisting_l2_max_bytes"]
    finally:
        cuda_l2.set_persisting_limit(old)
    assert cuda_l2.get_persisting_limit() == old
    cuda_l2.reset_persisting_lines()


def test_access_policy_window_on_torch_stream():
    lim = cuda_l2.device_limits()
    if lim["persisting_l2_max_bytes"] <= 0:
        pytest.skip("this GPU has no persisting L2")
    buf = torch.zeros(8 * MIB, dtype=torch.uint8, device="cuda")  # zeros: buf[0] is checked below
    s = torch.cuda.Stream()
    old = cuda_l2.get_persisting_limit()
    with cuda_l2.PersistingL2(min(lim["persisting_l2_max_bytes"], 4 * MIB), buf.data_ptr(), 8 * MIB, 0.5,
                              [s.cuda_stream]) as ctx:
        w = cuda_l2.get_access_policy_window(s.cuda_stream)
        assert (w["base_ptr"], w["num_bytes"]) == (buf.data_ptr(), 8 * MIB)
        # hitRatio: the one asked for, lowered to what the driver granted over the window
        assert ctx.granted_bytes == cuda_l2.get_persisting_limit() > 0
        assert ctx.installed_hit_ratio == pytest.approx(min(0.5, ctx.granted_bytes / (8 * MIB)))
        assert w["hit_ratio"] == pytest.approx(ctx.installed_hit_ratio, abs=1e-6) and "Persisting" in w["hit_prop"]
        with torch.cuda.stream(s):
            buf.add_(1)  # kernels run under the window
        torch.cuda.synchronize()
    assert cuda_l2.get_access_policy_window(s.cuda_stream)["num_bytes"] == 0
    assert cuda_l2.get_persisting_limit() == old
    assert int(buf[0]) == 1


def test_captured_kernel_nodes_carry_the_stream_window():
    """bench's persist policy under --graph relies on stream capture copying the stream's access-policy
    window into the captured kernel nodes (PersistingL2 is installed before the capture)."""
    lim = cuda_l2.device_limits()
    if lim["persisting_l2_max_bytes"] <= 0:
        pytest.skip("this GPU has no persisting L2")
    try:
        g = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        g = None
    if g is None or not hasattr(g, "raw_cuda_graph"):
        pytest.skip("this torch has no CUDAGraph(keep_graph=True) / raw_cuda_graph()")
    rt = cuda_l2._rt()
    chk = cuda_l2._check
    buf = torch.zeros(8 * MIB, dtype=torch.uint8, device="cuda")
    s = torch.cuda.Stream()
    with cuda_l2.PersistingL2(min(lim["persisting_l2_max_bytes"], 4 * MIB), buf.data_ptr(), 8 * MIB, 1.0,
                              [s.cuda_stream]):
        with torch.cuda.stream(s):
            buf.add_(1)  # warm up outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            buf.add_(1)
        graph = rt.cudaGraph_t(int(g.raw_cuda_graph()))
        n = chk(rt.cudaGraphGetNodes(graph, 0), "cudaGraphGetNodes(count)")[1]
        nodes = chk(rt.cudaGraphGetNodes(graph, n), "cudaGraphGetNodes")[0]
        kernel_nodes = [x for x in nodes if chk(rt.cudaGraphNodeGetType(x), "cudaGraphNodeGetType")
                        == rt.cudaGraphNodeType.cudaGraphNodeTypeKernel]
        assert kernel_nodes
        for node in kernel_nodes:
            v = chk(rt.cudaGraphKernelNodeGetAttribute(
                node, rt.cudaKernelNodeAttrID.cudaLaunchAttributeAccessPolicyWindow), "cudaGraphKernelNodeGetAttribute")
            w = v.accessPolicyWindow
            assert (int(w.base_ptr), int(w.num_bytes)) == (buf.data_ptr(), 8 * MIB), \
                "captured kernel node lacks the stream's access-policy window: persist under --graph has no effect"
        g.replay()
        torch.cuda.synchronize()
    assert int(buf[0]) == 2


def test_prefetch_kernels_launch_and_leave_data_unchanged():
    k = cuda_l2.PrefetchKernels()
    buf = torch.randint(0, 255, (3 * MIB + 256,), dtype=torch.uint8, device="cuda")
    ref = buf.clone()
    s = torch.cuda.Stream()
    for kind in cuda_l2.PREFETCH_KERNELS:
        if k.available(kind):
            k.launch(kind, buf.data_ptr(), buf.numel(), s.cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(buf, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernels_on_gpu(dtype):
    from gpulab.l2 import kernels as K, reference as R
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(70, 300, device="cuda", generator=g).to(dtype)
    w = (torch.randn(260, 300, device="cuda", generator=g) / 17).to(dtype)
    b = torch.randn(260, device="cuda", generator=g).to(dtype)
    y, r = K.linear(x, w, b, relu=True).float(), R.linear(x, w, b, relu=True).float()
    assert float((y - r).abs().max()) <= 2e-2 * float(r.abs().max())
    # the matformer bands: a strided output column slice, a residual, and an in-place accumulation over K bands
    res = torch.randn(70, 260, device="cuda", generator=g).to(dtype)
    hid = torch.zeros(70, 300, device="cuda", dtype=dtype)
    K.linear(x, w, b, relu=True, out=hid[:, 20:280], add=res)
    r = R.linear(x, w, b, relu=True, add=res).float()
    assert float((hid[:, 20:280].float() - r).abs().max()) <= 2e-2 * float(r.abs().max())
    assert not hid[:, :20].any() and not hid[:, 280:].any()
    acc = K.linear(x[:, :100], w[:, :100])
    K.linear(x[:, 100:], w[:, 100:], out=acc, add=acc)
    r = R.linear(x, w).float()
    assert float((acc.float() - r).abs().max()) <= 2e-2 * float(r.abs().max())
    x = torch.randn(3, 40, 15, 17, device="cuda", generator=g).to(dtype)
    w = (torch.randn(72, 40, 3, 3, device="cuda", generator=g) / 19).to(dtype)
    y, r = K.conv2d(x, w, b[:72], stride=1, padding=1, relu=True).float(), R.conv2d(x, w, b[:72], 1, 1, True).float()
    assert float((y - r).abs().max()) <= 2e-2 * float(r.abs().max())
    words = torch.randint(-2**31, 2**31 - 1, (1 << 20,), dtype=torch.int32, device="cuda")
    import numpy as np
    assert int(np.bitwise_xor.reduce(K.touch(words).cpu().numpy())) == R.xor_all(words)


@pytest.mark.parametrize("argv", [
    ["--workload", "mlp", "--width", "1024", "--layers", "4", "--batch", "16", "--pollute-mib", "64"],
    ["--workload", "mlp", "--width", "512", "--layers", "4", "--batch", "8", "--graph", "--pollute-mib", "64"],
    ["--workload", "ofa", "--width-mult", "0.5", "--image", "64", "--batch", "2", "--subnets", "3", "--graph"],
    ["--workload", "cnn", "--width", "64", "--layers", "3", "--batch", "4", "--image", "16"],
    ["--workload", "ofa", "--width-mult", "0.5", "--image", "64", "--batch", "2", "--subnets", "3"],
    ["--workload", "matformer", "--width", "512", "--layers", "3", "--batch", "4", "--subnets", "4", "--graph",
     "--pollute-mib", "64"],
    ["--workload", "matformer", "--width", "256", "--layers", "2", "--batch", "2", "--subnets", "3", "--graph",
     "--impl", "cublas"],
    ["--workload", "cnn", "--width", "32", "--layers", "2", "--batch", "2", "--image", "12", "--impl", "cublas"],
], ids=["mlp_eager", "mlp_graph", "ofa_graph", "cnn_eager", "ofa_eager", "matformer_graph", "matformer_cublas_graph",
        "cnn_cublas_eager"])
def test_gpu_run_all_policies(argv, out_dir):
    from gpulab.cli import invoke
    invoke(["--device", "cuda", "--out", str(out_dir), "l2", "run", *argv, "--policy", "all", "--reps", "6", "--rounds", "2"])
    rec = yaml.safe_load(next(out_dir.glob("l2-*.yaml")).read_text())
    failed = {k: v for k, v in rec["checks"].items() if not v["passed"] and k != "auto_not_slower_than_default"}
    assert not failed, failed
    pols = [r["policy"] for r in rec["rows"]]
    assert pols[:4] == ["default", "persist", "prefetch", "persist+prefetch"] and pols[-1] == "auto"
    assert all(r["median_ms"] > 0 for r in rec["rows"])
    assert rec["metrics"]["persist_plan"]["hit_ratio"] <= 1.0


def test_gpu_bad_set_aside_is_input_error(out_dir):
    from gpulab.cli import invoke
    with pytest.raises(InputError):
        invoke(["--device", "cuda", "--out", str(out_dir), "l2", "run", "--width", "256", "--layers", "2", "--policy", "persist",
                "--set-aside-mib", "100000", "--reps", "2", "--rounds", "1"])
