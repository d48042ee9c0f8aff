"""Triton kernel of the tensor-core join-aggregate (see tensorcore_aggregate.py); imports triton at import time.

Set TRITON_INTERPRET=1 before importing this module to run it on the CPU (fp32 codes only).

The match matrix E always comes from the tensor-core product of the key codes. The per-row count and payload
sum over E's columns are formed one of two ways (constexpr AGG_DOT, chosen in tensorcore_aggregate.py):

* AGG_DOT True: a second product tl.dot(E, P) with the limb matrix P (:func:`_payload_matrix`). Used only for
  int8 aggregate products: on an NVIDIA H200 with Triton 3.6 (2026-11-27) int8's second dot was correct.
* AGG_DOT False: plain int64 reductions over E (no second dot), for fp16/bf16/fp32 aggregate types. On that
  H200 the fp16/bf16 chained dot (one dot's result as the next dot's A operand, which Triton on Hopper may take
  straight from the MMA accumulator registers; cf. triton issue #6124) gave wrong groups and then an illegal
  memory access. The reduction path has not yet been run on a GPU (only the interpreter).
"""
import triton
import triton.language as tl

from gpulab.core.triton_compat import patch_interpreter
from gpulab.dbjoin.tensorcore_kernel import _code_product, _tile_codes, _tile_words

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)

NLIMB = 5  # 7-bit limbs of (payload + 2^31): 35 bits >= 32
LIMB_BITS = 7
COUNT_COL = 5  # the all-ones column of the payload matrix: its product is the match count
PCOLS = 16  # payload matrix width (tl.dot needs N >= 16)


@triton.jit
def _payload_matrix(pay, valid, WITH_SUMS: tl.constexpr, DT: tl.constexpr):
    """[rows, 16] matrix: 7-bit limbs of pay + 2^31 in columns 0-4 (sums only), 1 in column 5, else 0."""
    col = tl.arange(0, 16)
    u = pay.to(tl.int64) + 2147483648
    shift = (tl.minimum(col, 4) * 7).to(tl.int64)  # < 64: no undefined shift in unused columns
    limb = (u[:, None] >> shift[None, :]) & 127
    if WITH_SUMS:
        m = tl.where(col[None, :] < 5, limb, 0)
    else:
        m = tl.zeros_like(limb)
    m = tl.where(col[None, :] == 5, 1, m)
    return tl.where(valid[:, None], m, 0).to(DT)


@triton.jit
def _limb_sums(y, WITH_SUMS: tl.constexpr):
    """(count, payload sum) per row from the [rows, 16] product with the payload matrix, exact in int64."""
    col = tl.arange(0, 16)
    yi = y.to(tl.int64)
    cnt = tl.sum(tl.where(col[None, :] == 5, yi, 0), axis=1)
    if WITH_SUMS:
        w = tl.where(col < 5, tl.full([16], 1, tl.int64) << (tl.minimum(col, 4) * 7).to(tl.int64), 0)
        w = tl.where(col == 5, -2147483648, w)  # minus the 2^31 offset once per counted row
        s = tl.sum(yi * w[None, :], axis=1)
    else:
        s = cnt * 0
    return cnt, s


@triton.jit
def _match_sums(eq, pay, valid, WITH_SUMS: tl.constexpr, ADT: tl.constexpr, AGG_DOT: tl.constexpr):
    """(count, payload sum) per row of the [rows, cols] match matrix ``eq`` (bool) over its valid columns,
    exact in int64. AGG_DOT: as tl.dot(eq, payload matrix) in type ADT (see the module docstring); else plain
    int64 reductions (no second dot)."""
    if AGG_DOT:
        cnt, s = _limb_sums(tl.dot(eq.to(ADT), _payload_matrix(pay, valid, WITH_SUMS, ADT)), WITH_SUMS)
    else:
        m = eq & valid[None, :]
        cnt = tl.sum(m.to(tl.int64), axis=1)
        if WITH_SUMS:
            s = tl.sum(tl.where(m, pay[None, :].to(tl.int64), 0), axis=1)
        else:
            s = cnt * 0
    return cnt, s


# Runtime sizes are not specialized, so one compile serves every table size (see tensorcore_kernel).
@triton.jit(do_not_specialize=["R", "KUSED"])
def tc_agg_kernel(l_lo, l_hi, l_key, l_pay, l_start, l_cnt, r_lo, r_hi, r_pay, r_start, r_cnt,
                  out_key, out_count, out_suml, out_sumr, counter,
                  R, KUSED, HAS_HI: tl.constexpr,
                  BM: tl.constexpr, DT: tl.constexpr, ADT: tl.constexpr, WITH_SUMS: tl.constexpr,
                  AGG_DOT: tl.constexpr):
    """One program per partition; DT: the key codes' type, ADT: the aggregate product's (DT, or fp16 where
    int8 has too short a reduction: BM 16 < 32). AGG_DOT: count and sum over E's columns as a second tl.dot
    (True; only for int8 ADT, the one type whose chained dot was correct on an H200 with Triton 3.6) or as int64
    reductions over E (False; fp16/bf16 chained dots gave wrong groups and an illegal address there; not yet
    run on a GPU). For each BM tile of its left rows (BM = BN):

    1. E = (codes(left tile) . codes(right tile)^T == K) for every right tile (always tl.dot of the codes);
       per left row cR and SR: the right count and payload sum of its key (tl.dot(E, P_right), column 5 and
       the limb columns, or row sums of E and of E * payload).
    2. Only when some left row of the tile has cR > 0: the same against every left tile of the partition
       gives cL and SL, and the number of equal keys at earlier left positions (0: the row represents its key).
    3. Representatives with cR > 0 append (key, cL*cR, SL*cR, SR*cL) with one atomic per tile.
    """
    p = tl.program_id(0)
    ls = tl.load(l_start + p)
    ln = tl.load(l_cnt + p)
    rs = tl.load(r_start + p)
    rn = tl.load(r_cnt + p)
    n_lt = tl.cdiv(ln, BM)
    n_rt = tl.cdiv(rn, BM)
    for mt in range(0, n_lt):
        om = mt * BM + tl.arange(0, BM)
        mm = om < ln
        a_lo, a_hi = _tile_words(l_lo + ls, l_hi + ls, om, mm, HAS_HI)
        ca_lo, ca_hi = _tile_codes(a_lo, a_hi, mm, R, HAS_HI, True, DT)
        c_r = tl.zeros([BM], tl.int64)
        s_r = tl.zeros([BM], tl.int64)
        for nt in range(0, n_rt):
            on = nt * BM + tl.arange(0, BM)
            nm = on < rn
            b_lo, b_hi = _tile_words(r_lo + rs, r_hi + rs, on, nm, HAS_HI)
            cb_lo, cb_hi = _tile_codes(b_lo, b_hi, nm, R, HAS_HI, False, DT)
            e = _code_product(ca_lo, ca_hi, cb_lo, cb_hi, HAS_HI) == KUSED
            pay = tl.load(r_pay + rs + on, mask=nm, other=0)
            c, s = _match_sums(e, pay, nm, WITH_SUMS, ADT, AGG_DOT)
            c_r += c
            s_r += s
        if tl.sum((c_r > 0).to(tl.int32), axis=0) > 0:
            c_l = tl.zeros([BM], tl.int64)
            s_l = tl.zeros([BM], tl.int64)
            earlier = tl.zeros([BM], tl.int32)
            for nt in range(0, n_lt):
                on = nt * BM + tl.arange(0, BM)
                nm = on < ln
                b_lo, b_hi = _tile_words(l_lo + ls, l_hi + ls, on, nm, HAS_HI)
                cb_lo, cb_hi = _tile_codes(b_lo, b_hi, nm, R, HAS_HI, False, DT)
                eq = _code_product(ca_lo, ca_hi, cb_lo, cb_hi, HAS_HI) == KUSED
                earlier += tl.sum((eq & (on[None, :] < om[:, None])).to(tl.int32), axis=1)
                pay = tl.load(l_pay + ls + on, mask=nm, other=0)
                c, s = _match_sums(eq, pay, nm, WITH_SUMS, ADT, AGG_DOT)
                c_l += c
                s_l += s
            emit = mm & (c_r > 0) & (earlier == 0)
            flag = emit.to(tl.int32)
            n = tl.sum(flag, axis=0)
            if n > 0:
                base = tl.atomic_add(counter, n.to(tl.int64))
                pos = base + (tl.cumsum(flag, axis=0) - flag).to(tl.int64)
                key = tl.load(l_key + ls + om, mask=mm, other=0).to(tl.int64)
                tl.store(out_key + pos, key, mask=emit)
                tl.store(out_count + pos, c_l * c_r, mask=emit)
                if WITH_SUMS:
                    tl.store(out_suml + pos, s_l * c_r, mask=emit)
                    tl.store(out_sumr + pos, s_r * c_l, mask=emit)
