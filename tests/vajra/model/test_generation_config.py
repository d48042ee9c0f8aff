"""generation_config.json's eos_token_id joins config.json's as stop tokens (transformers' generate and vLLM do so:
a chat model's end-of-turn token is often listed there only)."""
import json

import pytest

from gpulab.core.errors import InputError
from gpulab.vajra.config import read_config

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 3}


def _folder(tmp_path, gen=None, raw=None):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    if raw is not None:
        (tmp_path / "generation_config.json").write_text(raw)
    return tmp_path


def test_without_generation_config_the_config_s_eos_stays():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        assert read_config(_folder(Path(d))).eos_token_ids == (3,)


@pytest.mark.parametrize("gen, want", [({"eos_token_id": [3, 9, 11]}, (3, 9, 11)), ({"eos_token_id": 9}, (3, 9)),
                                       ({"temperature": 0.6}, (3,)), ({"eos_token_id": None}, (3,))])
def test_generation_config_eos_ids_are_added(tmp_path, gen, want):
    assert read_config(_folder(tmp_path, gen)).eos_token_ids == want


def test_the_loaded_model_stops_on_an_eos_listed_only_in_generation_config(tmp_path):
    """The model's info (what the engine takes its stop tokens from) carries both files' eos ids."""
    import shutil
    from pathlib import Path

    from gpulab.vajra.load import load_model

    d = tmp_path / "m"
    shutil.copytree(Path(__file__).resolve().parents[3] / "experiments" / "assets" / "tiny-llama", d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    model = load_model(d, load_format="dummy")
    assert set(model.info.eos_token_ids) == {1, 5}


@pytest.mark.parametrize("raw, msg", [("{not json", "malformed generation_config.json"),
                                      ("[1, 2]", "must be a JSON object"),
                                      ('{"eos_token_id": "x"}', "'eos_token_id' must be a token id")])
def test_malformed_generation_config_is_one_line(tmp_path, raw, msg):
    with pytest.raises(InputError, match=msg) as e:
        read_config(_folder(tmp_path, raw=raw))
    assert "generation_config.json" in str(e.value) and "\n" not in str(e.value)
