"""The bad inputs of the matrix, built once per session, and how a refusal is asserted.

Not a conftest.py (``from conftest import make_tiny`` must keep finding tests/conftest.py).

:func:`build_world` writes, under one temporary folder, a tiny Llama with SmolLM2's tokenizer, a
good adapter and data file for it, and one broken variant per input family (a missing path, a
folder where a file belongs, a truncated safetensors file, an adapter for another base, …).
:func:`refused` runs ``lorakit`` in process (``lorakit.cli.main(argv)``, stderr captured) and
asserts what every user error must give: exit 2, the culprit named, no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"
# Totals over the session, printed in the run's summary (here, so that every test module and the
# conftest see the same objects whatever pytest's import mode).
SEEN = {"cases": 0, "tracebacks": 0}
GENERATED = {"rows": 0, "kept": 0, "refused": 0, "files": 0, "tests": 0}
REQUESTS = {"requests": 0, "errors": 0}
FAULTS = {"injected": 0}

MODEL_FAMILIES = ("missing", "file_not_folder", "empty_folder", "unknown_architecture", "config_not_json",
                  "truncated_safetensors", "truncated_gguf", "empty_gguf")
# Families that only matter where the weights are read (estimate reads config.json only; data
# check reads the tokenizer only).
WEIGHTS = {"truncated_safetensors"}
CONFIG = {"unknown_architecture", "config_not_json"}
ADAPTER_FAMILIES = ("missing", "file_not_folder", "empty_folder", "config_not_json", "config_wrong_types",
                    "unknown_peft_type", "config_not_an_object", "config_is_a_folder", "no_weights_file",
                    "truncated_safetensors", "corrupt_safetensors", "empty_safetensors", "pickle_only",
                    "shape_mismatch", "missing_modules")
BASE_FREE = {"shape_mismatch", "missing_modules"}  # need a base to be wrong for
DATA_FAMILIES = ("missing", "folder_not_file", "empty_file", "not_utf8", "binary", "zero_usable_rows",
                 "unknown_suffix", "invalid_json", "corrupt_parquet", "bad_jsonl_line")
YAML_FAMILIES = ("syntax_error", "tab_indent", "unknown_key", "top_level_list", "missing", "folder", "wrong_type",
                 "binary", "data_missing", "model_missing")


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> Outcome:
    """``lorakit ARGV`` in this process: its exit code, stdout and stderr."""
    from lorakit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse refuses a flag with SystemExit(2)
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())


def refused(argv: list[str], *culprits: str) -> Outcome:
    """Assert that ``lorakit ARGV`` exits 2 with every culprit in its message and no traceback."""
    result = run_cli(argv)
    SEEN["cases"] += 1
    text = result.err + result.out
    if TRACEBACK in text:
        SEEN["tracebacks"] += 1
    assert TRACEBACK not in text, text
    assert result.code == 2, f"exit {result.code}, expected 2\nstdout: {result.out}\nstderr: {result.err}"
    assert "error" in result.err.lower(), result.err
    for culprit in culprits:
        assert str(culprit).lower() in result.err.lower(), f"{culprit!r} not named in: {result.err}"
    return result


def raised(error_type: type, call, *culprits: str) -> BaseException:
    """Assert that ``call()`` raises ``error_type`` whose message names every culprit."""
    SEEN["cases"] += 1
    try:
        call()
    except error_type as err:
        message = str(err)
        for culprit in culprits:
            assert str(culprit).lower() in message.lower(), f"{culprit!r} not named in: {message}"
        return err
    except BaseException as err:  # the wrong type is the defect this matrix is for
        SEEN["tracebacks"] += 1
        raise AssertionError(f"expected {error_type.__name__}, got {type(err).__name__}: {err}") from err
    raise AssertionError(f"expected {error_type.__name__}, nothing was raised")


# -- the world: good inputs, and one broken variant per family ------------------------------------


@dataclass
class World:
    root: Path
    model: Path
    """A tiny Llama (hidden 32, 2 layers) with SmolLM2's tokenizer and chat template."""
    adapter: Path
    """A good r=4 adapter for ``model`` (q_proj, v_proj)."""
    data: Path
    """A good JSONL training file (messages)."""
    config: Path
    """A good training YAML for ``model`` and ``data``."""
    bad_models: dict[str, tuple[Path, str]]
    """family -> (model path, the text its error must contain)."""
    bad_adapters: dict[str, tuple[Path, str]]
    bad_data: dict[str, tuple[Path, str]]
    bad_yaml: dict[str, tuple[Path, str]]
    no_template: Path
    """``model`` with its chat template removed (``messages`` data needs one)."""


def build_world(root: Path, tiny_model_dir) -> World:
    """Everything the matrix needs, under ``root`` (``tiny_model_dir(root)`` makes the model)."""
    import shutil

    import torch

    import lorakit

    model = Path(tiny_model_dir(str(root)))
    base = _load(model)
    adapter = root / "adapter"
    lorakit.add_adapter(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(base, adapter, base_model_name_or_path=str(model))
    data = root / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = root / "good.yaml"
    config.write_text(_yaml(model, data, root / "run"), encoding="utf-8")

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def copy_model(name: str) -> Path:
        path = root / name
        shutil.copytree(model, path)
        return path

    # -- models
    bad_models: dict[str, tuple[Path, str]] = {}
    bad_models["missing"] = (root / "no-such-model", "no-such-model")
    text_file = root / "model.txt"
    text_file.write_text("not a model\n")
    bad_models["file_not_folder"] = (text_file, "model.txt")
    bad_models["empty_folder"] = (folder("empty-model"), "empty-model")
    unknown = copy_model("unknown-arch")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    (unknown / "config.json").write_text(json.dumps(cfg))
    bad_models["unknown_architecture"] = (unknown, "unknown-arch")
    not_json = copy_model("config-not-json")
    (not_json / "config.json").write_text("{ this is not json")
    bad_models["config_not_json"] = (not_json, "config-not-json")
    truncated = copy_model("truncated-weights")
    _truncate(truncated / "model.safetensors")
    bad_models["truncated_safetensors"] = (truncated, "truncated-weights")
    gguf = root / "truncated.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 291) + b"\x00" * 5)
    bad_models["truncated_gguf"] = (gguf, "truncated.gguf")
    empty_gguf = root / "empty.gguf"
    empty_gguf.write_bytes(b"")
    bad_models["empty_gguf"] = (empty_gguf, "empty.gguf")
    no_template = copy_model("no-chat-template")
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    _edit_json(no_template / "tokenizer_config.json", chat_template=None)

    # -- adapters
    bad_adapters: dict[str, tuple[Path, str]] = {}

    def copy_adapter(name: str) -> Path:
        path = root / name
        shutil.copytree(adapter, path)
        return path

    bad_adapters["missing"] = (root / "no-such-adapter", "no-such-adapter")
    bad_adapters["file_not_folder"] = (text_file, "model.txt")
    bad_adapters["empty_folder"] = (folder("empty-adapter"), "empty-adapter")
    path = copy_adapter("config-broken")
    (path / "adapter_config.json").write_text('{"r": 4,')
    bad_adapters["config_not_json"] = (path, "adapter_config.json")
    path = copy_adapter("config-wrong-types")
    _edit_json(path / "adapter_config.json", r="four", lora_alpha=[8])
    bad_adapters["config_wrong_types"] = (path, "config-wrong-types")
    path = copy_adapter("config-unknown-peft-type")
    _edit_json(path / "adapter_config.json", peft_type="PREFIX_TUNING")
    bad_adapters["unknown_peft_type"] = (path, "PREFIX_TUNING")
    path = copy_adapter("config-a-list")
    (path / "adapter_config.json").write_text("[1, 2, 3]")
    bad_adapters["config_not_an_object"] = (path, "config-a-list")
    path = copy_adapter("config-is-folder")
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").mkdir()
    bad_adapters["config_is_a_folder"] = (path, "adapter_config.json")
    path = copy_adapter("no-weights")
    (path / "adapter_model.safetensors").unlink()
    bad_adapters["no_weights_file"] = (path, "no-weights")
    path = copy_adapter("truncated-adapter")
    _truncate(path / "adapter_model.safetensors")
    bad_adapters["truncated_safetensors"] = (path, "truncated-adapter")
    path = copy_adapter("garbage-adapter")
    (path / "adapter_model.safetensors").write_bytes(os.urandom(64) + b"\xff" * 64)
    bad_adapters["corrupt_safetensors"] = (path, "garbage-adapter")
    path = copy_adapter("empty-weights")
    (path / "adapter_model.safetensors").write_bytes(b"")
    bad_adapters["empty_safetensors"] = (path, "empty-weights")
    path = copy_adapter("pickle-only")
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    bad_adapters["pickle_only"] = (path, "adapter_model.bin")
    other = _wide_llama()  # hidden 64 where the base has 32
    other_adapter = root / "adapter-other-base"
    lorakit.add_adapter(other, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(other, other_adapter)
    bad_adapters["shape_mismatch"] = (other_adapter, "q_proj")
    deep = _deep_llama()
    deep_adapter = root / "adapter-more-layers"
    lorakit.add_adapter(deep, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(deep, deep_adapter)
    bad_adapters["missing_modules"] = (deep_adapter, "layers.2")

    # -- data files
    bad_data: dict[str, tuple[Path, str]] = {}
    bad_data["missing"] = (root / "no-such-data.jsonl", "no-such-data.jsonl")
    bad_data["folder_not_file"] = (folder("data-folder.jsonl"), "data-folder.jsonl")
    (root / "empty.jsonl").write_bytes(b"")
    bad_data["empty_file"] = (root / "empty.jsonl", "empty.jsonl")
    (root / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    bad_data["not_utf8"] = (root / "latin1.jsonl", "UTF-8")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    bad_data["binary"] = (root / "binary.jsonl", "binary.jsonl")
    (root / "no-usable.jsonl").write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5)))
    bad_data["zero_usable_rows"] = (root / "no-usable.jsonl", "no-usable.jsonl")
    (root / "data.xlsx").write_bytes(b"PK\x03\x04")
    bad_data["unknown_suffix"] = (root / "data.xlsx", "data.xlsx")
    (root / "broken.json").write_text('[{"text": "a"},\n {"text": ')
    bad_data["invalid_json"] = (root / "broken.json", "broken.json line 2")
    (root / "bad.parquet").write_bytes(b"PAR1" + os.urandom(32))
    bad_data["corrupt_parquet"] = (root / "bad.parquet", "bad.parquet")
    (root / "lines.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    bad_data["bad_jsonl_line"] = (root / "lines.jsonl", "lines.jsonl line 2")

    # -- training YAML
    bad_yaml: dict[str, tuple[Path, str]] = {}
    good = config.read_text()

    def yaml_file(name: str, text: str) -> Path:
        path = root / name
        path.write_text(text, encoding="utf-8")
        return path

    bad_yaml["syntax_error"] = (yaml_file("syntax.yaml", good + "train:\n  lr: [1, 2\n"), "line ")
    bad_yaml["tab_indent"] = (yaml_file("tabs.yaml", "model: x\ndata:\n\ttrain: a.jsonl\n"), "line 3")
    bad_yaml["unknown_key"] = (yaml_file("unknown.yaml", good.replace("train:\n", "train:\n  learning_rat: 0.1\n")),
                               "learning_rat")
    bad_yaml["top_level_list"] = (yaml_file("list.yaml", "- model\n- data\n"), "list.yaml")
    bad_yaml["missing"] = (root / "no-such-config.yaml", "no-such-config.yaml")
    bad_yaml["folder"] = (folder("config-folder.yaml"), "config-folder.yaml")
    bad_yaml["wrong_type"] = (yaml_file("wrongtype.yaml", good.replace("  r: 4", "  r: four")), "adapter.r")
    bad_yaml["binary"] = (yaml_file("binary.yaml", ""), "binary.yaml")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01garbage\x80")
    bad_yaml["data_missing"] = (yaml_file("datamissing.yaml", good.replace(str(data), str(root / "gone.jsonl"))),
                                "gone.jsonl")
    bad_yaml["model_missing"] = (yaml_file("modelmissing.yaml", good.replace(str(model), str(root / "gone-model"))),
                                 "gone-model")
    return World(root, model, adapter, data, config, bad_models, bad_adapters, bad_data, bad_yaml, no_template)


def _yaml(model: Path, data: Path, output: Path) -> str:
    return (f"model: {model}\ndata:\n  train: {data}\n  max_length: 64\n  cache: false\n"
            f"adapter:\n  r: 4\n  alpha: 8\n  targets: [q_proj, v_proj]\n"
            f"train:\n  batch_size: 2\n  max_steps: 2\n  save_every: 1\n  plots: false\n  device: cpu\n"
            f"output: {output}\n")


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _wide_llama():
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _deep_llama():
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
