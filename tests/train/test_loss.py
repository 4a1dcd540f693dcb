"""The chunked loss equals the model's own loss (and gradients), padded and packed, tied and untied;
so does running a shared, unscored prefix once per batch; gradient checkpointing with adapters and
packing changes nothing; offload hooks round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny

from lorakit import LoraConfig, add_adapter
from lorakit.data.collation import collate_packed, collate_padded
from lorakit.train.loss import (CausalLMLoss, LinearCrossEntropy, causal_inputs, default_chunk, offloaded,
                                 split_head)


def _rows(seed: int = 0, vocab: int = 96) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four rows of different lengths whose first half is a prompt (label -100)."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in (9, 14, 6, 12):
        ids = rng.integers(0, vocab, length)
        labels = ids.copy()
        labels[: length // 2] = -100
        rows.append((ids, labels))
    return rows


def _in_two_rows(rows):
    """Two packed rows (B, L = 2, …) of the examples: the first two, then the rest."""
    return [rows[:2], rows[2:]]


def _model(arch: str, seed: int = 0, dropout: float = 0.0):
    model = make_tiny(arch, seed).train()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False))
    return model


def _loss_and_grads(objective, model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks (GPT-2's own dropout, LoRA's) on every call
    loss = objective(**{k: v.clone() for k, v in batch.items()})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])  # gpt2: tied head; qwen2: q/k/v biases
@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_equals_model_loss(arch, packing):
    model = _model(arch)
    rows = _rows()
    batch = collate_packed(_in_two_rows(rows)) if packing else collate_padded(rows, pad_token_id=0)
    assert split_head(model) is not None
    plain = _loss_and_grads(lambda **b: model(**b, use_cache=False).loss, model, batch)
    chunked = _loss_and_grads(CausalLMLoss(model, chunk=5), model, batch)  # several chunks, a ragged last one
    _assert_same(chunked, plain)
    torch.manual_seed(5)
    assert CausalLMLoss(model, chunked=False)(**batch).item() == pytest.approx(plain[0].item(), rel=1e-6)


def test_packed_equals_padded_under_the_chunked_loss():
    model = _model("llama")
    objective = CausalLMLoss(model, chunk=7)
    rows = _rows(1)
    # Packed batches drop each row's first label (it would be predicted from the previous row).
    for ids, labels in rows:
        labels[0] = -100
    packed = _loss_and_grads(objective, model, collate_packed(_in_two_rows(rows)))
    padded = _loss_and_grads(objective, model, collate_padded(rows, pad_token_id=0))
    _assert_same(packed, padded, tol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_trained_head_gets_the_same_gradient(tied):
    from transformers import LlamaForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # e.g. modules_to_save: lm_head (and, tied, the embedding)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = collate_padded(_rows(2), pad_token_id=0)
    plain = _loss_and_grads(lambda **b: model(**b, use_cache=False).loss, model, batch)
    chunked = _loss_and_grads(CausalLMLoss(model, chunk=4), model, batch)
    _assert_same(chunked, plain)


def test_bias_and_dtype_in_the_linear_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    bias = torch.randn(30, requires_grad=True)
    targets = torch.randint(0, 30, (11,))
    loss = LinearCrossEntropy.apply(h, weight, bias, targets, 4) * 3.0
    loss.backward()
    got = (loss.detach(), h.grad, weight.grad, bias.grad)
    h.grad = weight.grad = bias.grad = None
    want = torch.nn.functional.cross_entropy(h @ weight.T + bias, targets) * 3.0
    want.backward()
    for a, b in zip(got, (want.detach(), h.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_model_matches_its_own_loss():
    model = _model("llama").to(torch.bfloat16)
    batch = collate_padded(_rows(3), pad_token_id=0)
    plain = _loss_and_grads(lambda **b: model(**b, use_cache=False).loss, model, batch)
    chunked = _loss_and_grads(CausalLMLoss(model, chunk=8), model, batch)
    _assert_same(chunked, plain, tol=2e-2)


def test_unknown_or_capped_heads_take_the_plain_path():
    model = make_tiny("gemma")
    assert split_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) is None
    model.config.final_logit_softcapping = None
    model.config.model_type = "some-new-arch"
    assert split_head(model) is None
    llama = make_tiny("llama")
    handle = llama.lm_head.register_forward_hook(lambda module, args, out: out)
    assert split_head(llama) is None  # a hook on the head expects the head to run
    handle.remove()
    assert split_head(llama) is not None
    add_adapter(llama, LoraConfig(r=2, target_modules=["lm_head"]))  # an adapted head is no plain Linear
    assert split_head(llama) is None


def test_default_chunk_bounds_the_logits():
    assert default_chunk(49152) == 640 and default_chunk(128256) == 256
    assert default_chunk(10**7) == 64
    for vocab in (32000, 49152, 128256, 151936):
        assert default_chunk(vocab) * vocab * 4 <= 2**27


def test_chunked_loss_holds_no_vocab_sized_tensor_for_backward():
    model = make_tiny("llama").train()
    model.config.vocab_size = 96
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear"))
    batch = collate_padded(_rows(), pad_token_id=0)
    vocab = model.lm_head.weight.shape[0]
    for chunked in (True, False):
        shapes: list[tuple[int, ...]] = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            CausalLMLoss(model, chunked=chunked, chunk=4)(**batch)
        has_logits = any(len(s) >= 2 and s[-1] == vocab and s[0] != vocab for s in shapes)
        assert has_logits != chunked, (chunked, shapes)


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_checkpointing_with_adapters_gives_the_same_loss_and_grads(packing):
    rows = _rows(4)
    batch = collate_packed(_in_two_rows(rows)) if packing else collate_padded(rows, pad_token_id=0)
    results, saved = [], []
    for checkpointing in (False, True):
        model = _model("llama", dropout=0.1)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        objective = CausalLMLoss(model, chunk=8)  # checkpointing replays the RNG state in the recomputation
        results.append(_loss_and_grads(objective, model, batch))
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            objective(**batch)
        saved.append(count[0])
    _assert_same(results[1], results[0])
    assert saved[1] < saved[0] / 2, saved  # the layers' activations really were dropped


def test_offload_hooks_round_trip_and_keep_weights_in_place():
    model = _model("llama")
    batch = collate_padded(_rows(5), pad_token_id=0)
    plain = _loss_and_grads(CausalLMLoss(model), model, batch)
    # On a CPU-only machine nothing moves (tensors are already on the CPU); the hooks must still
    # hand back every saved tensor unchanged.
    with offloaded(model, min_bytes=0):
        hooked = _loss_and_grads(CausalLMLoss(model), model, batch)
    _assert_same(hooked, plain, tol=0)
    offload = _loss_and_grads(CausalLMLoss(model, offload=True), model, batch)
    _assert_same(offload, plain, tol=0)


def test_perf_options_are_validated():
    from lorakit.errors import LorakitError
    from lorakit.train.config import RunConfig

    cfg = RunConfig.from_dict({"train": {"loss_chunk": 512, "compile": True, "offload_activations": True,
                                         "chunked_loss": False}})
    assert (cfg.train.loss_chunk, cfg.train.compile, cfg.train.chunked_loss) == (512, True, False)
    assert RunConfig().train.chunked_loss and not RunConfig().train.compile
    with pytest.raises(LorakitError, match="train.loss_chunk"):
        RunConfig.from_dict({"train": {"loss_chunk": 0}})
    with pytest.raises(LorakitError, match="train.compile"):
        RunConfig.from_dict({"train": {"compile": "yes"}})
    with pytest.raises(LorakitError, match="did you mean 'train.loss_chunk'"):
        RunConfig.from_dict({"train": {"loss_chunks": 4}})


def test_compile_blocks_compiles_each_decoder_layer(monkeypatch):
    from lorakit.train.setup import compile_blocks

    model = make_tiny("llama")
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    assert compile_blocks(model) == 2
    assert compiled == [("LlamaDecoderLayer", {"dynamic": True})] * 2


def _prompted_rows(prefix: int = 10, seed: int = 0, vocab: int = 96) -> list[tuple[np.ndarray, np.ndarray]]:
    """Five rows that start with the same ``prefix`` tokens (a system prompt), then a prompt of
    their own and an answer (scored), of different lengths."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, prefix)
    rows = []
    for prompt, answer in ((3, 6), (5, 2), (2, 9), (4, 4), (6, 5)):
        ids = np.concatenate([system, rng.integers(0, vocab, prompt + answer)])
        labels = ids.copy()
        labels[: prefix + prompt] = -100
        rows.append((ids, labels))
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
def test_shared_prefix_gives_the_whole_rows_loss_and_grads(arch):
    from lorakit.train.loss import shared_prefix

    model = _model(arch)
    for module in model.modules():  # GPT-2's own dropout would draw other masks for other shapes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = collate_padded(_prompted_rows(), pad_token_id=0)
    assert shared_prefix(batch, batch["labels"]) == 10
    whole = _loss_and_grads(lambda **b: model(**b, use_cache=False).loss, model, batch)
    seen: list[tuple[int, ...]] = []  # what the embedding layer was given: the prefix once, then the rest
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        shared = _loss_and_grads(CausalLMLoss(model, chunk=4, share_prefix=True), model, batch)
    finally:
        hook.remove()
    _assert_same(shared, whole)
    width = batch["input_ids"].shape[1]
    assert seen == [(1, 10), (5, width - 10)], seen


def test_shared_prefix_length_rules():
    from lorakit.train.loss import MIN_PREFIX, shared_prefix

    rows = _prompted_rows(prefix=12)
    batch = collate_padded(rows, pad_token_id=0)
    assert shared_prefix(batch, batch["labels"]) == 12
    scored = batch["labels"].clone()
    scored[2, 10] = 7  # a label inside the prefix: stop so that no prefix position predicts it
    assert shared_prefix(batch, scored) == 9
    assert shared_prefix({k: v[:1] for k, v in batch.items()}, batch["labels"][:1]) == 0  # one row
    short = collate_padded(_prompted_rows(prefix=MIN_PREFIX - 1), pad_token_id=0)
    assert shared_prefix(short, short["labels"]) == 0  # not worth a second pass
    packed = collate_packed(_in_two_rows(rows))
    assert shared_prefix(packed, packed["labels"]) == 0  # no padding mask: a packed batch
    extra = {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}
    assert shared_prefix(extra, batch["labels"]) == 0  # an input the prefix split does not know
    same = collate_padded([rows[0]] * 3, pad_token_id=0)
    same["labels"][:] = -100
    assert shared_prefix(same, same["labels"]) == same["input_ids"].shape[1] - 1  # a position is left to every row


def test_shared_prefix_under_dropout_trains_and_is_the_default_of_lorakit_train():
    from lorakit.train.config import RunConfig

    model = _model("llama", dropout=0.1)
    batch = collate_padded(_prompted_rows(), pad_token_id=0)
    loss, grads = _loss_and_grads(CausalLMLoss(model, share_prefix=True), model, batch)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())
    assert RunConfig().train.share_prefix
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match="train.share_prefix"):
        RunConfig.from_dict({"train": {"share_prefix": "yes"}})


def test_right_padded_batches_run_without_their_padding_mask():
    rows = _rows()
    padded = collate_padded(rows, pad_token_id=0)
    assert set(causal_inputs(padded)) == {"input_ids", "labels", "position_ids"}  # causal attention suffices
    left = dict(padded, attention_mask=padded["attention_mask"].flip(1))  # left padding: the mask matters
    assert "attention_mask" in causal_inputs(left)
    packed = collate_packed(_in_two_rows(rows), block_mask=True)  # a 4-D mask is kept
    assert causal_inputs(packed)["attention_mask"].dim() == 4


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_chunked_loss_of_moe_models_adds_the_router_loss_as_the_model_does(arch, aux):
    """On MoE models the chunked loss adds the load-balancing loss when the config asks for it
    (output_router_logits, router_aux_loss_coef): loss and every gradient equal the model's own."""
    from moe_models import make_moe

    import transformers as tf

    config = make_moe(arch).config
    config.output_router_logits, config.router_aux_loss_coef = aux, 0.3
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).train()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", target_parameters=["mlp.experts.down_proj"],
                                  init_lora_weights=False))
    batch = collate_padded(_rows(), pad_token_id=0)
    plain = _loss_and_grads(lambda **b: model(**b, use_cache=False).loss, model, batch)
    chunked = _loss_and_grads(CausalLMLoss(model, chunk=5, share_prefix=True), model, batch)
    _assert_same(chunked, plain)
    without = _loss_and_grads(lambda **b: model(**b, use_cache=False, output_router_logits=False).loss, model, batch)
    if aux and arch != "deepseek_v3":  # DeepSeek-V3 balances its router with a bias, not a loss
        assert plain[0] > without[0] + 1e-3
    else:
        torch.testing.assert_close(plain[0], without[0])


def test_the_loss_path_is_read_from_the_model_not_from_a_list_of_architectures():
    import transformers as tf

    from conftest import tiny_config
    from lorakit.train.loss import head_check

    # An architecture no list named (Helium): the same head, so the chunked loss, and it equals the model's.
    model = tf.AutoModelForCausalLM.from_config(tf.HeliumConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                                vocab_size=96, max_position_embeddings=64)).train()
    assert head_check(model) is None and split_head(model) is not None
    batch = collate_padded(_rows(4), pad_token_id=0)
    plain = _loss_and_grads(lambda **b: model(**b, use_cache=False).loss, model, batch)
    _assert_same(_loss_and_grads(CausalLMLoss(model, chunk=5), model, batch), plain)

    # A forward that changes its logits, with a config that says nothing about it: read from the source.
    class Scaled(tf.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits * 0.5
            return tf.modeling_outputs.CausalLMOutputWithPast(logits=logits)

    scaled = Scaled(tiny_config("llama"))
    assert "forward" in head_check(scaled) and split_head(scaled) is None
    # Config fields that transform the logits, also on a nested text config; and custom code.
    granite = tf.AutoModelForCausalLM.from_config(tf.GraniteConfig(**{**tiny_config("llama").to_dict(), "logits_scaling": 4.0}))
    assert "logits_scaling" in head_check(granite)
    llama = make_tiny("llama")
    assert head_check(llama) is None
    llama.config.model_type = "remote-code-arch"
    assert "not a causal LM that transformers registers" in head_check(llama)
