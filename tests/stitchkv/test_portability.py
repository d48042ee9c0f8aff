"""Portability of kvstitch across the declared dependency range and GPU generations (CPU checks)."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("version,kw", [("4.44.2", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                        ("4.56.0", "dtype"), ("4.57.0.dev0", "dtype"), ("5.24.0", "dtype")])
def test_from_pretrained_dtype_keyword_by_transformers_version(monkeypatch, version, kw):
    """transformers < 4.56 only knows ``torch_dtype=`` (``dtype=`` reaches the model's __init__: TypeError, so
    no model would load); 4.56 on prefers ``dtype=``."""
    import transformers

    from gpulab.stitchkv import models as M

    monkeypatch.setattr(transformers, "__version__", version)
    assert M.dtype_kwarg() == kw


def test_load_model_passes_the_dtype_under_the_versions_keyword(monkeypatch, pair_dirs):
    import transformers

    from gpulab.stitchkv import models as M

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained
    real_kw = M.dtype_kwarg()  # the installed transformers' keyword

    def spy(path, **kw):
        seen.update(kw)
        kw = dict(kw)
        kw[real_kw] = kw.pop("torch_dtype", kw.pop("dtype", None))
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(transformers, "__version__", "4.50.0")
    m = M.load_model(pair_dirs[1], "small", dtype="bfloat16")
    assert seen.get("torch_dtype") is torch.bfloat16 and "dtype" not in seen
    assert next(m.parameters()).dtype == torch.bfloat16
