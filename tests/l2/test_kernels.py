"""Triton kernels against the torch reference (under TRITON_INTERPRET=1 on the CPU, fp32)."""
import numpy as np
import pytest
import torch

from gpulab.l2 import kernels as K
from gpulab.l2 import reference as R


def _close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("m,n,k,bias,relu", [(1, 8, 8, True, True), (37, 50, 70, True, False), (20, 33, 17, False, True)])
def test_linear(m, n, k, bias, relu):
    g = torch.Generator().manual_seed(m * 100 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    assert _close(K.linear(x, w, b, relu=relu), R.linear(x, w, b, relu=relu))


def test_linear_strided_input_and_shape_errors():
    x = torch.randn(40, 24)[::2]  # non-contiguous rows
    w = torch.randn(16, 24)
    assert _close(K.linear(x, w), R.linear(x, w))
    with pytest.raises(ValueError):
        K.linear(torch.randn(3, 5), torch.randn(4, 6))


@pytest.mark.parametrize("stride,pad,ks,bias", [(1, 1, 3, True), (2, 1, 3, False), (1, 0, 1, True), (2, 2, 5, True)])
def test_conv2d(stride, pad, ks, bias):
    g = torch.Generator().manual_seed(ks * 10 + stride)
    x = torch.randn(2, 5, 9, 11, generator=g)
    w = torch.randn(7, 5, ks, ks, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    for relu in (False, True):
        assert _close(K.conv2d(x, w, b, stride=stride, padding=pad, relu=relu),
                      R.conv2d(x, w, b, stride=stride, padding=pad, relu=relu))


def test_conv2d_errors():
    with pytest.raises(ValueError):
        K.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError):
        K.conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError):
        K.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3).transpose(2, 3))


@pytest.mark.parametrize("n,programs", [(1, 1), (1000, 3), (5000, 8)])
def test_touch_reads_every_word(n, programs):
    words = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    out = K.touch(words, programs=programs)
    assert int(np.bitwise_xor.reduce(out.numpy())) == R.xor_all(words)
    words[n // 2] ^= 1  # a changed word changes the result: nothing is skipped
    out = K.touch(words, programs=programs)
    assert int(np.bitwise_xor.reduce(out.numpy())) == R.xor_all(words)
    with pytest.raises(ValueError):
        K.touch(words.float())


def test_pollute_rewrites_every_word():
    w = torch.arange(1000, dtype=torch.int32)
    K.pollute(w)
    assert torch.equal(w, torch.arange(1, 1001, dtype=torch.int32))


def test_linear_more_row_tiles_than_one_group():
    """L1: the grouped (GROUP_M = 8) program order with a last, partial group of row tiles: M = 150 is 10 row
    tiles of 16 in the interpreter (every test shape above had at most 3, all in the first group)."""
    import torch

    from gpulab.l2 import kernels as K
    from gpulab.l2 import reference as R

    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(150, 20, generator=g), torch.randn(40, 20, generator=g), torch.randn(40, generator=g)
    assert torch.allclose(K.linear(x, w, b), R.linear(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
def test_linear_adds_after_the_activation_into_a_strided_output(relu):
    """The matformer workload's bands: up-projections write column slices of one hidden buffer (a strided out), the
    first down band adds the residual, the later ones add into their own output (add is out)."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    res = torch.randn(5, 40, generator=g)
    hid = torch.zeros(5, 70)
    y = K.linear(x, w, b, relu=relu, out=hid[:, 20:60], add=res)
    assert y.data_ptr() == hid[:, 20:60].data_ptr()
    want = (torch.relu(x @ w.T + b) if relu else x @ w.T + b) + res
    assert _close(hid[:, 20:60], want) and float(hid[:, :20].abs().max()) == 0 and float(hid[:, 60:].abs().max()) == 0
    assert _close(R.linear(x, w, b, relu=relu, add=res), want)
    # accumulate two K bands of one product in place: y = x[:, :10] @ w[:, :10].T + x[:, 10:] @ w[:, 10:].T
    acc = K.linear(x[:, :10], w[:, :10])
    K.linear(x[:, 10:], w[:, 10:], out=acc, add=acc)
    assert _close(acc, x @ w.T)
    ref = R.linear(x[:, :10], w[:, :10])
    R.linear(x[:, 10:], w[:, 10:], out=ref, add=ref)
    assert _close(ref, x @ w.T)
    with pytest.raises(ValueError, match="add is"):
        K.linear(x, w, add=torch.zeros(5, 39))


@pytest.mark.parametrize("relu,bias", [(False, True), (True, True), (False, False)])
def test_vendor_ops_match_the_reference(relu, bias):
    """--impl cublas: torch's own GEMM/conv in the model's dtype, with the Triton kernels' signature (an added
    operand that may be the output itself, a strided output)."""
    from gpulab.l2 import vendor_ops as V

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 20, generator=g), torch.randn(12, 20, generator=g)
    b = torch.randn(12, generator=g) if bias else None
    add = torch.randn(6, 12, generator=g)
    assert _close(V.linear(x, w, b, relu=relu), R.linear(x, w, b, relu=relu))
    assert _close(V.linear(x, w, b, relu=relu, add=add), R.linear(x, w, b, relu=relu, add=add))
    buf = torch.zeros(6, 30)
    V.linear(x, w, b, relu=relu, out=buf[:, 10:22], add=add)
    assert _close(buf[:, 10:22], R.linear(x, w, b, relu=relu, add=add)) and not buf[:, :10].any()
    acc = V.linear(x[:, :7], w[:, :7])
    V.linear(x[:, 7:], w[:, 7:], out=acc, add=acc)
    assert _close(acc, x @ w.T)
    xc, wc = torch.randn(2, 3, 9, 9, generator=g), torch.randn(5, 3, 3, 3, generator=g)
    assert _close(V.conv2d(xc, wc, None, 2, 1, relu), R.conv2d(xc, wc, None, 2, 1, relu))
    with pytest.raises(ValueError):
        V.linear(torch.randn(3, 5), torch.randn(4, 6))
