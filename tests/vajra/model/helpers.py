"""Tiny Llama checkpoints made in code, and helpers that drive vajra's forward like an engine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpulab.vajra.interface import ForwardBatch

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny(path: Path, seed: int = 0, model_type: str = "llama", **over):
    """A random-init transformers model saved with save_pretrained; returns (model, path)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False)
    kw.update(over)
    if model_type == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**kw))
        with torch.no_grad():  # qwen2 biases start at zero: make them matter
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.1)
    else:
        m = LlamaForCausalLM(LlamaConfig(**kw))
    m = m.float().eval()
    m.save_pretrained(path)
    return m, path


def quantize_cli(src: Path, dst: Path, out: Path, *args: str) -> None:
    from gpulab.cli import invoke

    invoke(["--device", "cpu", "--out", str(out), "quantize", str(src), str(dst), *args])


def dequantized_hf(hf_model, qdir: Path):
    """A copy of ``hf_model`` whose linear weights are the dequantized FP8 weights of ``qdir``."""
    import copy
    import json

    from gpulab.vajra import reference as ref
    from gpulab.vajra.checkpoint import CheckpointReader

    qc = json.loads((qdir / "config.json").read_text())["quantization_config"]
    block = None
    if qc["quant_method"] == "fp8":
        block = qc.get("weight_block_size")
    else:
        g = next(iter(qc["config_groups"].values()))["weights"]
        block = g.get("block_structure") if g["strategy"] == "block" else None
    r = CheckpointReader(qdir)
    m = copy.deepcopy(hf_model)
    sd = m.state_dict()
    with torch.no_grad():
        for name in sd:
            mod = name[: -len(".weight")]
            if name.endswith(".weight") and mod.rsplit(".", 1)[-1] in LINEARS:
                q = r.get(name)
                sname = mod + (".weight_scale_inv" if r.has(mod + ".weight_scale_inv") else ".weight_scale")
                s = r.get(sname)
                s = s.reshape(()) if s.numel() == 1 else (s.reshape(-1) if block is None else s)
                sd[name].copy_(ref.dequantize(q, s, tuple(block) if block else None))
    return m


class Runner:
    """Drives a vajra model with a paged cache like an engine: prefill (optionally chunked), decode."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, kv_dtype="auto", seed: int = 0):
        self.m = model
        self.kv = model.allocate_kv_cache(num_blocks, block_size, kv_dtype)
        self.bs = block_size
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()  # scattered pages on purpose
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def add(self) -> int:
        self.tables.append([])
        self.lens.append(0)
        return len(self.tables) - 1

    def step(self, chunks: dict[int, list[int]]) -> torch.Tensor:
        """Feed each sequence's new tokens; returns the last-token logits [len(chunks), V]."""
        ids, pos, slots, ql, cl, rows = [], [], [], [], [], []
        for s, toks in chunks.items():
            start = self.lens[s]
            end = start + len(toks)
            while len(self.tables[s]) * self.bs < end:
                self.tables[s].append(self.free.pop())
            for p, t in zip(range(start, end), toks):
                ids.append(t)
                pos.append(p)
                slots.append(self.tables[s][p // self.bs] * self.bs + p % self.bs)
            self.lens[s] = end
            ql.append(len(toks))
            cl.append(end)
            rows.append(self.tables[s])
        width = max(len(r) for r in rows)
        bt = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            bt[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        dev = self.m.device
        batch = ForwardBatch(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                             torch.tensor(ql, dtype=torch.int32, device=dev), torch.tensor(cl, dtype=torch.int32, device=dev),
                             torch.tensor(slots, device=dev), bt.to(dev),
                             is_decode_only=all(n == 1 for n in ql))
        with torch.inference_mode():
            return self.m.forward(batch, self.kv).cpu()

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        s = self.add()
        logits = self.step({s: prompt})
        out = []
        for _ in range(steps):
            t = int(logits[0].argmax())
            out.append(t)
            logits = self.step({s: [t]})
        return out


def hf_last_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].float()


def hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    out, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            t = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cpu_w8a8_or_skip() -> None:
    """Skip unless this torch runs W8A8 (torch._scaled_mm with row-wise scales) on the CPU: 2.14's CPU kernel
    does; 2.11's "only supports per-tensor scaling"; 2.4 and 2.7 have none."""
    from gpulab.vajra.linear import w8a8_unavailable

    why = w8a8_unavailable(torch.device("cpu"), True)
    if why:
        pytest.skip(f"no W8A8 on this torch's CPU: {why}")


def paged_cache(lens, page, hkv, d, dt=torch.float32, extra_cols=2, seed=0):
    """A paged KV cache holding ``lens[i]`` random tokens of sequence i, its pages scattered over the cache and
    written through the reference (FP8 with k/v scales 0.5/0.25). -> cache, context_lens int32, block_tables int32
    (``extra_cols`` unused columns), k_scale, v_scale, and the generator (queries are drawn from it next)."""
    from gpulab.vajra import reference as R

    g = torch.Generator().manual_seed(seed)
    need = [(n + page - 1) // page for n in lens]
    nblocks = sum(need) + 3
    cache = torch.zeros(nblocks, 2, page, hkv, d, dtype=dt)
    perm = torch.randperm(nblocks, generator=g).to(torch.int32)
    bt = torch.zeros(len(lens), max(need) + extra_cols, dtype=torch.int32)
    ks, vs = (0.5, 0.25) if dt in (torch.float8_e4m3fn, torch.float8_e5m2) else (1.0, 1.0)
    used = 0
    for i, n in enumerate(need):
        bt[i, :n] = perm[used:used + n]
        used += n
        pos = torch.arange(lens[i])
        slots = bt[i, pos // page].long() * page + pos % page
        R.write_kv(cache, torch.randn(lens[i], hkv, d, generator=g), torch.randn(lens[i], hkv, d, generator=g),
                   slots, ks, vs)
    return cache, torch.tensor(lens, dtype=torch.int32), bt, ks, vs, g


def tiny_and_quantized(root: Path, dst_name: str, scheme: str) -> Path:
    """A one-layer tiny model in ``root/src`` and its ``--scheme`` quantization in ``root/dst_name``; returns root."""
    _, src = make_tiny(root / "src", num_hidden_layers=1)
    quantize_cli(src, root / dst_name, root / "res", "--scheme", scheme)
    return root
