"""Triton kernel of the tensor-core join (see tensorcore_join.py); imports triton at import time.

Set TRITON_INTERPRET=1 before importing this module to run it on the CPU (fp32 codes only).
"""
import triton
import triton.language as tl

from gpulab.core.triton_compat import patch_interpreter

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)


@triton.jit
def _codes(lo, hi, valid, R, KUSED, KP: tl.constexpr, HAS_HI: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """+-1 codes of the K used mixed bits (0 for padding rows and bits): [rows, KP] or [KP, rows]."""
    j = tl.arange(0, KP)
    NLO = 32 - R
    from_lo = j < NLO
    shift = tl.where(from_lo, j + R, j - NLO) & 31
    use = j < KUSED
    if ROWS_FIRST:
        word = lo[:, None]
        if HAS_HI:
            word = tl.where(from_lo[None, :], lo[:, None], hi[:, None])
        bit = (word >> shift[None, :]) & 1
        ok = use[None, :] & valid[:, None]
    else:
        word = lo[None, :]
        if HAS_HI:
            word = tl.where(from_lo[:, None], lo[None, :], hi[None, :])
        bit = (word >> shift[:, None]) & 1
        ok = use[:, None] & valid[None, :]
    return tl.where(ok, bit * 2 - 1, 0)


@triton.jit
def _tile_codes(lo_ptr, hi_ptr, offs, valid, R, KUSED, KP: tl.constexpr, HAS_HI: tl.constexpr,
                ROWS_FIRST: tl.constexpr):
    """Load one tile's mixed keys (low word, and high word for 64-bit keys) and return their +-1 codes."""
    lo = tl.load(lo_ptr + offs, mask=valid, other=0)
    hi = lo
    if HAS_HI:
        hi = tl.load(hi_ptr + offs, mask=valid, other=0)
    return _codes(lo, hi, valid, R, KUSED, KP, HAS_HI, ROWS_FIRST)

# Runtime sizes are not specialized (no recompiles for R == 1, sizes divisible by 16, ...): one compile per
# constexpr combination, so the timed calls never hit the compiler.
@triton.jit(do_not_specialize=["capacity", "R", "KUSED"])
def tc_join_kernel(l_lo, l_hi, l_row, l_start, l_cnt, r_lo, r_hi, r_row, r_start, r_cnt,
                   out_l, out_r, capacity, counter,
                   R, KUSED, KP: tl.constexpr, HAS_HI: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, COUNT_ONLY: tl.constexpr):
    p = tl.program_id(0)
    ls = tl.load(l_start + p)
    ln = tl.load(l_cnt + p)
    rs = tl.load(r_start + p)
    rn = tl.load(r_cnt + p)
    n_mt = tl.cdiv(ln, BM)
    n_nt = tl.cdiv(rn, BN)
    for mt in range(0, n_mt):
        om = mt * BM + tl.arange(0, BM)
        mm = om < ln
        a = _tile_codes(l_lo + ls, l_hi + ls, om, mm, R, KUSED, KP, HAS_HI, True).to(DT)
        a_row = tl.load(l_row + ls + om, mask=mm, other=0)
        for nt in range(0, n_nt):
            on = nt * BN + tl.arange(0, BN)
            nm = on < rn
            b = _tile_codes(r_lo + rs, r_hi + rs, on, nm, R, KUSED, KP, HAS_HI, False).to(DT)
            acc = tl.dot(a, b)
            match = (acc == KUSED).to(tl.int32)
            rc = tl.sum(match, axis=1)  # matches of each left row in this tile
            n = tl.sum(rc, axis=0)
            if n > 0:
                base = tl.atomic_add(counter, n.to(tl.int64))
                if not COUNT_ONLY:
                    b_row = tl.load(r_row + rs + on, mask=nm, other=0)
                    _emit(match, rc, a_row, b_row, base, out_l, out_r, capacity, BM, BN)


@triton.jit
def _emit(match, rc, a_row, b_row, base, out_l, out_r, capacity, BM: tl.constexpr, BN: tl.constexpr):
    """Write one tile's matches (match[i, j] = 1: left row a_row[i] joins right row b_row[j]) at base onwards.
    The usual tile (one side's keys unique in it: at most one match per row, or per column) is written one
    entry per row (or column), its right (left) row id picked out by a masked sum, with a scan of BM (BN)
    counts; only a tile with duplicates on both sides pays the scan and the masked stores of all BM x BN."""
    # (each branch names its own values: Triton needs a name bound in both branches to keep one shape)
    if tl.max(rc, axis=0) <= 1:
        pos_r = base + (tl.cumsum(rc, axis=0) - rc).to(tl.int64)
        ok_r = (rc > 0) & (pos_r < capacity)
        tl.store(out_l + pos_r, a_row, mask=ok_r)
        tl.store(out_r + pos_r, tl.sum(match * b_row[None, :], axis=1), mask=ok_r)
    else:
        cc = tl.sum(match, axis=0)  # matches of each right row
        if tl.max(cc, axis=0) <= 1:
            pos_c = base + (tl.cumsum(cc, axis=0) - cc).to(tl.int64)
            ok_c = (cc > 0) & (pos_c < capacity)
            tl.store(out_l + pos_c, tl.sum(match * a_row[:, None], axis=0), mask=ok_c)
            tl.store(out_r + pos_c, b_row, mask=ok_c)
        else:
            flat = tl.reshape(match, (BM * BN,))
            pos = base + (tl.cumsum(flat, axis=0) - flat).to(tl.int64)
            lrow = tl.reshape(a_row[:, None] + tl.zeros((BM, BN), tl.int32), (BM * BN,))
            rrow = tl.reshape(b_row[None, :] + tl.zeros((BM, BN), tl.int32), (BM * BN,))
            ok = (flat > 0) & (pos < capacity)
            tl.store(out_l + pos, lrow, mask=ok)
            tl.store(out_r + pos, rrow, mask=ok)


@triton.jit
def _mul32(x, c):
    """(x * c) mod 2^32 in int64 without overflow (x, c in [0, 2^32)); as tensorcore_join._mul32."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


@triton.jit
def _to_i32(x):
    return tl.where(x >= 2147483648, x - 4294967296, x).to(tl.int32)


@triton.jit
def _mix(k, HAS_HI: tl.constexpr):
    """tensorcore_join.mix_key on int64 values: the mixed (lo, hi) 32-bit words, as int64 in [0, 2^32)."""
    lo = k & 0xFFFFFFFF
    hi = lo
    if HAS_HI:
        hi = (k >> 32) & 0xFFFFFFFF
        t = lo
        lo = hi ^ _fmix32(lo ^ 0x9E3779B9)
        hi = t
        t = lo
        lo = hi ^ _fmix32(lo ^ 0x3C6EF372)
        hi = t
        t = lo
        lo = hi ^ _fmix32(lo ^ 0xDAA66D2B)
        hi = t
    else:
        lo = _fmix32(lo)
    return lo, hi


@triton.jit(do_not_specialize=["n", "PMASK"])
def tc_hist_kernel(key, counts, n, PMASK, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """Rows per partition (atomic counts): pass 1 of the counting-sort partition; nothing else is written."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    lo, hi = _mix(tl.load(key + offs, mask=m, other=0).to(tl.int64), HAS_HI)
    tl.atomic_add(counts + (lo & PMASK).to(tl.int32), 1, mask=m)


@triton.jit(do_not_specialize=["n", "PMASK"])
def tc_scatter_kernel(key, cursor, lo_out, hi_out, row_out, n, PMASK, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: each row takes the next place of its partition (atomic cursors, started at the partition starts)
    and writes its mixed words and row id there. The order inside a partition is arbitrary (a join's is)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    lo, hi = _mix(tl.load(key + offs, mask=m, other=0).to(tl.int64), HAS_HI)
    pos = tl.atomic_add(cursor + (lo & PMASK).to(tl.int32), 1, mask=m)
    tl.store(lo_out + pos, _to_i32(lo), mask=m)
    if HAS_HI:
        tl.store(hi_out + pos, _to_i32(hi), mask=m)
    tl.store(row_out + pos, offs, mask=m)
