"""Triton kernel of the tensor-core join (see tensorcore_join.py); imports triton at import time.

Set TRITON_INTERPRET=1 before importing this module to run it on the CPU (fp32 codes only).
"""
import triton
import triton.language as tl

from gpulab.core.triton_compat import patch_interpreter

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)


@triton.jit
def _word_codes(word, valid, R, SKIP: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """+-1 codes of one 32-bit mixed word per row, [rows, 32] or [32, rows]: its bits R..31 where SKIP (the low
    word, whose low R bits are the partition id, equal within a partition), else all 32; 0 for the other code
    columns and for padding rows."""
    j = tl.arange(0, 32)
    if SKIP:
        shift = (j + R) & 31
        use = j < 32 - R
    else:
        shift = j
        use = j < 32
    if ROWS_FIRST:
        bit = (word[:, None] >> shift[None, :]) & 1
        ok = use[None, :] & valid[:, None]
    else:
        bit = (word[None, :] >> shift[:, None]) & 1
        ok = use[:, None] & valid[None, :]
    return tl.where(ok, bit * 2 - 1, 0)


@triton.jit
def _tile_words(lo_ptr, hi_ptr, offs, valid, HAS_HI: tl.constexpr):
    """One tile's mixed words (low, and high for 64-bit keys; the low one again for 32-bit keys)."""
    lo = tl.load(lo_ptr + offs, mask=valid, other=0)
    hi = lo
    if HAS_HI:
        hi = tl.load(hi_ptr + offs, mask=valid, other=0)
    return lo, hi


@triton.jit
def _tile_codes(lo, hi, valid, R, HAS_HI: tl.constexpr, ROWS_FIRST: tl.constexpr, DT: tl.constexpr):
    """The +-1 codes of a tile's words in DT, one 32-column block per word: (low word's, high word's); the
    second is the first again for 32-bit keys."""
    c_lo = _word_codes(lo, valid, R, True, ROWS_FIRST).to(DT)
    c_hi = c_lo
    if HAS_HI:
        c_hi = _word_codes(hi, valid, R, False, ROWS_FIRST).to(DT)
    return c_lo, c_hi


@triton.jit
def _code_product(a_lo, a_hi, b_lo, b_hi, HAS_HI: tl.constexpr):
    """codes(left) . codes(right)^T as one product per 32-bit word, accumulated: K = KUSED exactly where all coded
    bits agree. Split by word (not one K = 64 product) so that half the codes are live at a time: the sm_90 build
    of the join kernel (int64 keys, BM = 64) needed 255 registers and spilled with 64-wide codes, 135 split
    (Triton 3.8)."""
    acc = tl.dot(a_lo, b_lo)
    if HAS_HI:
        acc = tl.dot(a_hi, b_hi, acc, out_dtype=acc.dtype)  # int32 for int8 codes (Triton 3.6 assumes fp32)
    return acc

# Runtime sizes are not specialized (no recompiles for R == 1, sizes divisible by 16, ...): one compile per
# constexpr combination, so the timed calls never hit the compiler.
@triton.jit(do_not_specialize=["capacity", "R", "KUSED"])
def tc_join_kernel(l_lo, l_hi, l_row, l_start, l_cnt, r_lo, r_hi, r_row, r_start, r_cnt,
                   out_l, out_r, capacity, counter,
                   R, KUSED, HAS_HI: tl.constexpr,
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
        a_lo, a_hi = _tile_words(l_lo + ls, l_hi + ls, om, mm, HAS_HI)
        ca_lo, ca_hi = _tile_codes(a_lo, a_hi, mm, R, HAS_HI, True, DT)
        a_row = tl.load(l_row + ls + om, mask=mm, other=0)
        for nt in range(0, n_nt):
            on = nt * BN + tl.arange(0, BN)
            nm = on < rn
            b_lo, b_hi = _tile_words(r_lo + rs, r_hi + rs, on, nm, HAS_HI)
            cb_lo, cb_hi = _tile_codes(b_lo, b_hi, nm, R, HAS_HI, False, DT)
            match = (_code_product(ca_lo, ca_hi, cb_lo, cb_hi, HAS_HI) == KUSED).to(tl.int32)
            rc = tl.sum(match, axis=1)  # matches of each left row in this tile
            n = tl.sum(rc, axis=0)
            if n > 0:
                base = tl.atomic_add(counter, n.to(tl.int64))
                if not COUNT_ONLY:
                    b_row = tl.load(r_row + rs + on, mask=nm, other=0)
                    _emit(match, rc, a_row, b_row, base, out_l, out_r, capacity, l_lo + ls, l_hi + ls, l_row + ls,
                          mt * BM, ln, b_lo, b_hi, nm, HAS_HI, BM, BN)


@triton.jit
def _emit(match, rc, a_row, b_row, base, out_l, out_r, capacity, l_lo, l_hi, l_row, row0, ln, b_lo, b_hi, nm,
          HAS_HI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Write one tile's matches (match[i, j] = 1: left row a_row[i] joins right row b_row[j]) at base onwards.
    The usual tile (one side's keys unique in it: at most one match per row, or per column) is written one
    entry per row (or column), its right (left) row id picked out by a masked sum, with a scan of BM (BN)
    counts; only a tile with duplicates on both sides writes entry by entry (:func:`_emit_dense`)."""
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
            _emit_dense(l_lo, l_hi, l_row, row0, ln, b_lo, b_hi, nm, b_row, base, out_l, out_r, capacity, HAS_HI,
                        BM, BN)


@triton.jit
def _emit_dense(l_lo, l_hi, l_row, row0, ln, b_lo, b_hi, nm, b_row, base, out_l, out_r, capacity,
                HAS_HI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The matches of a tile with duplicate keys on both sides, row by row in slices of 16 left rows: the same
    matrix as the product's (within a partition, all coded bits agree exactly where the mixed words are equal),
    recomputed as word equality from the left words reloaded, so that no BM x BN scan and no second copy of the
    codes is live: as one flattened BM x BN scan this rare branch set the register count of the whole kernel
    (255 with spills on sm_90 at BM = 64). Entry (i, j) goes to base + the matches of the rows before i + those
    before j in row i."""
    SL: tl.constexpr = 16
    sbase = base
    for s0 in range(0, BM, SL):
        om = row0 + s0 + tl.arange(0, SL)
        mm = om < ln
        eq = (tl.load(l_lo + om, mask=mm, other=0)[:, None] == b_lo[None, :]) & mm[:, None] & nm[None, :]
        if HAS_HI:
            eq = eq & (tl.load(l_hi + om, mask=mm, other=0)[:, None] == b_hi[None, :])
        m = eq.to(tl.int32)
        rcs = tl.sum(m, axis=1)
        rel = (tl.cumsum(rcs, axis=0) - rcs)[:, None] + (tl.cumsum(m, axis=1) - m)
        room = tl.minimum(tl.maximum(capacity - sbase, 0), SL * BN).to(tl.int32)  # entries that still fit
        ok = (m > 0) & (rel < room)
        a_row = tl.load(l_row + om, mask=mm, other=0)
        tl.store(out_l + sbase + rel, tl.broadcast_to(a_row[:, None], (SL, BN)), mask=ok)
        tl.store(out_r + sbase + rel, tl.broadcast_to(b_row[None, :], (SL, BN)), mask=ok)
        sbase += tl.sum(rcs, axis=0).to(tl.int64)


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
