"""A test prefill provider: transformers prefills the prompt with the same weights vajra decodes with,
so a vajra engine fed its K/V must produce exactly the tokens of a plain engine."""
from __future__ import annotations

import torch

from gpulab.vajra.interface import PrefilledPrompt


def cache_layers(cache):
    """(K, V) per layer of a transformers cache, [B, Hkv, P, D] each (new and old cache layouts)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


class HFPrefill:
    name = "hf-test"

    def __init__(self, folder: str, device: str = "cpu", drop_layer: bool = False):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(folder).float().eval().to(device)
        self.device = device
        self.drop_layer = drop_layer
        self.calls = 0

    def __call__(self, prompt_ids: list[int]) -> PrefilledPrompt:
        self.calls += 1
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True)
        kv = [(k[0].transpose(0, 1), v[0].transpose(0, 1)) for k, v in cache_layers(out.past_key_values)]
        return PrefilledPrompt(logits=out.logits[0, -1].float(), kv=kv[:-1] if self.drop_layer else kv)


def load(arg: str, device: str = "cpu") -> HFPrefill:
    return HFPrefill(arg, device)


def load_broken(arg: str, device: str = "cpu") -> HFPrefill:
    return HFPrefill(arg, device, drop_layer=True)
