"""Sarathi-style scheduler: continuous batching, decodes first, prefills chunked to a token budget.

Every step gets a budget of ``max_num_batched_tokens`` tokens and at most ``max_num_seqs`` running
sequences. The step is filled in this order (stall-free batching, Sarathi-Serve):

1. every running sequence in the decode phase gets its one token; if the cache has no block for it,
   the most recently admitted running sequence is *preempted by recomputation* (its blocks are
   freed, its prompt and generated tokens will be prefilled again) until the block fits;
2. running sequences whose prefill is not finished get the next chunk (as much of the budget as is left);
3. waiting sequences are admitted first come, first served (the head of the queue blocks the rest,
   so nobody is overtaken), each with a chunk of what is left of the budget.

A sequence's tokens are ``prompt + output``; ``num_computed`` of them have K/V in the cache. A
scheduled chunk that reaches the last token yields logits that are sampled; earlier chunks do not.

A sequence whose prompt was prefilled elsewhere (``imported``: its K/V come with it) is admitted in
step 3 without a prefill chunk: it gets blocks for its prompt and goes to ``SchedulerOutput.imported``,
where the engine writes the K/V into them (and samples the first token from the imported logits).
Preempted, it is imported again on readmission and only its generated tokens are recomputed.

With prefix caching (the block manager's), a sequence admitted in step 3 starts from the cached blocks
that hold its first tokens: its first chunk begins after them. A block is registered when the chunk
(or decode token) that fills it is scheduled, not after the step: every attention backend writes a
step's K/V into the cache before its attention reads it, layer by layer, so a sequence admitted later
in the same step (e.g. the other choices of an ``n > 1`` request) reads what the first writes. A
preempted sequence finds its own blocks there again, unless they were reclaimed meanwhile.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from gpulab.vajra.block_manager import BlockManager
from gpulab.vajra.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Optional[str | int] = None  # the stop string or stop token id that ended it (None for EOS)
    num_preemptions: int = 0
    first_scheduled_time: Optional[float] = None
    token_times: list[float] = field(default_factory=list)  # wall time of each output token
    detok: object = None  # IncrementalDetokenizer, set by the engine
    imported: object = None  # PrefilledPrompt when the prompt was prefilled elsewhere
    logprobs: list = field(default_factory=list)  # per output token, when params.logprobs is set
    prompt_logprobs: list = field(default_factory=list)  # per prompt token after the first (params.prompt_logprobs)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # query tokens this step
    start: int  # first position
    sample: bool  # this chunk reaches the last token: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    imported: list[Sequence] = field(default_factory=list)  # admitted with an imported prompt K/V

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        return bool(self.scheduled) and all(s.num_tokens == 1 and s.sample for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled and not self.imported


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, max_prefill_chunk: int | None = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk or max_num_batched_tokens
        self.watermark_blocks = int(watermark * block_manager.capacity_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0
        # prefix caching: tokens of the sequences admitted (readmissions too) and, of those, found cached
        self.prefix_tokens_queried = 0
        self.prefix_tokens_hit = 0
        self._blocked: Optional[tuple] = None  # (head of the queue, free blocks, any running) when it last did not fit

    # --- queue management ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished, drop it from its queue and free its blocks."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # back into the queue in arrival order: it was admitted before everybody still waiting
        self.waiting.appendleft(seq)
        if len(self.waiting) > 1 and self.waiting[1].arrival_time < seq.arrival_time:
            self.waiting = deque(sorted(self.waiting, key=lambda s: (s.arrival_time, s.seq_id)))

    # --- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        done: set[int] = set()

        # 1. decodes, oldest first; preempt the newest to make room
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.remaining != 1:
                i += 1
                continue
            target = seq.num_computed + 1
            if not self.bm.has_room(seq.seq_id, target):  # usually the last block still has a free slot
                while not self.bm.can_allocate(seq.seq_id, target):
                    victim = self.running[-1]  # at index >= i: not scheduled in this step (seq itself, at worst)
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    continue  # seq itself was preempted; running[i] is now the next one
                self.bm.allocate(seq.seq_id, target)
            if self.bm.prefix_caching and target % self.bm.block_size == 0:  # this token fills a block
                self.bm.commit(seq.seq_id, seq.token_ids, target)
            out.append(ScheduledSeq(seq, 1, seq.num_computed, True))
            done.add(seq.seq_id)
            budget -= 1
            i += 1

        # 2. unfinished prefills of running sequences, oldest first
        for seq in self.running:
            if budget <= 0:
                break
            if seq.seq_id in done or seq.remaining <= 1:
                continue
            want = min(seq.remaining, budget, self.max_prefill_chunk)
            chunk = self._fit_chunk(seq, want, reserve=0)
            while chunk <= 0 and self.running[-1] is not seq and self.running[-1].seq_id not in done:
                # no block for the oldest unfinished prefill: preempt the newest (no deadlock when the
                # cache is full of half-prefilled sequences)
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                chunk = self._fit_chunk(seq, want, reserve=0)
            if chunk <= 0:
                continue
            self._schedule_chunk(seq, chunk, out)
            done.add(seq.seq_id)
            budget -= chunk

        # 3. admit waiting sequences, first come first served
        imported: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.imported is not None and seq.num_computed == 0:
                if not self._admit_imported(seq):
                    break
                imported.append(seq)
                if seq.remaining == 0:  # first admission: the first output token comes from the import
                    continue
            # a waiting sequence needs a block of its own whatever it matches (its last token is computed, never into
            # a shared block): newly registered blocks cannot make it fit, only freed ones can
            state = (seq.seq_id, self.bm.num_free, bool(self.running))
            if state == self._blocked:  # it did not fit last time and nothing has changed since
                break
            matched = self._match_prefix(seq)
            chunk = min(seq.remaining, budget, self.max_prefill_chunk)
            # keep a few blocks back so that running decodes do not preempt right away
            chunk = self._fit_chunk(seq, chunk, reserve=self.watermark_blocks if self.running else 0)
            if chunk <= 0:
                if matched:  # not admitted: it holds no block while it waits
                    self.bm.free(seq.seq_id)
                    seq.num_computed = 0
                    self._blocked = state  # (its prefix match is not repeated until blocks free up)
                break
            if seq.status is not Status.RUNNING:
                self._start(seq)
                if self.bm.prefix_caching and seq.params.prompt_logprobs is None:
                    self.prefix_tokens_queried += seq.num_tokens
                    self.prefix_tokens_hit += matched
            self._schedule_chunk(seq, chunk, out)
            done.add(seq.seq_id)
            budget -= chunk
        return SchedulerOutput(out, preempted, imported)

    def _start(self, seq: Sequence) -> None:
        self.waiting.popleft()
        seq.status = Status.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.perf_counter()
        self.running.append(seq)

    def _match_prefix(self, seq: Sequence) -> int:
        """Prefix caching: a sequence about to be admitted with nothing computed takes the cached blocks of its
        first tokens, which then count as computed. At least its last token is left to compute (its logits
        give the next sample), so a sequence never writes into a block it shares. Not for a sequence whose
        prompt logprobs are wanted: they need every prompt row through the model."""
        if not self.bm.prefix_caching or seq.num_computed or seq.params.prompt_logprobs is not None:
            return 0
        seq.num_computed = self.bm.match_prefix(seq.seq_id, seq.token_ids, seq.num_tokens - 1)
        return seq.num_computed

    def _admit_imported(self, seq: Sequence) -> bool:
        """Blocks for an imported prompt (its K/V need no compute); False when they do not fit."""
        reserve = self.watermark_blocks if self.running else 0
        if not self.bm.can_allocate(seq.seq_id, seq.prompt_len, reserve):
            return False
        self._start(seq)
        self.bm.allocate(seq.seq_id, seq.prompt_len)
        seq.num_computed = seq.prompt_len
        return True

    def _fit_chunk(self, seq: Sequence, chunk: int, reserve: int) -> int:
        if chunk <= 0:
            return 0
        if self.bm.can_allocate(seq.seq_id, seq.num_computed + chunk, reserve):
            return chunk
        room = self.bm.max_tokens_fitting(seq.seq_id, reserve) - seq.num_computed
        return max(0, min(chunk, room))

    def _schedule_chunk(self, seq: Sequence, chunk: int, out: list[ScheduledSeq]) -> None:
        end = seq.num_computed + chunk
        self.bm.allocate(seq.seq_id, end)
        if self.bm.prefix_caching and end // self.bm.block_size > seq.num_computed // self.bm.block_size:
            self.bm.commit(seq.seq_id, seq.token_ids, end)  # the blocks this chunk fills
        out.append(ScheduledSeq(seq, chunk, seq.num_computed, seq.num_computed + chunk == seq.num_tokens))
