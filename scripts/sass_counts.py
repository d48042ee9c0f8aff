"""Instruction counts of vajra's FP8 kernels as an H100 runs them, without a GPU: each kernel compiled ahead of time
for sm_90 (Triton), assembled by the ptxas and disassembled by the nvdisasm that Triton ships, and the instructions
of its main loop (the longest backward branch) counted by opcode. The figures BENCHMARKS.md quotes for the FP8
attention and W8A16 tiles come from this script:

    python scripts/sass_counts.py            # every tile, a table
    python scripts/sass_counts.py --json     # the same as JSON
    python scripts/sass_counts.py --sort     # also one shared-memory step of the bitonic sort (nvcc; whole kernel)
    python scripts/sass_counts.py --join     # the tensor-core join kernels' registers and programs an SM

A count is per thread per loop iteration (decode attention: one 64-key step; prefill: one 32-key step; W8A16:
one 128 x 64 tile of K x N). It says what the SM must issue, not how fast the kernel runs.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gpulab.vajra import paged_attention as A  # noqa: E402
from gpulab.vajra import w8a16 as W  # noqa: E402
from gpulab.vajra.fp8_kernels import FORMATS  # noqa: E402

E4 = dict(zip(("EBITS", "MBITS", "BIAS"), FORMATS[torch.float8_e4m3fn]))
ATTN = {"q_ptr": "*bf16", "o_ptr": "*bf16", "bt_ptr": "*i32", "cl_ptr": "*i32", "sm_scale_log2": "fp32",
        "k_scale": "fp32", "v_scale": "fp32", "qs_ptr": "*i32", "ql_ptr": "*i32", "po_ptr": "*fp32", "pml_ptr": "*fp32"}
DECODE = dict(GROUP=4, BH=16, PAGE=16, D=128, BN=64, UNIT=4, DIRECT=False)
PREFILL = dict(GROUP=4, PAGE=16, D=128, BN=32)
FP8 = dict(FP8=True, NATIVE=True, IEEE=False, F16=True, **E4)
BF16 = dict(FP8=False, NATIVE=False, IEEE=False, F16=False, V_PTX=False, **E4)
W8 = dict(SBR=1, SBC=1, SCALE_MODE=1, PARTIAL=True, BM=16, BN=64, BK=128, NATIVE=True, IEEE=False, **E4)
W8_TYPES = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "o_ptr": "*fp32"}

# name -> (kernel, pointer types, constexprs, compile options)
TILES = {
    "decode, bf16 cache": (A._paged_decode_kernel, dict(ATTN, c_ptr="*bf16"), dict(DECODE, **BF16), {}),
    "decode, fp8 cache, Triton's cast": (A._paged_decode_kernel, dict(ATTN, c_ptr="*fp8e4nv"),
                                         dict(DECODE, V_PTX=False, **FP8), {}),
    "decode, fp8 cache, PTX V": (A._paged_decode_kernel, dict(ATTN, c_ptr="*fp8e4nv"), dict(DECODE, V_PTX=True, **FP8),
                                 {}),
    "prefill BM16, fp8 cache, PTX V": (A._paged_attn_kernel, dict(ATTN, c_ptr="*fp8e4nv"),
                                       dict(PREFILL, BM=16, V_PTX=True, **FP8), {}),
    "prefill BM64, fp8 cache, PTX V": (A._paged_attn_kernel, dict(ATTN, c_ptr="*fp8e4nv"),
                                       dict(PREFILL, BM=64, V_PTX=True, **FP8), {}),
    "w8a16 M16 tile, Triton's cast": (W._w8a16_kernel, W8_TYPES, dict(W8, PTX_BF16=False),
                                      {"num_warps": 4, "num_stages": 4}),
    "w8a16 M16 tile, PTX bf16": (W._w8a16_kernel, W8_TYPES, dict(W8, PTX_BF16=True), {"num_warps": 4, "num_stages": 4}),
}


def tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"this Triton ships no {name} ({path})")
    return str(path)


def ptx_of(fn, types: dict, consts: dict, options: dict) -> str:
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    # what the JIT sees at Llama-3.1-8B shapes: 16-byte aligned pointers, strides and sizes multiples of 16
    aligned = [a for a in fn.arg_names if a.endswith("_ptr") or a.startswith("s_") or a in ("N", "K", "k_per_split")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=options or {"num_warps": 4})
    return k.asm["ptx"]


# one SASS instruction line of nvdisasm -c: its address comment, an optional predicate, the opcode
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9_.]+)")


def disassemble(cubin: Path) -> list[str]:
    return subprocess.run([tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True,
                          text=True).stdout.splitlines()


def opcodes(lines: list[str]) -> collections.Counter:
    return collections.Counter(m.group(1) for m in map(INSTRUCTION.match, lines) if m)


def loop_counts(ptx: str) -> collections.Counter:
    """Opcode counts between the label of the longest backward branch and the branch (the main loop)."""
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        subprocess.run([tool("ptxas"), f"-arch={arch}", "-o", str(cubin), str(src)], check=True, capture_output=True)
        sass = disassemble(cubin)
    labels = {line.rstrip(":"): i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:", line)}
    best = None
    for j, line in enumerate(sass):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), j) < j:
            i = labels[m.group(1)]
            if best is None or j - i > best[1] - best[0]:
                best = (i, j)
    if best is None:
        raise ValueError("no loop found in the SASS")
    return opcodes(sass[best[0]:best[1] + 1])


SORT_STEP_KERNELS = r"""
// one t14f4 shared-memory step of bitonic.cu with p_hi, fp and flip at run time (tile_chunk as the tile kernels
// called it until 2026-11-29), the same step as they run it now (tile_step_p: fp and flip compile-time constants,
// p_hi at run time) and with all three as constants (p_hi 9, fp 4, no flip: the second step of a tile merge)
extern "C" __global__ void __launch_bounds__(1024) step_runtime(u32* keys, int p_hi, int fp, int flip) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u32* sk = reinterpret_cast<u32*>(smem_raw);
    tile_chunk<u32, false, 14, 4, 1024>(sk, nullptr, p_hi, fp, flip != 0);
    keys[threadIdx.x] = sk[threadIdx.x];
}
extern "C" __global__ void __launch_bounds__(1024) step_shape(u32* keys, int p_hi) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u32* sk = reinterpret_cast<u32*>(smem_raw);
    tile_step_p<u32, false, 14, 4, 1024, 4, false>(sk, nullptr, p_hi);
    keys[threadIdx.x] = sk[threadIdx.x];
}
extern "C" __global__ void __launch_bounds__(1024) step_constant(u32* keys) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u32* sk = reinterpret_cast<u32*>(smem_raw);
    tile_chunk<u32, false, 14, 4, 1024>(sk, nullptr, 9, 4, false);
    keys[threadIdx.x] = sk[threadIdx.x];
}
"""


def sort_step_counts() -> dict:
    """Whole-kernel SASS opcode counts of one bitonic tile step: runtime-parameterized, with its shape (fused
    strides, flip) constant, and all constant (nvcc)."""
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("--sort needs nvcc on the PATH")
    src = (Path(__file__).resolve().parents[1] / "gpulab" / "sort" / "bitonic.cu").read_text()
    src = src[:src.index('extern "C" {')] + SORT_STEP_KERNELS
    with tempfile.TemporaryDirectory() as d:
        cu, cubin = Path(d) / "step.cu", Path(d) / "step.cubin"
        cu.write_text(src)
        subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-O3", "-std=c++17", "-o", str(cubin), str(cu)], check=True,
                       capture_output=True)
        sass = disassemble(cubin)
    sections: dict[str, list[str]] = {}  # kernel -> its lines
    for line in sass:
        m = re.match(r"^//-+ \.text\.(\S+)\s+-+", line)
        if m:
            sections[m.group(1)] = []
        elif sections:
            sections[next(reversed(sections))].append(line)
    out = {name: opcodes(lines) for name, lines in sections.items()}
    return {f"sort t14f4 step, {name.split('_')[1]}": {"total": sum(c.values()), "opcodes": dict(c.most_common())}
            for name, c in sorted(out.items())}


def sm90_resources(fn, types: dict, consts: dict, num_warps: int = 4) -> dict:
    """Registers, spill bytes, shared memory and the programs an sm_90 SM holds at once (by registers, shared
    memory and threads) of one Triton kernel built ahead of time (ptxas -v of its PTX), and its SASS size."""
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        log = subprocess.run([tool("ptxas"), "-v", f"-arch={arch}", "-o", str(cubin), str(src)], check=True,
                             capture_output=True, text=True).stderr
        sass = sum(opcodes(disassemble(cubin)).values())
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    smem = int(k.metadata.shared)
    threads = 32 * num_warps
    per_sm = min(65536 // (-(-regs // 8) * 8 * threads), (227 * 1024) // max(smem, 1), 2048 // threads, 32)
    return {"registers": regs, "spill_bytes": spill, "shared_bytes": smem, "programs_per_sm": per_sm,
            "warps_per_sm": per_sm * num_warps, "sass": sass}


def join_resources() -> dict:
    """The tensor-core join and aggregate kernels at the tiles BENCHMARKS.md quotes (fp16 codes, 4 warps)."""
    import triton.language as tl

    from gpulab.dbjoin import tensorcore_aggregate_kernel as TA
    from gpulab.dbjoin import tensorcore_kernel as TK

    jt = {n: "*i32" for n in ("l_lo", "l_hi", "l_row", "l_start", "l_cnt", "r_lo", "r_hi", "r_row", "r_start",
                              "r_cnt", "out_l", "out_r")}
    jt.update(capacity="i64", counter="*i64", R="i32", KUSED="i32")
    at = {n: "*i32" for n in ("l_lo", "l_hi", "l_pay", "l_start", "l_cnt", "r_lo", "r_hi", "r_pay", "r_start", "r_cnt")}
    at.update({n: "*i64" for n in ("out_key", "out_count", "out_suml", "out_sumr", "counter", "l_key")}, R="i32",
              KUSED="i32")
    out = {}
    for bm in (64, 32):
        for hi in (True, False):
            for count_only in (False, True):
                name = f"tc_join BM{bm} {'int64' if hi else 'int32'}{', count only' if count_only else ''}"
                out[name] = sm90_resources(TK.tc_join_kernel, jt, dict(HAS_HI=hi, BM=bm, BN=bm, DT=tl.float16,
                                                                         COUNT_ONLY=count_only))
    out["tc_agg BM64 int64 sum"] = sm90_resources(TA.tc_agg_kernel, at, dict(
        HAS_HI=True, BM=64, DT=tl.float16, ADT=tl.float16, WITH_SUMS=True, AGG_DOT=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print {tile: {total, opcodes}} as JSON")
    ap.add_argument("--only", default="", help="tiles whose name contains this text")
    ap.add_argument("--sort", action="store_true", help="also one bitonic tile step (whole kernel, nvcc)")
    ap.add_argument("--join", action="store_true",
                    help="only the tensor-core join kernels' registers, spills and programs an SM (sm_90)")
    a = ap.parse_args()
    if a.join:
        res = join_resources()
        if a.json:
            print(json.dumps(res, indent=1))
            return
        print(f"Triton {triton.__version__}, sm_90, fp16 codes, 4 warps")
        for name, r in res.items():
            print(f"{name:32} {r['registers']:4} registers, {r['spill_bytes']} B spilled, {r['shared_bytes']:6} B "
                  f"shared: {r['programs_per_sm']} programs ({r['warps_per_sm']} warps) an SM; SASS {r['sass']}")
        return
    out = {}
    for name, (fn, types, consts, options) in TILES.items():
        if a.only and a.only not in name:
            continue
        c = loop_counts(ptx_of(fn, types, consts, options))
        out[name] = {"total": sum(c.values()), "opcodes": dict(c.most_common())}
    if a.sort:
        out.update(sort_step_counts())
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"Triton {triton.__version__}, sm_90, instructions per thread per loop iteration (sort step: whole kernel)")
    for name, r in out.items():
        top = ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:8])
        print(f"{name:36} {r['total']:5}  {top}")


if __name__ == "__main__":
    main()
