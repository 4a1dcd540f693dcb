"""How a base lays out its weights in GGUF: names, shapes, tied heads, the rotary row interleave."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from lorakit.errors import LorakitError
from lorakit.export.layout import config_layout, rope_row_order


@pytest.mark.parametrize(("rows", "heads"), [(576, 9), (192, 3), (32, 4), (16, 2)])
def test_rope_row_order_is_undone_by_transformers_gguf_loader(rows, heads):
    # transformers un-permutes llama.cpp's Q/K layout when it reads a GGUF: an independent oracle.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(rows, 8).numpy()
    stored = weight[rope_row_order(rows, heads).numpy()]
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": heads})
    restored = processor.process(stored, "blk.0.attn_q.weight").weights
    assert (restored == weight).all()
    assert not (stored == weight).all()


def test_rope_row_order_pairs_dimension_i_with_i_plus_half():
    assert rope_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(LorakitError, match="head size must be even"):
        rope_row_order(6, 2)


def test_config_layout_of_a_llama_names_every_weight_as_llama_cpp_does():
    config = tiny_config("llama")
    layout = config_layout(config, "tiny-llama")
    assert layout.arch == "llama" and layout.n_layers == 2 and (layout.n_head, layout.n_head_kv) == (4, 2)
    assert layout.tensors["blk.1.attn_q.weight"] == (32, 32)
    assert layout.tensors["blk.1.attn_k.weight"] == (16, 32)
    assert layout.tensors["blk.0.ffn_down.weight"] == (32, 64)
    assert layout.tensors["token_embd.weight"] == (96, 32) and "output.weight" in layout.tensors
    assert layout.gguf_name("model.layers.1.mlp.gate_proj") == "blk.1.ffn_gate.weight"
    assert layout.row_order("blk.1.attn_k.weight").tolist()[:4] == [0, 4, 1, 5]  # 2 heads of 8 rows
    assert layout.row_order("blk.1.attn_v.weight") is None


def test_config_layout_of_qwen2_keeps_rows_and_drops_a_tied_head():
    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    layout = config_layout(config, "tiny-qwen2")
    assert layout.arch == "qwen2" and layout.tied_embeddings and "output.weight" not in layout.tensors
    assert layout.tensors["blk.0.attn_q.bias"] == (32,)
    assert layout.row_order("blk.0.attn_q.weight") is None


def test_config_layout_refuses_an_architecture_it_does_not_derive():
    with pytest.raises(LorakitError, match="pass the base model's GGUF file as --base"):
        config_layout(tiny_config("gemma"), "tiny-gemma")
