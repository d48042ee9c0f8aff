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


def test_utf8_text(tmp_path):
    from gpulab.core.files import read_utf8_text

    f = tmp_path / "t.txt"
    f.write_text("Ça va — 東京\n", encoding="utf-8")
    assert read_utf8_text(f, "--text t.txt") == "Ça va — 東京\n"
    f.write_bytes(b"ok\n\xb0\x00binary")
    for path, part in ((f, "not UTF-8 text (byte 3"), (tmp_path, "is a folder"), (tmp_path / "no", "file not found")):
        with pytest.raises(InputError) as e:
            read_utf8_text(path, f"--text {path}")
        assert_one_line(e, f"--text {path}: {part}")


@pytest.mark.parametrize("argv", [
    ["serve-bench", "experiments/assets/tiny-llama", "--load-format", "dummy", "--prompts-file", "{bin}"],
    ["perplexity", "experiments/assets/tiny-llama", "--text", "{bin}"],
    ["kvstitch", "pretrain", "--data", "{bin}", "--pair-dir", "{tmp}/p"],
])
def test_text_inputs_that_are_not_utf8_are_one_line_errors(tmp_path, capsys, argv):
    """A binary file given as text was read with replacement characters (perplexity), or failed with a bare
    UnicodeDecodeError that did not name the file (serve-bench)."""
    from pathlib import Path

    from gpulab.cli import main

    root = Path(__file__).resolve().parents[2]
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xb0\xff")
    args = [a.replace("{bin}", str(binary)).replace("{tmp}", str(tmp_path)) for a in argv]
    args = [str(root / a) if a.startswith("experiments/") else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--out", str(tmp_path / "res"), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and f"{binary}: not UTF-8 text" in err, err


def test_blocking_file_names_the_file_where_folders_would_be_created(tmp_path):
    from gpulab.core.files import blocking_file

    f = tmp_path / "f"
    f.write_text("x")
    assert blocking_file(f / "a" / "b") == f
    assert blocking_file(tmp_path / "new" / "x") is None
    assert blocking_file(f) is None and blocking_file(f, include_self=True) == f
    assert blocking_file(tmp_path, include_self=True) is None
