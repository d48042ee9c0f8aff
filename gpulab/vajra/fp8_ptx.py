"""e4m3 -> fp16 / bf16 conversions by inline PTX for the GPU kernels, and the probe that lets them serve.

Triton's own cast of e4m3 values to bf16 on sm_90 takes 1.5 conversion instructions a value (e4m3 -> fp16 two
values at a time, then fp16 -> bf16 one at a time, in its SASS); conversions issue at 16 per clock per SM by
NVIDIA's throughput table, about the rate at which streaming FP8 weights at the copy bandwidth needs them.
These recipes use no conversion instruction for bf16 and one per pair of values for fp16 (both exact, four
bytes per call):

* fp16 (sm_89+): ``cvt.rn.f16x2.e4m3x2``, the byte in the upper half of its 16-bit source to the upper half.
* bf16 (sm_80+): e4m3 (bias 7) and bf16 (bias 127) differ in their exponent bias by 120, so the bits
  ``sign << 15 | (exponent, mantissa) << 4`` are the value times 2^-120 as a bf16, normal or subnormal alike;
  one bf16 multiply by 2^120 (as ``fma`` with -0.0, exact) restores it. The NaN codes 0x7F and 0xFF come out
  as -/+480 instead of NaN (no weight a quantizer writes is NaN).

Triton packs element i of four into byte i of the source register and takes the outputs in the same order
(low half first); :func:`conversion_problem` checks a recipe on the GPU once, over all 256 codes against
torch's conversion, before a kernel uses it (see ``ptx_usable``). tests/vajra/model/test_fp8_ptx.py runs the
assembly text itself through a small emulator of the instructions it uses.
"""
import os

import torch
import triton
import triton.language as tl

E4M3X4_TO_F16_ASM = """{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}"""

E4M3X4_TO_BF16_ASM = """{
.reg .b32 a0, a1, m0, m1, scale, negzero;
prmt.b32 a0, $2, 0, 0x1404;
prmt.b32 a1, $2, 0, 0x3424;
and.b32 m0, a0, 0x7F007F00;
and.b32 m1, a1, 0x7F007F00;
shr.b32 m0, m0, 4;
shr.b32 m1, m1, 4;
lop3.b32 a0, a0, m0, 0x80008000, 0xEC;
lop3.b32 a1, a1, m1, 0x80008000, 0xEC;
mov.b32 scale, 0x7B807B80;
mov.b32 negzero, 0x80008000;
fma.rn.bf16x2 $0, a0, scale, negzero;
fma.rn.bf16x2 $1, a1, scale, negzero;
}"""
# prmt 0x1404: bytes 0 and 1 of the source to bits 8-15 and 24-31 (0x3424: bytes 2 and 3); and + shr: each
# byte's low 7 bits (exponent, mantissa) to bits 4-10 of its half; lop3 0xEC, (a & c) | b: its sign to bit 15;
# 0x7B80 is 2^120 in bf16.
_F16_ASM = tl.constexpr(E4M3X4_TO_F16_ASM)  # what a jit function may read of a module global
_BF16_ASM = tl.constexpr(E4M3X4_TO_BF16_ASM)


@triton.jit
def e4m3_to_f16_ptx(x):
    """e4m3 values (fp8e4nv or their uint8 bytes) -> fp16, exactly. Not pure on purpose: Triton moves a pure
    conversion of a dot operand into the operand's shared-memory read, which for an operand whose reduced
    dimension is strided in memory (attention's V) became one byte load per value."""
    return tl.inline_asm_elementwise(asm=_F16_ASM, constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)],
                                     dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def e4m3_to_bf16_ptx(x):
    """e4m3 values (fp8e4nv or their uint8 bytes) -> bf16, exactly (NaN codes: -/+480, see the module)."""
    return tl.inline_asm_elementwise(asm=_BF16_ASM, constraints="=r,=r,r",
                                     args=[x.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4)


@triton.jit
def _convert_kernel(src_ptr, dst_ptr, n, TO_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(src_ptr + offs, mask=mask, other=0)
    if TO_BF16:
        tl.store(dst_ptr + offs, e4m3_to_bf16_ptx(b), mask=mask)
    else:
        tl.store(dst_ptr + offs, e4m3_to_f16_ptx(b), mask=mask)


TARGETS = {"f16": torch.float16, "bf16": torch.bfloat16}
NAN_CODES = (0x7F, 0xFF)
_PROBLEMS: dict = {}  # (device, target) -> why not, or None


def device_key(device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


PTX_OFF = "turned off by GPULAB_FP8_PTX=0"
GPU_LACKS = "this GPU has no"  # how every reason starts that only says the GPU cannot run a recipe (not a failure)


def gpu_lacks(why: str | None) -> bool:
    """Whether a probe's reason only says that this GPU lacks what the recipe needs (callers note real failures,
    not this)."""
    return bool(why) and why.startswith(GPU_LACKS)


def ptx_disabled() -> bool:
    """GPULAB_FP8_PTX=0: no recipe serves, and no probe compiles or launches one (an A/B run, or an escape hatch
    should a recipe fault on some GPU)."""
    return os.environ.get("GPULAB_FP8_PTX", "1") == "0"


def conversion_problem(device, target: str) -> str | None:
    """Why the e4m3 -> ``target`` ("f16" or "bf16") recipe must not serve on ``device`` (None: it serves): every
    code converted by it against torch's conversion, bit for bit (the NaN codes of the bf16 recipe apart), at
    each of the four positions of a pack; checked once per device and remembered."""
    if ptx_disabled():
        return PTX_OFF
    key = (device_key(device), target)
    if key in _PROBLEMS:
        return _PROBLEMS[key]
    why = None
    try:
        if torch.device(device).type != "cuda":
            why = "needs a CUDA GPU"
        else:
            cc = torch.cuda.get_device_capability(torch.device(key[0]))
            if cc < ((8, 9) if target == "f16" else (8, 0)):
                why = f"{GPU_LACKS} {'cvt.rn.f16x2.e4m3x2' if target == 'f16' else 'fma.rn.bf16x2'} (sm_{cc[0]}{cc[1]})"
            else:
                codes = torch.arange(256, dtype=torch.uint8)
                # every code at each of the four byte positions of a pack (256 is a multiple of 4), reversed too
                src = torch.cat([codes.roll(r) for r in range(4)] + [codes.flip(0)]).to(key[0])
                dst = torch.empty(src.shape, dtype=TARGETS[target], device=src.device)
                _convert_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), TO_BF16=target == "bf16",
                                                                    BLOCK=1024)
                want = src.view(torch.float8_e4m3fn).to(TARGETS[target])
                keep = torch.ones_like(src, dtype=torch.bool) if target == "f16" else \
                    (src != NAN_CODES[0]) & (src != NAN_CODES[1])
                same = (dst.view(torch.int16) == want.view(torch.int16)) | (dst.isnan() & want.isnan())
                bad = int((~same & keep).sum())
                if bad:
                    why = f"{bad} of {src.numel()} converted values differ from torch's e4m3 -> {target}"
    except Exception as e:  # noqa: BLE001 - a compiler or launch error: Triton's own cast serves
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    _PROBLEMS[key] = why
    return why


def ptx_usable(device: torch.device, target: str) -> bool:
    """Whether a kernel on ``device`` may convert e4m3 -> ``target`` by the PTX recipe: its probe passed, and
    GPULAB_FP8_PTX is not 0 (which turns the recipes off, for an A/B run). The probe runs here on first use,
    except inside a CUDA-graph capture (Triton's cast serves that capture)."""
    if ptx_disabled():
        return False
    key = (device_key(device), target)
    if key not in _PROBLEMS:
        if torch.cuda.is_current_stream_capturing():
            return False
        conversion_problem(device, target)
    return _PROBLEMS[key] is None
