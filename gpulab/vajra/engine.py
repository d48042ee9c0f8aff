"""The vajra engine: requests in, tokens and text out, one scheduler step at a time.

:class:`LLMEngine` owns the model (any :class:`~gpulab.vajra.interface.VajraModelProtocol`), the paged
KV cache, the :class:`~gpulab.vajra.block_manager.BlockManager`, the Sarathi-style
:class:`~gpulab.vajra.scheduler.Scheduler`, the :class:`~gpulab.vajra.sampling.Sampler` and one
:class:`~gpulab.vajra.detokenizer.IncrementalDetokenizer` per request. :meth:`LLMEngine.step` schedules
a batch (decodes first, chunked prefills after), builds the :class:`ForwardBatch`, runs the model
(decode-only batches through captured CUDA graphs on a GPU), samples and returns the new
tokens/text of each request as :class:`RequestOutput` deltas. A token that does not end its sequence
(and whose sequence has no stop strings, which only the text shows) is detokenized in the next step,
while the device runs that step's model call: its output comes with that step's return, off the
critical path (``step_log``'s ``drain_ms``); ``has_unfinished`` stays true until none is left.

With a prefill provider (:class:`~gpulab.vajra.interface.PrefillProvider`, ``--prefill NAME=ARG``)
every prompt is prefilled by the provider when the request is added (disaggregated inference on one
device: e.g. a larger model and stitch layers, see ``gpulab kvstitch``); the engine writes the K/V it
returns into the paged cache, samples the first token from its logits and decodes the rest itself.

``EngineConfig.enable_prefix_caching`` (``--enable-prefix-caching``): the scheduler registers each full
block in the block manager when the step that writes its K/V is scheduled, and a new request whose first
tokens fill registered blocks skips their prefill (see :mod:`~gpulab.vajra.block_manager` and
:mod:`~gpulab.vajra.scheduler`).
"""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence as Seq

from gpulab.core.errors import InputError, series
from gpulab.vajra.block_manager import NULL_BLOCK, BlockManager, num_blocks_for_memory
from gpulab.vajra.cuda_graphs import DecodeGraphRunner
from gpulab.vajra.detokenizer import IncrementalDetokenizer, Tokenizer
from gpulab.vajra.logits_processors import LogitsProcessor, adjusts_logits
from gpulab.vajra.sampling import (MAX_LOGPROBS, Sampler, SamplingParams, device_tensor, logprob_entries,
                                   logprob_tensors)
from gpulab.vajra.scheduler import Scheduler, SchedulerOutput, Sequence

CPU_DEFAULT_KV_BYTES = 256 << 20  # KV cache size on the CPU when no --num-blocks is given


class PromptRows(NamedTuple):
    """A step's prompt tokens to score (echo): their rows in the flattened batch (on the device), the prompt
    tokens they predict, k per row, and (sequence, number of its rows) in row order."""
    rows: Any
    targets: list[int]
    ks: list[int]
    owners: list[tuple[Sequence, int]]


@dataclass
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: from free memory (GPU) or CPU_DEFAULT_KV_BYTES
    gpu_memory_utilization: float = 0.90
    kv_cache_dtype: str = "auto"
    cuda_graphs: bool = True
    max_model_len: Optional[int] = None  # None: the model's
    watermark: float = 0.01
    max_prefill_chunk: Optional[int] = None
    enable_prefix_caching: bool = False

    def validate(self) -> "EngineConfig":
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise InputError(f"--num-blocks must be >= 2, got {self.num_blocks}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise InputError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise InputError(f"--kv-cache-dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InputError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.max_prefill_chunk is not None and (not isinstance(self.max_prefill_chunk, int)
                                                   or self.max_prefill_chunk < 1):
            raise InputError(f"max_prefill_chunk must be None or an integer >= 1, got {self.max_prefill_chunk!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise InputError(f"watermark must be in [0, 1), got {self.watermark}")
        return self


@dataclass
class RequestOutput:
    request_id: str
    delta_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: Optional[str]
    num_prompt_tokens: int
    num_output_tokens: int
    text: str = ""  # all output text so far
    output_token_ids: list[int] = field(default_factory=list)
    # with SamplingParams.logprobs: per new token (logprob, [(id, logprob)] of the k most likely)
    logprobs: Optional[list] = None
    # with SamplingParams.prompt_logprobs, on a sequence's first output: the same per prompt token after the first
    prompt_logprobs: Optional[list] = None
    # what ended a sequence with finish_reason "stop" (as vLLM's): the stop string, the stop token id; None for EOS
    stop_reason: Optional[str | int] = None


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Optional[Tokenizer], config: EngineConfig | None = None,
                 prefill: Any = None):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.prefill = prefill  # PrefillProvider or None
        self._last_prefilled: tuple[list[int], Any] | None = None  # (prompt ids, the provider's result)
        self.config = (config or EngineConfig()).validate()
        _check_prefix_caching(self.config, prefill)
        self.device = torch.device(getattr(model, "device", "cpu"))
        info = model.info
        self.vocab_size = int(info.vocab_size)
        self.max_model_len = int(min(self.config.max_model_len or info.max_model_len, info.max_model_len))
        eos = set(int(t) for t in (info.eos_token_ids or ()))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.notes: list[str] = list(getattr(model, "notes", ()))  # e.g. fused kernels off
        bs = self.config.block_size
        self.max_blocks_per_seq = -(-self.max_model_len // bs)
        self.num_blocks = self._size_cache()
        self.kv = model.allocate_kv_cache(self.num_blocks, bs, self.config.kv_cache_dtype)
        self.notes += [n for n in getattr(model, "notes", ()) if n not in self.notes]  # e.g. the FP8 cache's probe
        self.block_manager = BlockManager(self.num_blocks, bs, prefix_caching=self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=self.config.max_num_seqs,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens,
                                   watermark=self.config.watermark,
                                   max_prefill_chunk=self.config.max_prefill_chunk)
        self.sampler = Sampler(self.device)
        self._seq_ids = itertools.count()
        self._by_request: dict[str, Sequence] = {}
        self.graphs: Optional[DecodeGraphRunner] = None
        if self.config.cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphRunner.try_capture(self)
        self.step_log: Optional[list[dict[str, Any]]] = None  # set to [] to record every step
        # sampled tokens whose detokenization and output wait for the next step, which does them while the GPU
        # runs its model call (see step). Only on a GPU: on the CPU the model call is synchronous, so the wait
        # would hide nothing and only deliver every token a whole step later.
        self.defer_output = self.device.type == "cuda"
        self._deferred: list[tuple[Sequence, int]] = []
        self._prompt_lp_seqs: set[int] = set()  # sequences whose prompt logprobs are not all taken yet
        self._adjusting: set[int] = set()  # sequences whose logits are processed (penalties, bias, min_tokens)
        self.logits_processor = LogitsProcessor(max_rows=self.config.max_num_seqs)

    # --- set-up ------------------------------------------------------------------------------
    def _size_cache(self) -> int:
        cfg = self.config
        if cfg.num_blocks is not None:
            return int(cfg.num_blocks)
        if self.device.type != "cuda":
            per_block = int(self.model.kv_bytes_per_block(cfg.block_size, cfg.kv_cache_dtype))
            return max(2, min(CPU_DEFAULT_KV_BYTES // per_block, cfg.max_num_seqs * self.max_blocks_per_seq + 1))
        self._profile_peak_memory()
        return num_blocks_for_memory(self.model, cfg.block_size, cfg.kv_cache_dtype,
                                     utilization=cfg.gpu_memory_utilization, device=self.device,
                                     reserve_bytes=self.penalty_buffer_bytes())

    def penalty_buffer_bytes(self) -> int:
        """What the logits processor's buffers hold once a sequence asks for penalties (float32 counts and a bool
        mask per vocabulary entry, for max_num_seqs rows at once): kept out of the KV cache's share, as they
        persist."""
        return self.config.max_num_seqs * int(self.vocab_size) * 5

    def _profile_peak_memory(self) -> None:
        """Run one step of the largest size on a scratch cache, so that sizing leaves room for activations."""
        import torch

        bs = self.config.block_size
        total = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        lens = []
        while total > 0:
            lens.append(min(total, self.max_model_len))
            total -= lens[-1]
        nblocks = sum(-(-n // bs) for n in lens) + 1
        kv = self.model.allocate_kv_cache(nblocks, bs, self.config.kv_cache_dtype)
        ids, pos, slots, tables, block = [], [], [], [], 1
        width = max(-(-n // bs) for n in lens)
        for n in lens:
            nb = -(-n // bs)
            table = list(range(block, block + nb))
            block += nb
            ids += [0] * n
            pos += list(range(n))
            slots += [table[p // bs] * bs + p % bs for p in range(n)]
            tables.append(table + [NULL_BLOCK] * (width - nb))
        dev = self.device
        batch = _forward_batch(ids, pos, lens, lens, slots, tables, dev, False)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            self._profile_step(batch, kv, len(ids))
        torch.cuda.synchronize(dev)
        del kv
        if self.prefill is not None:  # the provider's own forward (another model) runs on this GPU too, between steps
            n = self.provider_profile_len()
            self.prefill([0] * n)  # its result (K/V of n tokens) is dropped at once
            torch.cuda.synchronize(dev)
            self.notes.append(f"KV cache sized after a {n}-token prompt through the prefill provider "
                              f"{getattr(self.prefill, 'name', '?')!r}; longer prompts may need more memory")
        torch.cuda.empty_cache()

    def _profile_step(self, batch, kv, num_tokens: int) -> None:
        """The most memory one step can take at once, for the KV cache's sizing: the largest forward with every
        token a prompt-logprob row (their hidden states, then their logits and log-softmax a chunk at a time),
        where the model gives them; then max_num_seqs rows of logits, a processed copy of them (penalties, bias)
        and their sampling with every option that allocates (temperature, min-p, top-k, top-p, logprobs)."""
        import torch

        dev = self.device
        k = min(MAX_LOGPROBS, int(self.vocab_size))
        if hasattr(self.model, "forward_rows"):
            rows = torch.arange(num_tokens, device=dev)
            _, states = self.model.forward_rows(batch, kv, rows)
            pending = self._prompt_logprob_tensors(states, PromptRows(rows, [0] * num_tokens, [k] * num_tokens, []))
            del states, pending
        else:
            self.model.forward(batch, kv)
        rows = self.config.max_num_seqs
        logits = torch.randn(rows, int(self.vocab_size), device=dev)
        processed = logits.clone()  # the logits processor's copy, alive beside the model's logits
        params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.01) for _ in range(rows)]
        tokens = Sampler(dev)(processed, params, list(range(rows)))  # a scratch sampler: no state left behind
        logprob_tensors(logits, tokens, [k] * rows)

    def provider_profile_len(self) -> int:
        """Prompt tokens of the prefill provider's profiling run: a chunk of the longest prompt admitted
        (the provider takes whole prompts), capped at the step's token budget."""
        return max(1, min(self.max_model_len - 1, self.config.max_num_batched_tokens))

    # --- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this model folder has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        import numbers

        if hasattr(prompt, "tolist"):  # a tensor or numpy array of ids
            prompt = prompt.tolist()
        try:
            ids = list(prompt)
        except TypeError:
            raise InputError(f"a prompt is a string or a list of integer token ids, got {type(prompt).__name__}") from None
        bad = next((t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
        if bad is not None:  # 1.7 or "3" would have become a token id silently
            raise InputError(f"a prompt's token ids must be integers, got {bad!r}")
        return [int(t) for t in ids]

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InputError when the request can never be served (the server answers 400)."""
        params.validate(self.vocab_size)
        if params.stop and self.tokenizer is None:  # stop strings are found in the text: there is none
            raise InputError("stop strings need the model folder's tokenizer (give stop token ids instead)")
        if params.prompt_logprobs is not None and (self.prefill is not None
                                                   or not hasattr(self.model, "forward_rows")):
            raise InputError("prompt logprobs (echo with logprobs) need the prompt run through this model; "
                             + ("a prefill provider prefills it here" if self.prefill is not None
                                else "this model gives last-token logits only"))
        n = len(prompt_ids)
        if n == 0:
            raise InputError("the prompt is empty")
        bad = next((t for t in prompt_ids if not (0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise InputError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if n + params.max_tokens > self.max_model_len:
            raise InputError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{n + params.max_tokens} ({n} in the prompt, {params.max_tokens} to generate)")
        need = self.block_manager.blocks_for(n + params.max_tokens)
        if need > self.block_manager.capacity_blocks:
            raise InputError(f"the request needs {need} KV-cache blocks; the cache holds "
                             f"{self.block_manager.capacity_blocks}")

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Sequence:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_request(ids, params)
        rid = request_id or uuid.uuid4().hex
        if rid in self._by_request:
            raise InputError(f"request id {rid!r} is already in use")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        seq = Sequence(next(self._seq_ids), rid, ids, params, arrival_time=arrival)
        if self.prefill is not None:  # its time counts in the request's TTFT (arrival is before it)
            seq.imported = self._prefilled(ids)
        seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens,
                                           params.min_tokens)
        self._by_request[rid] = seq
        if params.prompt_logprobs is not None and len(ids) > 1:
            self._prompt_lp_seqs.add(seq.seq_id)
        if adjusts_logits(params):
            self._adjusting.add(seq.seq_id)
        self.scheduler.add(seq)
        return seq

    def _prefilled(self, ids: list[int]) -> Any:
        """The provider's K/V and logits of a prompt. Requests added one after another with the same prompt
        (the ``n`` choices of one API request) share one result: the engine only reads it. The shared result
        is forgotten at the next step."""
        if self._last_prefilled is not None and self._last_prefilled[0] == ids:
            return self._last_prefilled[1]
        pre = self._check_prefilled(self.prefill(ids), len(ids))
        self._last_prefilled = (list(ids), pre)
        return pre

    def _check_prefilled(self, pre: Any, n: int) -> Any:
        """A provider's PrefilledPrompt must fit this model: one (K, V) per layer, [n, Hkv, D] each, and
        logits over (at least) this vocabulary; anything else is an InputError naming the mismatch."""
        info, who = self.model.info, f"prefill provider {getattr(self.prefill, 'name', '?')!r}"
        if len(pre.kv) != info.num_layers:
            raise InputError(f"{who} gave K/V for {len(pre.kv)} layers, the model has {info.num_layers}")
        want = (n, info.num_kv_heads, info.head_dim)
        for i, (k, v) in enumerate(pre.kv):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise InputError(f"{who}: layer {i} K/V shapes {tuple(k.shape)}/{tuple(v.shape)}, expected {want} "
                                 "(prompt tokens, KV heads, head_dim)")
        if pre.logits.dim() != 1 or pre.logits.shape[0] < self.vocab_size:
            raise InputError(f"{who} gave logits of shape {tuple(pre.logits.shape)}, expected [{self.vocab_size}]")
        return pre

    def _import(self, seqs: list[Sequence], now: float) -> list[RequestOutput]:
        """Write imported prompt K/V into the blocks the scheduler gave them; sample first tokens."""
        import torch

        from gpulab.vajra.reference import write_kv

        first = []
        for seq in seqs:
            slots = torch.tensor(self.block_manager.slots(seq.seq_id, 0, seq.prompt_len), device=self.device)
            for li, (layer, (k, v)) in enumerate(zip(self.kv.layers, seq.imported.kv)):
                write_kv(layer, k.to(self.device), v.to(self.device), slots, *self.kv.scales(li))
            if seq.num_output == 0:
                first.append(seq)
        if not first:
            return []
        logits = torch.stack([s.imported.logits[:self.vocab_size].float().to(self.device) for s in first])
        sampled = self.sampler(self._process_logits(logits, first), [s.params for s in first],
                               [s.seq_id for s in first])
        ks = [s.params.logprobs for s in first]
        lps = logprob_entries(logprob_tensors(logits, sampled, ks), ks)
        outs = [self._append(s, int(t), now, lp) for s, t, lp in zip(first, sampled.tolist(), lps)]
        return [o for o in outs if o is not None]

    def abort(self, request_id: str) -> bool:
        seq = self._by_request.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        self._end(seq, "abort")
        if self._deferred:  # nobody waits for its pending output
            self._deferred = [(s, t) for s, t in self._deferred if s is not seq]
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._deferred)

    def prefix_cache_stats(self) -> dict[str, Any]:
        """Prefix caching: tokens of admitted sequences and how many of them were found cached (prefill
        skipped); None figures when prefix caching is off."""
        sch, on = self.scheduler, self.block_manager.prefix_caching
        q, h = sch.prefix_tokens_queried, sch.prefix_tokens_hit
        return {"prefix_caching": on, "prefix_tokens_queried": q if on else None,
                "prefix_tokens_hit": h if on else None, "prefix_hit_rate": (h / q if q else 0.0) if on else None,
                "cached_blocks": self.block_manager.num_cached if on else None}

    def reset_prefix_cache(self) -> None:
        """Forget the cached blocks nobody holds and restart the hit counts (e.g. after a warm-up)."""
        self.block_manager.reset_prefix_cache()
        self.scheduler.prefix_tokens_queried = self.scheduler.prefix_tokens_hit = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # --- one step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        import torch

        t0 = time.perf_counter()
        self._last_prefilled = None
        sched = self.scheduler.schedule()
        if sched.empty:
            return self._drain()
        imported = self._import(sched.imported, time.perf_counter()) if sched.imported else []
        if not sched.scheduled:
            return self._drain() + imported
        batch = self._build_batch(sched)
        t_built = time.perf_counter()
        prompt_rows = self._prompt_rows(sched)
        with torch.inference_mode():
            prompt_pending = None
            if prompt_rows is not None:
                logits, states = self.model.forward_rows(batch, self.kv, prompt_rows.rows)
                prompt_pending = self._prompt_logprob_tensors(states, prompt_rows)
            elif sched.is_decode_only and self.graphs is not None and self.graphs.fits(batch.num_seqs):
                logits = self.graphs.run(batch)
            else:
                logits = self.model.forward(batch, self.kv)
            # a max_tokens=0 request (prompt scoring) ends when its prompt is through: no token is sampled
            rows = [i for i, s in enumerate(sched.scheduled) if s.sample and s.seq.params.max_tokens]
            scored = [s.seq for s in sched.scheduled if s.sample and not s.seq.params.max_tokens]
            seqs, sampled, ks, lp_pending = [], None, [], None
            if rows:
                if len(rows) != logits.shape[0]:
                    logits = logits.index_select(0, device_tensor(rows, torch.long, logits.device))
                seqs = [sched.scheduled[i].seq for i in rows]
                sampled = self.sampler(self._process_logits(logits, seqs), [s.params for s in seqs],
                                       [s.seq_id for s in seqs])
                ks = [s.params.logprobs for s in seqs]
                lp_pending = logprob_tensors(logits, sampled, ks)  # the model's own distribution (no bans)
            # on a GPU the model call and the sampling are queued, not done: the previous step's detokenization
            # runs meanwhile, off the step's critical path
            t_drain = time.perf_counter()
            outs = self._drain() + imported
            drain_ms = (time.perf_counter() - t_drain) * 1e3
            tokens = sampled.tolist() if sampled is not None else []
            lps = logprob_entries(lp_pending, ks)
            if prompt_pending is not None:
                self._take_prompt_logprobs(prompt_rows, prompt_pending)
        now = time.perf_counter()
        for s in sched.scheduled:
            s.seq.num_computed += s.num_tokens
        for seq, tok, lp in zip(seqs, tokens, lps):
            o = self._append(seq, int(tok), now, lp)
            if o is not None:
                outs.append(o)
        outs += [self._finish_scored(seq) for seq in scored]
        if self.step_log is not None:
            # ms: the whole step; host_ms: scheduling + batch building + token bookkeeping, the CPU work the
            # device waits for (ms - host_ms: the model call and sampling, with the drain); drain_ms:
            # detokenization done while the device runs
            done = time.perf_counter()
            self.step_log.append({"tokens": sched.num_tokens, "seqs": len(sched.scheduled),
                                  "decode_only": sched.is_decode_only, "ms": (done - t0) * 1e3,
                                  "host_ms": ((t_built - t0) + (done - now)) * 1e3, "drain_ms": drain_ms,
                                  "preempted": len(sched.preempted)})
        return outs

    def _end(self, seq: Sequence, reason: str) -> None:
        """A sequence is done (finished or aborted): the scheduler frees its blocks; its sampler state and
        request bookkeeping go."""
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq.seq_id)
        self._by_request.pop(seq.request_id, None)
        self._prompt_lp_seqs.discard(seq.seq_id)
        if seq.seq_id in self._adjusting:
            self._adjusting.discard(seq.seq_id)
            self.logits_processor.forget(seq.seq_id)

    def _finish_scored(self, seq: Sequence) -> RequestOutput:
        """The end of a max_tokens=0 request: its prompt went through the model (its prompt logprobs are taken);
        it finishes with no token ("length", as vLLM)."""
        self._end(seq, "length")
        return RequestOutput(seq.request_id, "", [], True, "length", seq.prompt_len, 0, "", [],
                             [] if seq.params.logprobs is not None else None, list(seq.prompt_logprobs))

    # --- prompt logprobs (echo) ------------------------------------------------------------------
    PROMPT_LOGITS_ROWS = 512  # rows of [rows, vocab] float32 logits at a time

    def _prompt_rows(self, sched: SchedulerOutput) -> Optional[PromptRows]:
        """This step's prompt tokens that still lack a prompt logprob (position p predicts prompt token p + 1;
        after a preemption's recompute the scored ones are not scored again), or None when no scheduled
        sequence needs any."""
        import torch

        if not self._prompt_lp_seqs:  # the usual step: nobody asked
            return None
        rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        owners = []
        off = 0
        for s in sched.scheduled:
            seq, k = s.seq, s.seq.params.prompt_logprobs
            if k is not None and seq.seq_id in self._prompt_lp_seqs:
                lo = max(len(seq.prompt_logprobs), s.start)
                hi = min(seq.prompt_len - 2, s.start + s.num_tokens - 1)
                if hi >= lo:
                    rows += range(off + lo - s.start, off + hi - s.start + 1)
                    targets += seq.token_ids[lo + 1:hi + 2]
                    ks += [k] * (hi - lo + 1)
                    owners.append((seq, hi - lo + 1))
            off += s.num_tokens
        if not rows:
            return None
        return PromptRows(device_tensor(rows, torch.long, self.device), targets, ks, owners)

    def _prompt_logprob_tensors(self, states, prompt_rows: PromptRows) -> list:
        """logprob_tensors of the prompt rows, a chunk of rows at a time (a 128k vocabulary's float32 logits
        of a whole prompt would not fit)."""
        import torch

        targets, ks = prompt_rows.targets, prompt_rows.ks
        out = []
        for c0 in range(0, len(ks), self.PROMPT_LOGITS_ROWS):
            c1 = min(c0 + self.PROMPT_LOGITS_ROWS, len(ks))
            lg = self.model.logits(states[c0:c1])
            tg = device_tensor(targets[c0:c1], torch.long, lg.device)
            out.append((logprob_tensors(lg, tg, ks[c0:c1]), ks[c0:c1]))
        return out

    def _take_prompt_logprobs(self, prompt_rows: PromptRows, pending: list) -> None:
        entries = [e for pend, ks in pending for e in logprob_entries(pend, ks)]
        i = 0
        for seq, n in prompt_rows.owners:
            seq.prompt_logprobs += entries[i:i + n]
            i += n
            if len(seq.prompt_logprobs) >= seq.prompt_len - 1:
                self._prompt_lp_seqs.discard(seq.seq_id)

    def _process_logits(self, logits, seqs: list[Sequence]):
        """The sampled rows' min_tokens bans, logit_bias and penalties (a copy; the same tensor when none of the
        step's sequences asks for any, the usual case)."""
        if not self._adjusting or not any(s.seq_id in self._adjusting for s in seqs):
            return logits
        return self.logits_processor(logits, seqs, self.eos_token_ids)

    def _append(self, seq: Sequence, tok: int, now: float, logprob=None) -> Optional[RequestOutput]:
        """Take a sampled token. A token that ends the sequence by its id or length, or of a sequence with stop
        strings (found only in the text), is detokenized now and its output returned; any other token's
        detokenization and output wait for the next step (None here), which does them while the device runs
        (with ``defer_output``: on a GPU)."""
        p = seq.params
        seq.token_ids.append(tok)
        if p.logprobs is not None:
            seq.logprobs.append(logprob)
        n = seq.num_output
        reason = None
        if n >= p.min_tokens and ((not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids):
            reason = "stop"
        elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None and self.defer_output and not seq.detok.stop:
            self._deferred.append((seq, tok))
            return None
        return self._emit(seq, tok, now, reason)

    def _emit(self, seq: Sequence, tok: int, now: float, reason: Optional[str]) -> RequestOutput:
        """Detokenize ``tok`` and make its output (the sequence finishes with ``reason``, or on a stop string)."""
        seq.token_times.append(now)  # when its output exists: what a client could see
        lps = [seq.logprobs[len(seq.token_times) - 1]] if seq.params.logprobs is not None else None
        plps = (list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None and len(seq.token_times) == 1
                else None)
        if reason != "stop":  # as vLLM: the EOS or stop token id that ends a sequence is not in its text
            seq.detok.add(tok)
            if reason == "length":  # the text ends here: its held-back tail too, where a stop string may end
                seq.detok.flush()
        if reason == "stop":
            seq.stop_reason = tok if tok in seq.params.stop_token_ids and tok not in self.eos_token_ids else None
        elif seq.detok.stopped is not None and seq.num_output >= seq.params.min_tokens:
            reason = "stop"  # a stop string in the text (also on the token that reached the length)
            seq.stop_reason = seq.detok.stopped
        if reason is not None:
            seq.detok.flush()
            self._end(seq, reason)
        return RequestOutput(seq.request_id, seq.detok.take(reason is not None), [tok], reason is not None, reason,
                             seq.prompt_len, seq.num_output, seq.detok.text,
                             seq.output_token_ids if reason else [], lps, plps, seq.stop_reason)

    def _drain(self) -> list[RequestOutput]:
        """The outputs of the deferred tokens, in order (abort drops a sequence's)."""
        if not self._deferred:
            return []
        items, self._deferred = self._deferred, []
        now = time.perf_counter()
        return [self._emit(seq, tok, now, None) for seq, tok in items]

    def _build_batch(self, sched: SchedulerOutput):
        """The step's ForwardBatch. Slots and block tables come from the block manager's table array in a few
        numpy operations (a Python loop over 256 sequences' tables cost milliseconds of host time per step)."""
        import numpy as np

        bm = self.block_manager
        bs = bm.block_size
        scheduled = sched.scheduled
        qlens = [s.num_tokens for s in scheduled]
        starts = [s.start for s in scheduled]
        clens = [s.start + s.num_tokens for s in scheduled]
        tables = bm.table_array([s.seq.seq_id for s in scheduled])
        ids: list[int] = []
        for s in scheduled:
            ids += s.seq.token_ids[s.start:s.start + s.num_tokens]
        n = np.asarray(qlens, dtype=np.int64)
        row = np.repeat(np.arange(len(scheduled)), n)  # each token's sequence, and its position in it
        first = np.cumsum(n) - n  # each sequence's first token in the flattened batch
        pos = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n) + np.repeat(np.asarray(starts), n)
        slots = tables[row, pos // bs].astype(np.int64) * bs + pos % bs
        return _forward_batch(ids, pos, qlens, clens, slots, tables, self.device, sched.is_decode_only)

    # --- offline use -----------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to the end; returns the final outputs in prompt order."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        encoded = [self.encode(p) for p in prompts]
        for p_ids, sp in zip(encoded, params):  # all checked before any is queued: a bad one leaves none behind
            self.check_request(p_ids, sp)
        ids = [self.add_request(p_ids, sp).request_id for p_ids, sp in zip(encoded, params)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]


def _check_prefix_caching(config: EngineConfig, prefill: Any) -> None:
    if config.enable_prefix_caching and prefill:
        raise InputError("--enable-prefix-caching does not work with --prefill: the provider's K/V are not "
                         "what this model computes for the same tokens")


def _forward_batch(ids, pos, qlens, clens, slots, tables, device, decode_only):
    import torch

    from gpulab.vajra.interface import ForwardBatch

    pin = device.type == "cuda"

    def t(x, dtype):
        v = torch.from_numpy(x) if hasattr(x, "dtype") else torch.tensor(x, dtype=dtype)
        if pin:
            v = v.pin_memory()
        return v.to(device, non_blocking=pin)

    return ForwardBatch(
        input_ids=t(ids, torch.int64),
        positions=t(pos, torch.int64),
        query_lens=t(qlens, torch.int32),
        context_lens=t(clens, torch.int32),
        slot_mapping=t(slots, torch.int64),
        block_tables=t(tables, torch.int32),
        is_decode_only=decode_only,
    )


def load_engine(model_dir: Path | str, *, device: str, config: EngineConfig, load_format: str = "auto",
                attention_backend: str = "auto", dtype: Any = None, tokenizer: bool = True,
                linear_backend: str = "auto", prefill: str | None = None) -> LLMEngine:
    """Load a model folder with vajra's loader and wrap it in an engine (tokenizer when present);
    ``prefill``: a provider spec ``NAME=ARG`` (see :mod:`gpulab.vajra.prefill`)."""
    from gpulab.core.files import read_model_config
    from gpulab.vajra.detokenizer import load_tokenizer

    d = Path(model_dir)
    read_model_config(d)  # a missing folder or config.json fails before any tokenizer or weight is read
    if load_format not in ("auto", "dummy"):
        raise InputError(f"--load-format must be auto or dummy, got {load_format!r}")
    from gpulab.vajra.attention import ATTENTION_BACKENDS

    if attention_backend not in ATTENTION_BACKENDS:
        raise InputError(f"--attention-backend must be {series(ATTENTION_BACKENDS)}, got {attention_backend!r}")
    from gpulab.vajra.linear import check_backend_option

    check_backend_option(linear_backend)
    config.validate()
    _check_prefix_caching(config, prefill)  # before any weight is read
    tok = None
    if tokenizer and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        tok = load_tokenizer(d)
    try:
        from gpulab.vajra.load import load_model
    except ImportError as e:
        raise InputError(f"the vajra model loader is not available in this build ({e})") from None
    kwargs: dict[str, Any] = dict(device=device, dtype=dtype, load_format=load_format,
                                  attention_backend=attention_backend, kv_cache_dtype=config.kv_cache_dtype)
    if linear_backend != "auto":
        kwargs["linear_backend"] = linear_backend
    provider = None
    if prefill:
        from gpulab.vajra.prefill import load_provider

        provider = load_provider(prefill, device=str(device))
        check = getattr(provider, "check_model", None)  # a provider may say which model folders fit its cache
        if callable(check):
            check(d)
    model = load_model(d, **kwargs)
    return LLMEngine(model, tok, config, prefill=provider)
