"""gpulab.core.files: user-given YAML mappings and Hugging Face config.json, one-line errors."""
import pytest

from gpulab.core.errors import InputError
from gpulab.core.files import read_model_config, read_yaml_mapping
from tests.assertions import assert_one_line


def test_yaml_mapping_ok(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("a: 1\nb: [1, 2]\n")
    assert read_yaml_mapping(f, "missing") == {"a": 1, "b": [1, 2]}


@pytest.mark.parametrize("text, part", [
    ("a: [1, 2\n", "malformed YAML at line"),
    ("- 1\n- 2\n", "expected a mapping, got list"),
    ("", "expected a mapping, got NoneType"),
    ("just a string", "expected a mapping, got str"),
])
def test_yaml_mapping_bad(tmp_path, text, part):
    f = tmp_path / "a.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        read_yaml_mapping(f, "missing")
    assert_one_line(e, str(f), part)


def test_yaml_mapping_missing_and_custom_messages(tmp_path):
    with pytest.raises(InputError, match="^no such thing$"):
        read_yaml_mapping(tmp_path / "nope.yaml", "no such thing")
    with pytest.raises(InputError, match="^a folder$"):
        read_yaml_mapping(tmp_path, "a folder")
    f = tmp_path / "l.yaml"
    f.write_text("[1]\n")
    with pytest.raises(InputError, match="^custom$"):
        read_yaml_mapping(f, "missing", "custom")


def test_yaml_mapping_binary(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(InputError) as e:
        read_yaml_mapping(f, "missing")
    assert_one_line(e, str(f))


def test_model_config(tmp_path):
    with pytest.raises(InputError) as e:
        read_model_config(tmp_path / "nope", "--large")
    assert_one_line(e, "--large folder not found", "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError) as e:
        read_model_config(f)
    assert_one_line(e, "model", "not a folder")
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(InputError) as e:
        read_model_config(d)
    assert_one_line(e, "no config.json")
    (d / "config.json").write_text("{oops")
    with pytest.raises(InputError) as e:
        read_model_config(d)
    assert_one_line(e, "malformed config.json")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError) as e:
        read_model_config(d)
    assert_one_line(e, "must be a JSON object, got list")
    (d / "config.json").write_text('{"model_type": "llama"}')
    assert read_model_config(d) == {"model_type": "llama"}
