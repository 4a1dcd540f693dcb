"""The PEFT-style facade: the seed snippet runs with only the import changed, and matches PEFT."""

from __future__ import annotations

import torch
from conftest import make_tiny
from peft_oracle import logits, peft_load

SNIPPET = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05,
               bias="none")


def test_seed_snippet_matches_peft(capsys, input_ids, tmp_path):
    import peft

    from lorakit import LoraConfig, get_peft_model

    base = make_tiny("llama")
    expected_base = logits(base, input_ids)
    model = get_peft_model(base, LoraConfig(**SNIPPET))
    model.print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(make_tiny("llama"), peft.LoraConfig(**SNIPPET)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours == theirs
    assert ours.startswith("trainable params: 7,168 || all params: 31,904 || trainable%: 22.4674")

    model.eval()
    assert torch.equal(logits(model, input_ids), expected_base)  # fresh adapter == base
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(peft_load(make_tiny("llama"), tmp_path), input_ids), expected_base)


def test_facade_methods(input_ids, tmp_path):
    from lorakit import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(make_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    base = logits(make_tiny("llama"), input_ids)
    adapted = logits(model, input_ids)
    assert not torch.allclose(adapted, base)
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert model.config.vocab_size == 96  # attributes forward to the wrapped model
    assert list(model.state_dict())[0].startswith("base_model.model.")
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), base)
    assert torch.equal(logits(model, input_ids), adapted)

    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_tiny("llama"), tmp_path).eval()
    assert torch.equal(logits(again, input_ids), adapted)
    assert not any(p.requires_grad for p in again.parameters())  # loaded for inference
    trainable = PeftModel.from_pretrained(make_tiny("llama"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * (4 * 32 + 32 * 4)

    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.set_adapter("second")
    assert model.active_adapters == ["second"]
    model.delete_adapter("second")
    model.set_adapter("default")
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), adapted, rtol=1e-5, atol=1e-5)


def test_seed_snippet_on_smollm2_matches_peft(smollm2_path, capsys, tmp_path):
    """The real model: same trainable-parameter line as PEFT, and our saved adapter (made non-zero)
    gives PEFT the same logits."""
    import peft
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()

    ours = get_peft_model(load(), LoraConfig(**SNIPPET))
    ours.print_trainable_parameters()
    line = capsys.readouterr().out
    peft.get_peft_model(load(), peft.LoraConfig(**SNIPPET)).print_trainable_parameters()
    assert line == capsys.readouterr().out
    # per layer: q and o 16·576 + 576·16, k and v 16·576 + 192·16 (3 kv heads × 64); 30 layers
    assert line.startswith("trainable params: 1,843,200 || all params: 136,358,208 || trainable%: 1.3517")

    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    ours.eval()
    expected = logits(ours, ids)
    ours.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(peft_load(load(), tmp_path), ids), expected, rtol=1e-5, atol=1e-5)
