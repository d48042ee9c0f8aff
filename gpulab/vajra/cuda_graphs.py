"""CUDA graphs of vajra's decode steps: one graph per batch size, replayed on static input buffers."""
from __future__ import annotations

from typing import Any, Optional

from gpulab.vajra.block_manager import NULL_BLOCK


class DecodeGraphRunner:
    """CUDA graphs of the decode step for batch sizes 1, 2, 4, 8, 16, 24, ... up to max_num_seqs.

    A decode batch of B sequences replays the graph of the smallest captured size >= B; the padded
    rows decode token 0 at position 0 into the null block and are dropped. A graph ends at the final
    hidden states: the lm_head runs eagerly on the B real rows, so the captured sizes do not each
    hold a [size, vocab] fp32 logits buffer (about 2 GB at 256 sequences and a 128k vocabulary).
    """

    def __init__(self, engine: Any, sizes: list[int]):
        import torch

        self.engine = engine
        self.sizes = sizes
        dev = engine.device
        n = max(sizes)
        w = engine.max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.query_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, w, dtype=torch.int32, device=dev)
        self.graphs: dict[int, Any] = {}
        self.outputs: dict[int, Any] = {}

    @staticmethod
    def capture_sizes(max_num_seqs: int) -> list[int]:
        sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
        if max_num_seqs not in sizes:
            sizes.append(max_num_seqs)
        return sizes

    @classmethod
    def try_capture(cls, engine: Any) -> Optional["DecodeGraphRunner"]:
        attention = getattr(engine.model, "attention", None)
        if attention is not None and not getattr(attention, "graph_capturable", True):
            # its per-step metadata syncs with the host: a capture would only fail (and cost warm-up forwards)
            from gpulab.vajra.attention import triton_head_dim_ok

            hint = (" (use --attention-backend triton for graphs)" if triton_head_dim_ok(getattr(attention, "d", 0))
                    else f" (the Triton kernels, which are, do not take head_dim {getattr(attention, 'd', '?')})")
            engine.notes.append(f"CUDA graphs off: attention backend {getattr(attention, 'name', '?')!r} "
                                f"is not capturable{hint}")
            return None
        try:
            runner = cls(engine, cls.capture_sizes(engine.config.max_num_seqs))
            runner.capture()
            return runner
        except Exception as e:  # a model whose forward cannot be captured: run eagerly
            import torch

            torch.cuda.synchronize()
            engine.notes.append(f"CUDA graphs off: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return None

    def _batch(self, b: int):
        from gpulab.vajra.interface import ForwardBatch

        return ForwardBatch(self.input_ids[:b], self.positions[:b], self.query_lens[:b], self.context_lens[:b],
                            self.slot_mapping[:b], self.block_tables[:b], is_decode_only=True)

    def capture(self) -> None:
        import torch

        model, kv = self.engine.model, self.engine.kv
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in sorted(self.sizes, reverse=True):
                batch = self._batch(b)
                for _ in range(2):
                    model.final_hidden(batch, kv)  # warm up (autotuning, lazy init) outside the graph
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    out = model.final_hidden(batch, kv)
                pool = g.pool()
                self.graphs[b] = g
                self.outputs[b] = out
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def fits(self, b: int) -> bool:
        return b <= self.sizes[-1] if self.sizes else False

    def run(self, batch):
        b = batch.num_seqs
        size = next(s for s in sorted(self.graphs) if s >= b)
        w = batch.block_tables.shape[1]
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.context_lens[:b].copy_(batch.context_lens)
        self.slot_mapping[:b].copy_(batch.slot_mapping)
        self.block_tables[:b, :w].copy_(batch.block_tables)
        self.block_tables[:b, w:].zero_()
        if size > b:  # padding rows: token 0 at position 0 in the null block
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.context_lens[b:size].fill_(1)
            self.slot_mapping[b:size].fill_(NULL_BLOCK * self.engine.config.block_size)
            self.block_tables[b:size].fill_(NULL_BLOCK)
        self.graphs[size].replay()
        return self.engine.model.logits(self.outputs[size][:b])
