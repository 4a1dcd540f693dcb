"""The adapter registry: what it refuses (and why), slots, pins, LRU, replace, threads; PEFT's files."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from conftest import make_tiny
from serve.serve_helpers import WordTokenizer, peft_dora_adapter, save_random_adapter

from lorakit.errors import LorakitError
from lorakit.serve import AdapterNotFoundError, AdapterSlotsBusyError, Engine, SamplingParams
from lorakit.serve.layers import NO_ADAPTER
from lorakit.serve.registry import AdapterRegistry


@pytest.fixture(scope="module")
def base():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    return {name: save_random_adapter(base, root / name, r=r, seed=i)
            for i, (name, r) in enumerate([("a", 2), ("b", 4), ("c", 8)])}


def registry(base, **kwargs) -> AdapterRegistry:
    return AdapterRegistry(copy.deepcopy(base), **{"max_resident": 2, "max_rank": 8, **kwargs})


def test_info_and_slot_contents(base, folders):
    reg = registry(base)
    info = reg.add("b", folders["b"])
    assert (info.rank, info.modules, info.resident) == (4, 14, False)  # 7 linear modules x 2 layers
    slot = reg.acquire("b")
    assert reg.info("b").resident and reg.slot_ranks()[slot] == 4
    layer = reg.layers["model.layers.0.self_attn.q_proj"]
    from safetensors.torch import load_file

    tensors = load_file(folders["b"] / "adapter_model.safetensors")
    A = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    B = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(layer.lora_A[slot, :4], A)
    torch.testing.assert_close(layer.lora_Bt[slot, :4], (B * 8 / 4).T)  # alpha/r folded into B
    assert layer.lora_A[slot, 4:].abs().sum() == 0  # rank padding is zeros


def test_pins_lru_and_busy(base, folders):
    reg = registry(base)
    for name, folder in folders.items():
        reg.add(name, folder)
    sa, sb = reg.acquire("a"), reg.acquire("b")
    with pytest.raises(AdapterSlotsBusyError, match="all 2 slots are used"):
        reg.acquire("c")
    reg.release(sa)
    sc = reg.acquire("c")  # evicts a, the only unpinned one
    assert sc == sa and reg.resident() == ["b", "c"]
    reg.release(sb), reg.release(sc)
    assert reg.acquire(None) == NO_ADAPTER
    reg.release(reg.acquire("b"))  # b becomes the most recent; c is now the LRU
    reg.release(reg.acquire("a"))
    assert reg.resident() == ["b", "a"]


def test_remove_while_pinned_frees_on_release(base, folders):
    reg = registry(base)
    reg.add("a", folders["a"])
    slot = reg.acquire("a")
    reg.remove("a")
    assert reg.names() == [] and reg.resident() == []
    with pytest.raises(AdapterNotFoundError):
        reg.acquire("a")
    assert reg.slot_ranks()[slot] == 2  # still serving the running request
    reg.release(slot)
    assert reg.slot_ranks()[slot] == 0
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'a'"):
        reg.remove("a")


def test_replace_while_pinned(base, folders):
    reg = registry(base)
    reg.add("x", folders["a"])
    old = reg.acquire("x")
    with pytest.raises(LorakitError, match="already loaded"):
        reg.add("x", folders["b"])
    reg.add("x", folders["b"], replace=True)
    new = reg.acquire("x")
    assert new != old and reg.slot_ranks()[new] == 4 and reg.slot_ranks()[old] == 2
    reg.release(old)
    assert reg.slot_ranks()[old] == 0 and reg.resident() == ["x"]


def test_threads_add_remove_acquire(base, folders):
    reg = registry(base, max_resident=3)
    errors = []

    def worker(i):
        try:
            for j in range(15):
                name = f"t{i}"
                reg.add(name, folders["abc"[j % 3]], replace=True)
                try:
                    slot = reg.acquire(name)
                    reg.release(slot)
                except AdapterSlotsBusyError:
                    pass
                if j % 4 == 3:
                    reg.remove(name)
        except Exception as err:  # pragma: no cover - the assertion below reports it
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(reg.names()) == ["t0", "t1", "t2", "t3"]
    assert len(reg.resident()) <= 3 and set(reg.resident()) <= set(reg.names())


def test_refusals(base, folders, tmp_path):
    reg = registry(base, max_rank=4)
    with pytest.raises(LorakitError, match="rank 8, above this engine's max_rank 4"):
        reg.add("c", folders["c"])
    narrow = registry(base, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LorakitError, match="does not serve"):
        narrow.add("a", folders["a"])
    from transformers import LlamaConfig, LlamaForCausalLM

    big = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    save_random_adapter(big, tmp_path / "wide", r=2)
    with pytest.raises(LorakitError, match="different base model"):
        reg.add("wide", tmp_path / "wide")
    with pytest.raises(LorakitError, match="not allowed"):
        reg.add("bad name", folders["a"])
    with pytest.raises(LorakitError, match="does not exist"):
        reg.add("gone", tmp_path / "nothing")


def test_refuses_embedding_parts_on_a_linear_layer(base, tmp_path):
    """A file whose kind of LoRA (lora_embedding_A/B vs lora_A/B) does not fit the module is refused by name,
    even where the shapes would fit (not served as the other kind)."""
    from safetensors.torch import load_file, save_file

    folder = save_random_adapter(base, tmp_path / "swapped", r=2, targets=["embed_tokens"])
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    assert any("lora_embedding_A" in key for key in tensors)
    reg = registry(base)
    assert reg.add("ok", folder).modules == 1
    save_file({key.replace("lora_embedding_A", "lora_A.weight").replace("lora_embedding_B", "lora_B.weight"): t
               for key, t in tensors.items()}, path, metadata={"format": "pt"})
    with pytest.raises(LorakitError, match="holds a linear LoRA .* but is an embedding"):
        reg.add("swapped", folder)


def test_refuses_dora_bias_and_modules_to_save(base, tmp_path):
    reg = registry(base)
    dora = peft_dora_adapter(base, tmp_path / "dora")
    assert reg.add("dora", dora).dora  # served since issue #8 (test_serves_peft_dora_adapter_mixed)
    reg.remove("dora")
    save_random_adapter(base, tmp_path / "bias", r=2, lora_bias=True)
    with pytest.raises(LorakitError, match="lora_bias"):
        reg.add("bias", tmp_path / "bias")
    save_random_adapter(base, tmp_path / "mts", r=2, targets=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(LorakitError, match="modules_to_save"):
        reg.add("mts", tmp_path / "mts")
    save_random_adapter(base, tmp_path / "nan", r=2)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "nan" / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan" / "adapter_model.safetensors")
    with pytest.raises(LorakitError, match="NaN or inf"):
        reg.add("nan", tmp_path / "nan")
    config = json.loads((tmp_path / "nan" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and reg.names() == []


def test_peft_written_adapters_match_peft_mixed_batch(base, tmp_path):
    """Adapters saved by PEFT itself, served mixed: the same greedy tokens as PEFT's own
    ``adapter_names`` mixed batch (PEFT as the oracle)."""
    import peft

    work = copy.deepcopy(base)
    work.config.eos_token_id = work.generation_config.eos_token_id = None
    model = None
    for i, (name, targets) in enumerate([("p", ["q_proj", "v_proj"]), ("q", ["gate_proj", "down_proj", "o_proj"])]):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=4 + 2 * i, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(work, cfg, adapter_name=name) if model is None else model
        if i:
            model.add_adapter(name, cfg)
        model.save_pretrained(tmp_path / "peft", selected_adapters=[name])
    model.eval()
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_resident=2, max_rank=8)
    engine.load_adapter("p", tmp_path / "peft" / "p")
    engine.load_adapter("q", tmp_path / "peft" / "q")
    prompts = [[5, 9, 2, 33], [7, 1, 60, 61], [11, 4, 8, 8]]
    names = ["p", "q", "__base__"]
    ours = [h.result().token_ids for h in [engine.submit(prompt_ids=p, adapter=None if a == "__base__" else a,
                                                           params=SamplingParams(max_tokens=6, temperature=0))
                                           for p, a in zip(prompts, names)]]
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor(prompts), attention_mask=torch.ones(3, 4, dtype=torch.long),
                                adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours == theirs[:, 4:].tolist()
    assert ours[0] != ours[2] or ours[1] != ours[2]


def test_serves_peft_dora_adapter_mixed(base, tmp_path):
    """A DoRA adapter saved by PEFT (with a trained-looking magnitude), a plain PEFT LoRA adapter and
    the base in one batch: every row's logits equal PEFT's model with that adapter alone (PEFT
    cannot mix DoRA in one batch, so its rows run one by one)."""
    import peft

    from lorakit.serve.layers import LoraBatch

    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False),
        adapter_name="d")
    model.add_adapter("p", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                           init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape))
    for name in ("d", "p"):
        model.save_pretrained(tmp_path, selected_adapters=[name])
    model.eval()
    reg = registry(base)
    assert reg.add("d", tmp_path / "d").dora and not reg.add("p", tmp_path / "p").dora
    slots = [reg.acquire("d"), reg.acquire("p"), NO_ADAPTER, reg.acquire("d")]
    scale = reg.layers["model.layers.0.self_attn.q_proj"].lora_scale[slots[0]]
    assert (scale - 1).abs().max() > 0.05  # c ≠ 1: DoRA is not plain LoRA here
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(0))
    reg.context.plan = LoraBatch.build(slots, reg.slot_ranks(), reg.max_resident)
    with torch.no_grad():
        got = reg.model(input_ids=ids).logits
    reg.context.plan = None
    with torch.no_grad():
        expected = []
        for row, name in zip(ids, ["d", "p", None, "d"]):
            if name is None:
                with model.disable_adapter():
                    expected.append(model(input_ids=row[None]).logits[0])
            else:
                model.set_adapter(name)
                expected.append(model(input_ids=row[None]).logits[0])
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[2], atol=1e-3)  # the adapter changes the output


def test_dora_magnitude_mismatch_is_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = peft_dora_adapter(base, tmp_path / "dora")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_magnitude_vector" in k)
    tensors[key] = tensors[key][:-1]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorakitError, match="lora_magnitude_vector .*does not fit"):
        registry(base).add("bad", folder)
    del tensors[key]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorakitError, match="lacks lora_magnitude_vector"):
        registry(base).add("bad", folder)
