"""QLoRA: NF4 base through bitsandbytes with our own autograd."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny
from peft_oracle import logits, peft_load

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters import quant
from lorakit.adapters.lora import AdapterOptions, LoraLinear

pytest.importorskip("bitsandbytes")


def _tiny_llama64():
    """A tiny Llama whose layers are at least one NF4 block (64) wide: bnb's own CPU kernels,
    used by PEFT's reference path, need that."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def _qlora_layer(in_features=64, out_features=48, dora=False):
    torch.manual_seed(0)
    base = quant.quantize_linear(torch.nn.Linear(in_features, out_features))
    layer = LoraLinear(base)
    layer.add("default", AdapterOptions(r=4, alpha=8, init=False, use_dora=dora))
    layer.set_active(["default"])
    return layer


def _dense_twin(layer):
    """The same layer over a dense fp32 copy of the dequantised weight: the reference."""
    twin = LoraLinear(quant.dense_copy(layer.base_layer))
    twin.add("default", AdapterOptions(**{**layer.options["default"].__dict__}))
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if "base_layer" not in k}, strict=False)
    twin.set_active(["default"])
    return twin


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_equal_fp32_reference_on_dequantised_weight(dora):
    layer = _qlora_layer(dora=dora)
    twin = _dense_twin(layer)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), twin(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if dora else ()):
        ours, ref = getattr(layer, name)["default"], getattr(twin, name)["default"]
        ours_grad = ours.grad if isinstance(ours, torch.nn.Parameter) else ours.weight.grad
        ref_grad = ref.grad if isinstance(ref, torch.nn.Parameter) else ref.weight.grad
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert not layer.base_layer.weight.requires_grad


def test_nothing_full_precision_is_saved_for_backward():
    layer = _qlora_layer(512, 512)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 512)).sum()
    assert not any(t.numel() >= 512 * 512 for t in saved)  # no (out × in) weight kept between passes


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"]])
def test_adapter_gradients_survive_generate(targets):
    """Also through 4-bit layers without adapters (only q_proj adapted): input gradients must
    flow through them for the earlier layers' adapters."""
    model = make_tiny("llama")
    quant.quantize_model(model)
    add_adapter(model, LoraConfig(r=4, target_modules=targets))
    ids = torch.randint(0, 96, (1, 6))
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_bits_per_parameter():
    layer = quant.quantize_linear(torch.nn.Linear(576, 1536))
    bits = quant.bits_per_parameter(layer)
    assert 4.0 < bits <= 4.2, bits
    error = (quant.dequantize(layer) - torch.nn.Linear(576, 1536).weight).abs()
    assert error.max() < 1  # it really is the quantised weight (loose: different random init)


def test_merge_into_4bit_base_dequantises_with_warning(input_ids):
    model = make_tiny("llama")
    quant.quantize_model(model)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = logits(model, input_ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = lorakit.merge_and_unload(model)
    assert any("dequantised" in str(w.message) for w in caught)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_qlora_adapter_loads_in_peft_on_a_bnb_quantised_base(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama64().save_pretrained(tmp_path / "base")
    model = _tiny_llama64()
    quant.quantize_model(model)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    expected = logits(model, input_ids)
    save_adapter(model, tmp_path / "adapter")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")
    ours_q, theirs_q = model.model.layers[0].mlp.up_proj.base_layer, base.model.layers[0].mlp.up_proj
    assert torch.equal(ours_q.weight.data, theirs_q.weight.data)  # the same NF4 codes…
    torch.testing.assert_close(quant.dequantize(ours_q), quant.dequantize(theirs_q), rtol=0, atol=0)  # …and scales
    reference = peft_load(base, tmp_path / "adapter")
    # bnb's no-grad CPU kernel rounds the block scales to bf16; its autograd path (train mode, grad
    # on) dequantises exactly. No dropout anywhere, so train mode computes the same function.
    reference.train()
    with torch.enable_grad():
        got = reference(input_ids=input_ids).logits.detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_qlora_training_steps_on_smollm2_lower_the_loss(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    quant.quantize_model(model)
    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tokenizer(["The capital of France is Paris. The capital of Italy is Rome."], return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_qlora_on_a_mixture_of_experts_model_is_refused_naming_what_is_missing():
    from moe_models import make_moe

    from lorakit.adapters.quant import quantize_model

    model = make_moe("qwen3_moe")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    with pytest.raises(lorakit.LorakitError, match=rf"{experts:,} of its .* 3-D expert weights.*no NF4 storage and kernel"):
        quantize_model(model)
    assert not any(type(m).__name__ == "NF4Linear" for m in model.modules())  # nothing was changed
