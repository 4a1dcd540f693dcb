"""`lorakit merge`: a standalone model folder that transformers reloads with base + adapter's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from peft_oracle import logits

from lorakit import LoraConfig, add_adapter, disabled, load_adapter, save_adapter
from lorakit.cli import main
from lorakit import merge_to_folder


def _greedy(model, input_ids, n=8):
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


@pytest.fixture
def tiny_base(tmp_path, smollm2_path):
    """A tiny Llama with tied embeddings and SmolLM2's tokenizer (and chat template), saved as a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.vocab_size, config.tie_word_embeddings = 49152, True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return folder


def test_merged_folder_reloads_with_the_same_logits_and_generations(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    add_adapter(model, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False), "emb",
                activate=False)
    save_adapter(model, tmp_path / "adapters")
    from lorakit import set_active

    set_active(model, ["default", "emb"])
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(3))
    expected, expected_tokens = logits(model, ids), _greedy(model, ids)

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_base), "--adapter", str(tmp_path / "adapters"),
                 "--adapter", str(tmp_path / "adapters/emb"), "--out", str(out), "--max-shard-size", "1MB"]) == 0
    assert "merged model written to" in capsys.readouterr().out
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the embedding update must not be tied back onto lm_head

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(_greedy(merged, ids), expected_tokens)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_merge_casts_once_after_an_fp32_sum(tiny_base, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "a")
    q = model.model.layers[0].self_attn.q_proj
    want = (q.base_layer.weight.detach() + q.delta_weight("default")).to(torch.bfloat16)
    merge_to_folder(str(tiny_base), [tmp_path / "a"], tmp_path / "bf16", dtype="bf16")
    with safe_open(str(tmp_path / "bf16/model.safetensors"), framework="pt") as f:
        got = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert json.loads((tmp_path / "bf16/config.json").read_text())["dtype"] == "bfloat16"
    info = json.loads((tmp_path / "bf16/lorakit_merge.json").read_text())
    assert info["dtype"] == "bfloat16" and info["tie_word_embeddings"] is True  # only q_proj: still tied


def test_merge_bad_input_leaves_nothing_behind(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_base), "--adapter", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope: no adapter_config.json" in capsys.readouterr().err
    other = AutoModelForCausalLM.from_config(tiny_config("qwen2"))  # hidden 32 but another vocab: embed shapes differ
    add_adapter(other, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    save_adapter(other, tmp_path / "other")
    assert main(["merge", "--base", str(tiny_base), "--adapter", str(tmp_path / "other"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has shape (2, 96)" in err and "different base model" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "ok")
    assert main(["merge", "--base", str(tiny_base), "--adapter", str(tmp_path / "ok"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"



@pytest.mark.slow
def test_smollm2_merge_with_an_embedding_adapter_is_not_retied(smollm2_path, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_model, load_tokenizer

    model = load_model(str(smollm2_path), dtype=torch.float32, device="cpu")
    embed_before = model.model.embed_tokens.weight.detach().clone()
    add_adapter(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                  init_lora_weights=False))
    with torch.no_grad():  # a small, realistic-size update (random A·B at init would swamp the model)
        for layer in model.modules():
            for B in getattr(layer, "lora_B", {}).values():
                B.weight.mul_(0.05)
            for B in getattr(layer, "lora_embedding_B", {}).values():
                B.mul_(0.002)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="smollm2-135m-instruct")
    tokenizer = load_tokenizer(str(smollm2_path))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected, expected_tokens = logits(model, ids), _greedy(model, ids, n=6)
    with disabled(model):
        assert not torch.allclose(expected, logits(model, ids), atol=1e-2)  # the adapter does change the outputs

    messages = []
    merge_to_folder(str(smollm2_path), [tmp_path / "a"], tmp_path / "merged", log=messages.append)
    assert any("quantised GGUF" in m for m in messages)  # the alias is a Q4_1 GGUF, dequantised: say so
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(merged.lm_head.weight, embed_before)  # the head keeps the base embedding
    assert not torch.allclose(merged.model.embed_tokens.weight, embed_before)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(_greedy(merged, ids, n=6), expected_tokens)


def test_merge_into_a_4bit_base_dequantises_and_warns(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorakit.adapters.quant import dense_copy, dequantize, is_quantized
    from lorakit.inject import set_submodule

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    quantised = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=nf4, device_map="cpu").eval()
    quantised.save_pretrained(tmp_path / "q4")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "q4")
    assert is_quantized(quantised.model.layers[0].self_attn.q_proj)
    add_adapter(quantised, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(quantised, tmp_path / "a")
    # The reference: every 4-bit layer dequantised (bnb's own CPU 4-bit kernels reject tiny layers), + ΔW.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu").eval()
    for name, module in list(reference.named_modules()):
        if is_quantized(module):
            set_submodule(reference, name, dense_copy(module))
    load_adapter(reference, tmp_path / "a")
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(5))
    expected = logits(reference, ids)

    messages = []
    merge_to_folder(str(tmp_path / "q4"), [tmp_path / "a"], tmp_path / "merged", log=messages.append)
    assert any("4 bits (NF4)" in m and "dequantised" in m for m in messages)
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any(is_quantized(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    k = merged.model.layers[0].self_attn.k_proj.weight  # not adapted: exactly the dequantised NF4 weight
    assert torch.equal(k, dequantize(quantised.model.layers[0].self_attn.k_proj))


def test_dora_adapter_merges_to_the_same_logits(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                  init_lora_weights=False))
    with torch.no_grad():  # a trained magnitude differs from the initial row norms
        for module in model.modules():
            for m in getattr(module, "lora_magnitude_vector", {}).values():
                m.mul_(1.3)
    save_adapter(model, tmp_path / "dora")
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(4))
    expected = logits(model, ids)
    merge_to_folder(str(tiny_base), [tmp_path / "dora"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


def test_moe_expert_adapter_merges_into_the_3d_expert_weights(tmp_path, smollm2_path):
    """An all-linear adapter on a Qwen3-MoE (experts, router, attention): the merged folder reloads in
    transformers with the adapter's logits; the expert weights it saves are PEFT's merge."""
    from moe_models import make_moe, moe_ids
    from peft_oracle import peft_load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_moe("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(tmp_path / "base")
    model = make_moe("qwen3_moe")
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    ids = moe_ids()
    expected = logits(model, ids)
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    reference = peft_load(make_moe("qwen3_moe"), tmp_path / "adapter").merge_and_unload()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(merged.get_parameter(name), reference.get_parameter(name), rtol=1e-5, atol=1e-6)
