"""PEFT-format save/load, with PEFT from PyPI as the oracle, and what bad files get."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny
from peft_oracle import logits, peft_config, peft_load
from safetensors import safe_open

import lorakit
from lorakit import LoraConfig, LorakitError, add_adapter, load_adapter, save_adapter
from lorakit.adapter_io import WEIGHTS_NAME, load_adapters
from lorakit.inject import trainable_parameters

ATTN = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
        "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
EMBED = {"gpt2": "wte"}
TIED = {"gpt2", "gemma"}  # lm_head shares the input embedding


def _case(arch: str, case: str) -> dict:
    """PEFT LoraConfig kwargs for one scenario on one architecture."""
    attn = ATTN[arch]
    mlp = ["c_fc"] if arch == "gpt2" else ["down_proj"]
    cases = {
        "basic": dict(r=4, lora_alpha=8, target_modules=attn),
        "all_linear": dict(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1),
        "rslora_patterns": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=attn + mlp,
                                rank_pattern={mlp[0]: 2}, alpha_pattern={attn[0]: 32}),
        "lora_bias": dict(r=4, lora_alpha=8, target_modules=attn, lora_bias=True, bias="lora_only"),
        "bias_all": dict(r=4, lora_alpha=8, target_modules=attn, bias="all"),
        "modules_to_save": dict(r=4, lora_alpha=8, target_modules=attn, modules_to_save=["lm_head"]),
        "embedding": dict(r=4, lora_alpha=8, target_modules=attn + [EMBED.get(arch, "embed_tokens")]),
        "layers": dict(r=4, lora_alpha=8, target_modules=attn, layers_to_transform=[1]),
        "regex": dict(r=2, lora_alpha=8, target_modules=r".*\.1\..*(q_proj|c_attn)"),
    }
    return cases[case]


CASES = ["basic", "all_linear", "rslora_patterns", "lora_bias", "bias_all", "modules_to_save", "embedding",
         "layers", "regex"]


def _params(cases=CASES):
    out = []
    for arch in ARCHITECTURES:
        for case in cases:
            if case == "modules_to_save" and arch in TIED:
                continue  # a trained copy of a tied head is PEFT's ensure_weight_tying territory
            out.append(pytest.param(arch, case, id=f"{arch}-{case}"))
    return out


def _perturb(model: torch.nn.Module, keys: list[str]) -> None:
    """Give trained-looking values to the parameters whose names contain any of ``keys``."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in keys):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch,case", _params())
def test_peft_round_trip(arch, case, tmp_path, input_ids):
    """PEFT's adapter loads in ours with its logits; ours saves the same keys and PEFT reloads it."""
    import peft

    kwargs = _case(arch, case)
    # 1. PEFT creates an adapter with non-zero B (and trained biases / copies) and saves it.
    reference = peft.get_peft_model(make_tiny(arch), peft_config(init_lora_weights=False, **kwargs)).eval()
    trained_biases = {"none": [], "lora_only": ["base_layer.bias"], "all": ["bias"]}[kwargs.get("bias", "none")]
    _perturb(reference, ["lora_", "modules_to_save", *trained_biases])
    expected = logits(reference, input_ids)
    reference.save_pretrained(tmp_path / "peft")

    # 2. We load PEFT's folder: same logits, same parameter counts.
    ours = make_tiny(arch)
    load_adapter(ours, tmp_path / "peft", trainable=True)
    torch.testing.assert_close(logits(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert trainable_parameters(ours) == reference.get_nb_trainable_parameters()

    # 3. We save: the same file keys and shapes as PEFT's, the same config fields. (PEFT also writes
    #    the whole base embedding when an embedding is targeted, for resized vocabularies; we read
    #    that but do not write it.)
    save_adapter(ours, tmp_path / "ours")
    peft_shapes = {k: v for k, v in _shapes(tmp_path / "peft").items() if not k.endswith("base_layer.weight")}
    assert _shapes(tmp_path / "ours") == peft_shapes
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(peft_cfg)
    with safe_open(str(tmp_path / "ours" / WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    # 4. PEFT loads ours without key warnings: same logits again.
    reloaded = peft_load(make_tiny(arch), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,case", _params(["basic", "all_linear", "embedding", "modules_to_save"]))
def test_our_adapter_loads_in_peft(arch, case, tmp_path, input_ids):
    """An adapter created and trained-looking in lorakit gives the same logits in PEFT."""
    kwargs = _case(arch, case)
    ours = make_tiny(arch)
    add_adapter(ours, LoraConfig(init_lora_weights=False, **kwargs))
    _perturb(ours, ["lora_", "modules_to_save"])
    expected = logits(ours, input_ids)
    assert not torch.allclose(expected, logits(make_tiny(arch), input_ids))  # the adapter does something
    save_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(peft_load(make_tiny(arch), tmp_path), input_ids), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_adapters_in_one_folder(arch, tmp_path, input_ids):
    """PEFT's layout: `default` at the top, the other in a sub-folder; both load both ways."""
    import peft

    first, second = _case(arch, "basic"), dict(r=2, lora_alpha=4, target_modules=["c_fc"] if arch == "gpt2"
                                               else ["up_proj"])
    ours = make_tiny(arch)
    add_adapter(ours, LoraConfig(init_lora_weights=False, **first), "default")
    add_adapter(ours, LoraConfig(init_lora_weights=False, **second), "other", activate=False)
    expected = {}
    for name in ("default", "other"):
        lorakit.set_active(ours, name)
        expected[name] = logits(ours, input_ids)
    save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / WEIGHTS_NAME).is_file()

    reference = peft_load(make_tiny(arch), tmp_path)
    reference.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        reference.set_adapter(name)
        torch.testing.assert_close(logits(reference, input_ids), expected[name], rtol=1e-5, atol=1e-5)

    reference.save_pretrained(tmp_path / "from_peft")
    back = make_tiny(arch)
    assert load_adapters(back, tmp_path / "from_peft") == ["default", "other"]
    for name in ("default", "other"):
        lorakit.set_active(back, name)
        torch.testing.assert_close(logits(back, input_ids), expected[name], rtol=1e-5, atol=1e-5)
    assert isinstance(peft, object)


def _shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_shape_mismatch_names_module_and_both_shapes(saved):
    import transformers

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LorakitError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(4, 32\).*\(4, 48\)"):
        load_adapter(other, saved)
    # The failed load left the model as it was: no adapter layers, same tensors.
    assert set(other.state_dict()) == set(before)
    assert lorakit.inject.adapter_configs(other) == {}


def test_truncated_safetensors(saved):
    path = saved / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LorakitError, match="truncated or corrupt"):
        load_adapter(make_tiny("llama"), saved)


def test_garbage_safetensors(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(LorakitError, match="not a readable safetensors file"):
        load_adapter(make_tiny("llama"), saved)


@pytest.mark.parametrize("field,value,message", [
    ("r", "eight", "r must be an integer"),
    ("lora_alpha", [1], "lora_alpha must be a number"),
    ("target_modules", 3, "target_modules must be a list"),
    ("bias", "some", "bias must be one of"),
    ("use_rslora", "yes", "use_rslora must be true or false"),
])
def test_config_with_wrong_type(saved, field, value, message):
    path = saved / "adapter_config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(LorakitError, match=f"adapter_config.json: {message}"):
        load_adapter(make_tiny("llama"), saved)


def test_config_not_json(saved):
    (saved / "adapter_config.json").write_text('{"r": 8,\n "peft_type": LORA}')
    with pytest.raises(LorakitError, match="invalid JSON at line 2"):
        load_adapter(make_tiny("llama"), saved)


class _Exploit:
    """Unpickling this would create a file: proof that nothing ran if it does not exist."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bin_refused_and_nothing_executed(saved, tmp_path):
    marker = tmp_path / "pwned"
    (saved / WEIGHTS_NAME).unlink()
    with open(saved / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit(marker)}, f)
    with pytest.raises(LorakitError, match="pickle file, refused"):
        load_adapter(make_tiny("llama"), saved)
    assert not marker.exists()
    # Opting in reads with weights_only=True: the payload is still refused, still not run.
    with pytest.raises(LorakitError, match="cannot be loaded safely"):
        load_adapter(make_tiny("llama"), saved, allow_pickle=True)
    assert not marker.exists()


def test_pickle_bin_with_opt_in_loads(saved, input_ids):
    from safetensors.torch import load_file

    model = make_tiny("llama")
    load_adapter(model, saved)
    expected = logits(model, input_ids)
    torch.save(load_file(saved / WEIGHTS_NAME), saved / "adapter_model.bin")
    (saved / WEIGHTS_NAME).unlink()
    fresh = make_tiny("llama")
    load_adapter(fresh, saved, allow_pickle=True)
    torch.testing.assert_close(logits(fresh, input_ids), expected)


def test_missing_and_unexpected_tensors(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / WEIGHTS_NAME)
    dropped = dict(list(tensors.items())[1:])
    save_file(dropped, saved / WEIGHTS_NAME)
    with pytest.raises(LorakitError, match="1 tensor\\(s\\) that its config implies are missing"):
        load_adapter(make_tiny("llama"), saved)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(LorakitError, match="match nothing this adapter adapts"):
        load_adapter(make_tiny("llama"), saved)


def test_saved_files_are_readable_by_others(saved):
    assert oct((saved / WEIGHTS_NAME).stat().st_mode & 0o777) == "0o644"
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]  # no temp files left
