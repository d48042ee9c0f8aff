"""The e4m3 -> fp16/bf16 PTX recipes of gpulab.vajra.fp8_ptx: their assembly text run through a small emulator of
the instructions it uses (PTX ISA semantics, bit by bit), for every code at every byte position, against torch's
conversion; the probe's refusals without a GPU; on a GPU, the probe itself and the W8A16 kernel with and without
the recipe."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gpulab.vajra import fp8_ptx as P

E4 = torch.float8_e4m3fn
M32 = 0xFFFFFFFF


def _bf16_bits_to_f32(h: int) -> float:
    return float(np.array([h << 16], dtype=np.uint32).view(np.float32)[0])


def _f32_to_bf16_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).to(torch.bfloat16).view(torch.int16)[0]) & 0xFFFF


def _e4m3_to_f16_bits(b: int) -> int:
    return int(torch.tensor([b], dtype=torch.uint8).view(E4).to(torch.float16).view(torch.int16)[0]) & 0xFFFF


def _imm(tok: str) -> int:
    return int(tok, 16) if tok.lower().startswith("0x") else int(tok)


def run_ptx(asm: str, src: int) -> tuple[int, int]:
    """Execute ``asm`` (a recipe: ``$2`` the four source bytes, ``$0``/``$1`` the results) on one 32-bit word."""
    regs = {"$2": src & M32}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else _imm(tok) & M32

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        m = re.fullmatch(r"\{(\w+), (\w+)\}, (\$\d)", rest.strip())
        if op == "mov.b32" and m:  # unpack a 32-bit register into two 16-bit ones, the low half first
            regs[m.group(1)], regs[m.group(2)] = regs[m.group(3)] & 0xFFFF, regs[m.group(3)] >> 16
            continue
        args = [a.strip() for a in rest.split(",")]
        d = args[0]
        if op == "mov.b32":
            regs[d] = val(args[1])
        elif op == "cvt.rn.f16x2.e4m3x2":  # the byte in the upper half of the source to the upper half
            h = val(args[1]) & 0xFFFF
            regs[d] = _e4m3_to_f16_bits(h & 0xFF) | (_e4m3_to_f16_bits(h >> 8) << 16)
        elif op == "prmt.b32":  # bytes 0-3 of a, 4-7 of b; selector nibble i picks byte i of d
            a, b, c = val(args[1]), val(args[2]), val(args[3])
            pool = (a | (b << 32)).to_bytes(8, "little")
            regs[d] = int.from_bytes(bytes(pool[(c >> (4 * i)) & 7] for i in range(4)), "little")
        elif op == "and.b32":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "shr.b32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "lop3.b32":  # bit i of d = bit (a_i b_i c_i as a 3-bit index, a the highest) of the table
            a, b, c, lut = val(args[1]), val(args[2]), val(args[3]), _imm(args[4])
            regs[d] = sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
                          for i in range(32))
        elif op == "fma.rn.bf16x2":  # per half: a * b + c, rounded once to bf16 (the product is exact in fp32)
            a, b, c = val(args[1]), val(args[2]), val(args[3])
            out = 0
            for half in (0, 1):
                x, y, z = ((v >> (16 * half)) & 0xFFFF for v in (a, b, c))
                r = np.float32(_bf16_bits_to_f32(x)) * np.float32(_bf16_bits_to_f32(y)) + np.float32(
                    _bf16_bits_to_f32(z))
                out |= _f32_to_bf16_bits(float(r)) << (16 * half)
            regs[d] = out
        else:
            raise AssertionError(f"the emulator has no {op!r}: extend it with the PTX ISA's semantics")
    return regs["$0"], regs["$1"]


@pytest.mark.parametrize("target", ["f16", "bf16"])
def test_ptx_recipe_converts_every_e4m3_code_at_every_byte_position(target):
    asm = P.E4M3X4_TO_F16_ASM if target == "f16" else P.E4M3X4_TO_BF16_ASM
    dt = torch.float16 if target == "f16" else torch.bfloat16
    for c in range(256):
        codes = [(c + 37 * i) % 256 for i in range(4)]  # code c at byte 0, three others behind it
        word = sum(b << (8 * i) for i, b in enumerate(codes))
        lo, hi = run_ptx(asm, word)
        got = [lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16]  # element i of the pack: half i
        want = torch.tensor(codes, dtype=torch.uint8).view(E4).to(dt)
        for i, b in enumerate(codes):
            if target == "bf16" and b in P.NAN_CODES:  # documented: -/+480
                assert _bf16_bits_to_f32(got[i]) == (480.0 if b == 0x7F else -480.0)
            elif bool(want[i].isnan()):
                assert (got[i] & 0x7C00) == 0x7C00 and got[i] & 0x3FF, (b, hex(got[i]))
            else:
                assert got[i] == int(want[i:i + 1].view(torch.int16)[0]) & 0xFFFF, (target, b, i, hex(got[i]))


def test_ptx_recipe_emulator_catches_a_wrong_recipe():
    """The emulator is strict enough to tell: swapping the two prmt selectors (pairs out of order) or dropping
    the sign step changes converted values."""
    swapped = P.E4M3X4_TO_BF16_ASM.replace("0x1404", "0xTMP").replace("0x3424", "0x1404").replace("0xTMP", "0x3424")
    no_sign = P.E4M3X4_TO_BF16_ASM.replace("0xEC", "0xCC")  # lop3 -> b alone
    word = 0x00C0_3840  # bytes 0x40 (2.0), 0x38 (1.0), 0xC0 (-2.0), 0x00 (0)
    assert run_ptx(P.E4M3X4_TO_BF16_ASM, word) == (0x3F80_4000, 0x0000_C000)
    assert run_ptx(swapped, word) != run_ptx(P.E4M3X4_TO_BF16_ASM, word)
    assert run_ptx(no_sign, word) != run_ptx(P.E4M3X4_TO_BF16_ASM, word)


def test_recipes_do_not_serve_without_a_gpu_or_when_turned_off(monkeypatch):
    assert P.conversion_problem("cpu", "bf16") == "needs a CUDA GPU"
    assert not P.ptx_usable(torch.device("cpu"), "bf16")
    monkeypatch.setitem(P._PROBLEMS, ("cpu", "f16"), None)  # as if a probe had passed
    assert P.ptx_usable(torch.device("cpu"), "f16")
    monkeypatch.setenv("GPULAB_FP8_PTX", "0")
    assert not P.ptx_usable(torch.device("cpu"), "f16")
    # off means no probe either: nothing compiled or launched (an escape hatch should a recipe fault on a GPU)
    monkeypatch.setattr(P, "_convert_kernel", None)
    assert P.conversion_problem("cuda", "bf16") == P.PTX_OFF
    from gpulab.vajra import paged_attention as A

    assert A.fp8_v_ptx_problem("cuda", torch.bfloat16, 32, 8, 128) == P.PTX_OFF


def test_a_gpu_without_the_instruction_is_said_apart_from_a_failure(monkeypatch):
    """An sm_86 GPU has no cvt.rn.f16x2.e4m3x2: its reason is gpu_lacks (the model notes no failure), unlike the
    reasons of a probe that ran and failed, or of the recipes turned off; nothing is compiled for it."""
    monkeypatch.setattr(P, "_PROBLEMS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(P, "_convert_kernel", None)
    why = P.conversion_problem("cuda", "f16")
    assert why == f"{P.GPU_LACKS} cvt.rn.f16x2.e4m3x2 (sm_86)" and P.gpu_lacks(why)
    assert not P.gpu_lacks(None) and not P.gpu_lacks(P.PTX_OFF) and not P.gpu_lacks("needs a CUDA GPU")
    assert not P.gpu_lacks("3 of 1280 converted values differ from torch's e4m3 -> f16")


@pytest.mark.gpu
def test_gpu_ptx_recipes_pass_their_probe_and_w8a16_agrees_with_tritons_cast():
    from gpulab.vajra import reference as R
    from gpulab.vajra.fp8_kernels import native_fp8_for
    from gpulab.vajra.w8a16 import w8a16_matmul

    cc = torch.cuda.get_device_capability()
    assert P.conversion_problem("cuda", "bf16") is None
    if not native_fp8_for(cc, E4):
        pytest.skip("no native e4m3 on this GPU: W8A16 decodes the raw bytes")
    assert P.conversion_problem("cuda", "f16") is None
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 4096, 4096), (16, 1536, 4096), (64, 6144, 4096)):
        w = torch.randn(n, k, generator=g) * 0.02
        q, s = R.quantize_rows(w)
        q, s = q.cuda(), s.cuda()
        x = torch.randn(m, k, generator=g).to(device="cuda", dtype=torch.bfloat16)
        want = R.linear_w8a16(x.float(), q, s)
        a = w8a16_matmul(x, q, s, "channel", ptx=True)
        b = w8a16_matmul(x, q, s, "channel", ptx=False)
        # the same bf16 operands either way: the same products, summed in the same order
        assert torch.equal(a, b), float((a.float() - b.float()).abs().max())
        assert float((a.float() - want).norm() / want.norm()) < 2e-2
