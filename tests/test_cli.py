"""The `lorakit` entry point: version, help without torch, inspect, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_tiny

from lorakit import LoraConfig, __version__, add_adapter, save_adapter
from lorakit.cli import main


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys; from lorakit.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"lorakit {__version__}"


def test_inspect(tmp_path, capsys):
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"], use_rslora=True))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "rsLoRA" in text and "tiny-llama" in text and "--max-lora-rank 32" in text
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ranks"] == [32] and report["targets"] == ["q_proj", "v_proj"]
    assert report["parameters"] == 2 * (32 * 32 + 32 * 32 + 32 * 32 + 16 * 32)
    assert report["vllm_default_max_lora_rank_ok"] is False
    assert report["file_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_user_error_prints_message_not_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "is not a folder" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run([sys.executable, "-m", "lorakit.cli", "--debug", "inspect", str(tmp_path / "nope")],
                           capture_output=True, text=True)
    assert "Traceback" in debug.stderr and "LorakitError" in debug.stderr
