"""Paged KV-cache block manager: a free list of fixed-size blocks and one block table per sequence.

Block 0 is reserved as the *null block*: padded rows of a CUDA-graph decode batch write their
K/V there and block tables are padded with 0, so it is never handed to a sequence. A sequence's
table grows as its tokens are scheduled (:meth:`BlockManager.allocate`) and goes back to the free
list when it finishes or is preempted (:meth:`BlockManager.free`). ``num_used`` returning to 0 after a
run is the accounting invariant the tests check.

:func:`num_blocks_for_memory` sizes the cache from free GPU memory and a utilization fraction.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gpulab.core.errors import InputError

NULL_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
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

    # --- queries -------------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> int:
        """Blocks a sequence can ever get (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity_blocks - len(self._free)

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
        return self.blocks_needed(seq_id, num_tokens) + reserve <= len(self._free)

    def max_tokens_fitting(self, seq_id: int, reserve: int = 0) -> int:
        """The most tokens ``seq_id`` could hold in total with the free blocks beyond ``reserve``."""
        have = len(self._tables.get(seq_id, ()))
        return (have + max(0, len(self._free) - reserve)) * self.block_size

    # --- changes -------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; returns the table."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: sequence {seq_id} needs {need}, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        if need:
            start = len(table)
            for _ in range(need):
                table.append(self._free.pop())
            row = self._row(seq_id, len(table))
            self._array[row, start:len(table)] = table[start:]
        return table

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
        """Return every block of ``seq_id``; returns how many were freed."""
        table = self._tables.pop(seq_id, None)
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self._array[row, :len(table or ())] = NULL_BLOCK
            self._free_rows.append(row)
        if not table:
            return 0
        self._free.extend(reversed(table))
        return len(table)

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
                          device: Any) -> int:
    """Blocks that fit in ``utilization`` of the GPU's memory, after what is already in use.

    ``utilization`` is the fraction of the total memory this process may hold (weights, activations
    and the cache together), as in vLLM's ``gpu_memory_utilization``. A margin for activations of
    the largest step is kept by the caller's profiling step (it runs one max-size forward first).
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
    budget = utilization * total - used_by_others - max(peak, current)
    per_block = int(model.kv_bytes_per_block(block_size, kv_cache_dtype))
    blocks = int(budget // per_block)
    if blocks < 2:
        raise InputError(
            f"no room for the KV cache: {budget / 2**30:.2f} GiB left at utilization {utilization} "
            f"({per_block} bytes per block); raise --gpu-memory-utilization or free GPU memory")
    return blocks
