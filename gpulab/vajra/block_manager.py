"""Paged KV-cache block manager: a free list of fixed-size blocks and one block table per sequence.

Block 0 is reserved as the *null block*: padded rows of a CUDA-graph decode batch write their
K/V there and block tables are padded with 0, so it is never handed to a sequence. A sequence's
table grows as its tokens are scheduled (:meth:`BlockManager.allocate`) and goes back to the free
list when it finishes or is preempted (:meth:`BlockManager.free`). ``num_used`` returning to 0 after a
run is the accounting invariant the tests check.

With ``prefix_caching`` (automatic prefix caching, as vLLM's ``--enable-prefix-caching``), a *full* block
is registered under its content (the tokens it holds and the block before it in the sequence) once the
step that writes its K/V is scheduled (:meth:`BlockManager.commit`; the scheduler says why that is early
enough). A new sequence first takes the registered blocks that hold
its own first tokens (:meth:`BlockManager.match_prefix`): those tokens need no prefill. Blocks are
reference-counted; a registered block that nobody holds any more stays in the cache, counted as free,
until an allocation needs it (least recently freed first; a sequence's later blocks go before its
earlier ones, so that a cached prefix loses its tail first). A block's content key is exact (the
token tuple and the *registration number* of the block before it, never reused), so there are no hash
collisions, and a block evicted and refilled can never be matched under its old content.

:func:`num_blocks_for_memory` sizes the cache from free GPU memory and a utilization fraction.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from gpulab.core.errors import InputError

NULL_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if block_size < 1:
            raise InputError(f"block size must be >= 1, got {block_size}")
        if num_blocks < 2:
            raise InputError(f"the KV cache needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self._free: list[int] = list(range(self.num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._tables: dict[int, list[int]] = {}
        # the same tables as rows of one int32 array (NULL_BLOCK-padded), so that a step's block tables are
        # one fancy-indexing read instead of a Python loop over every sequence's list
        self._rows: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._array = np.full((0, 0), NULL_BLOCK, dtype=np.int32)
        # prefix caching: holders per block; the registered blocks by content key (registration number of
        # the block before, its tokens) and each one's key and number; registered blocks nobody holds, oldest
        # first (free for allocation, reclaimed from the cache when _free is empty); per sequence, how many of
        # its blocks are registered and the number of the last of them
        self.prefix_caching = bool(prefix_caching)
        self._refs = [0] * self.num_blocks
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._committed: dict[int, tuple[int, int]] = {}
        self._next_number = 1  # 0: "no block before" (a sequence's first block)

    # --- queries -------------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> int:
        """Blocks a sequence can ever get (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used, or cached but held by nobody."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Registered blocks (prefix caching), held or not."""
        return len(self._key_of)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (a shared block counts once)."""
        return self.capacity_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def has_room(self, seq_id: int, num_tokens: int) -> bool:
        """``seq_id``'s blocks already hold ``num_tokens`` tokens (most decode steps: nothing to allocate)."""
        return num_tokens <= len(self._tables.get(seq_id, ())) * self.block_size

    def can_allocate(self, seq_id: int, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq_id, num_tokens) + reserve <= self.num_free

    def max_tokens_fitting(self, seq_id: int, reserve: int = 0) -> int:
        """The most tokens ``seq_id`` could hold in total with the free blocks beyond ``reserve``."""
        have = len(self._tables.get(seq_id, ()))
        return (have + max(0, self.num_free - reserve)) * self.block_size

    # --- changes -------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; returns the table."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: sequence {seq_id} needs {need}, {self.num_free} free")
        table = self._tables.setdefault(seq_id, [])
        if need:
            start = len(table)
            for _ in range(need):
                table.append(self._take())
            self._put_row(seq_id, table, start)
        return table

    def _take(self) -> int:
        """A block for a sequence: a never-used one, else the cached block idle the longest (evicted)."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._idle.popitem(last=False)
            key, _ = self._key_of.pop(b)
            del self._cached[key]
        self._refs[b] = 1
        return b

    def _put_row(self, seq_id: int, table: list[int], start: int) -> None:
        row = self._row(seq_id, len(table))
        self._array[row, start:len(table)] = table[start:]

    def _row(self, seq_id: int, width: int) -> int:
        """``seq_id``'s row of the table array, with at least ``width`` columns (the array grows by doubling)."""
        row = self._rows.get(seq_id)
        if row is None:
            if not self._free_rows:
                n, grown = self._array.shape[0], max(8, 2 * self._array.shape[0])
                self._grow(grown, self._array.shape[1])
                self._free_rows = list(range(grown - 1, n - 1, -1))
            row = self._rows[seq_id] = self._free_rows.pop()
        if width > self._array.shape[1]:
            self._grow(self._array.shape[0], max(width, 2 * self._array.shape[1]))
        return row

    def _grow(self, rows: int, cols: int) -> None:
        bigger = np.full((rows, cols), NULL_BLOCK, dtype=np.int32)
        r, c = self._array.shape
        bigger[:r, :c] = self._array
        self._array = bigger

    def free(self, seq_id: int) -> int:
        """Let go of every block of ``seq_id``; returns how many it held. A block nobody holds any more goes
        back to the free list, or, when it is registered (prefix caching), stays cached and idle."""
        table = self._tables.pop(seq_id, None)
        row = self._rows.pop(seq_id, None)
        self._committed.pop(seq_id, None)
        if row is not None:
            self._array[row, :len(table or ())] = NULL_BLOCK
            self._free_rows.append(row)
        if not table:
            return 0
        if not self.prefix_caching:  # nothing is shared or cached: every block goes back to the free list
            self._free.extend(reversed(table))
            return len(table)
        for b in reversed(table):  # the tail first: it is evicted before the head
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        return len(table)

    # --- prefix caching ------------------------------------------------------------------------
    def match_prefix(self, seq_id: int, token_ids: Sequence[int], limit: int) -> int:
        """Give ``seq_id`` (which holds no block yet) the registered blocks that hold its first tokens, at most
        ``limit`` tokens' worth (whole blocks); returns how many tokens they hold (their K/V are in the cache)."""
        if not self.prefix_caching:
            return 0
        if self._tables.get(seq_id):
            raise RuntimeError(f"sequence {seq_id} already holds blocks; a prefix is matched before any")
        bs = self.block_size
        table: list[int] = []
        before = 0
        for i in range(max(0, min(int(limit), len(token_ids))) // bs):
            b = self._cached.get((before, tuple(token_ids[i * bs:(i + 1) * bs])))
            if b is None:
                break
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
            table.append(b)
            before = self._key_of[b][1]
        if table:
            self._tables[seq_id] = table
            self._put_row(seq_id, table, 0)
            self._committed[seq_id] = (len(table), before)
        return len(table) * bs

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register ``seq_id``'s full blocks among its first ``num_computed`` tokens (their K/V are written, or
        written by the step being scheduled), so that sequences starting with the same tokens can share them.
        A block whose content another block already holds stays private (the sequence keeps it; it is freed as
        usual)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        done, before = self._committed.get(seq_id, (0, 0))
        full = int(num_computed) // bs
        if full <= done:
            return
        table = self._tables[seq_id]
        for i in range(done, full):
            key = (before, tuple(token_ids[i * bs:(i + 1) * bs]))
            b = self._cached.get(key)
            if b is None:
                b = table[i]
                number = self._next_number
                self._next_number += 1
                self._cached[key] = b
                self._key_of[b] = (key, number)
            before = self._key_of[b][1]
        self._committed[seq_id] = (full, before)

    def reset_prefix_cache(self) -> int:
        """Forget every registered block that nobody holds (they become plain free blocks); returns how many.
        Blocks still held keep their registration."""
        n = len(self._idle)
        for b in self._idle:
            key, _ = self._key_of.pop(b)
            del self._cached[key]
            self._free.append(b)
        self._idle.clear()
        return n

    def table_array(self, seq_ids: Sequence[int]) -> np.ndarray:
        """The block tables of ``seq_ids`` as one new int32 array [len(seq_ids), longest table], NULL_BLOCK-padded
        (a sequence without blocks gets a row of NULL_BLOCK)."""
        width = max((len(self._tables.get(i, ())) for i in seq_ids), default=0)
        rows = [self._rows.get(i, -1) for i in seq_ids]
        if -1 not in rows:
            return self._array[rows, :max(width, 1)]
        out = np.full((len(seq_ids), max(width, 1)), NULL_BLOCK, dtype=np.int32)
        for k, r in enumerate(rows):
            if r >= 0:
                out[k, :width] = self._array[r, :width]
        return out

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Cache slots (``block * block_size + offset``) of token positions ``start .. end-1``."""
        table = self._tables[seq_id]
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]


def num_blocks_for_memory(model: Any, block_size: int, kv_cache_dtype: Any, *, utilization: float,
                          device: Any, reserve_bytes: int = 0) -> int:
    """Blocks that fit in ``utilization`` of the GPU's memory, after what is already in use.

    ``utilization`` is the fraction of the total memory this process may hold (weights, activations
    and the cache together), as in vLLM's ``gpu_memory_utilization``. A margin for activations of
    the largest step is kept by the caller's profiling step (it runs one max-size step first), and
    ``reserve_bytes`` for buffers that grow later and persist (the logits processor's).
    """
    import torch

    if not (0.0 < utilization <= 1.0):
        raise InputError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise InputError("sizing the KV cache from free memory needs a GPU; give --num-blocks on the CPU")
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    current = torch.cuda.memory_allocated(dev)
    used_by_others = (total - free) - torch.cuda.memory_reserved(dev)
    budget = utilization * total - used_by_others - max(peak, current) - reserve_bytes
    per_block = int(model.kv_bytes_per_block(block_size, kv_cache_dtype))
    blocks = int(budget // per_block)
    if blocks < 2:
        raise InputError(
            f"no room for the KV cache: {budget / 2**30:.2f} GiB left at utilization {utilization} "
            f"({per_block} bytes per block); raise --gpu-memory-utilization or free GPU memory")
    return blocks
