"""`lorakit export`'s files, read back with gguf.GGUFReader: metadata, names, shapes, dtypes, values;
the true scale folded in; refusals and bad input. (Against real llama.cpp: test_llama_cpp.py.)"""

from __future__ import annotations

import errno
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_config
from export.export_helpers import naive_gguf, random_adapter

from lorakit import LoraConfig
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.export.llama_cpp import export_gguf
from lorakit.export.trained import read_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from lorakit.models import load_model

    return load_model(str(smollm2_path), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama with tied embeddings, saved as a transformers folder (a base without a GGUF file)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    folder = tmp_path_factory.mktemp("tiny") / "base"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


def tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def decoded(t) -> torch.Tensor:
    """A GGUF tensor's values in numpy order (out, in) as fp32."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(shape).float()


def expected_update(adapter, base, module):
    """s · B A of ``module`` with B's rows in the base GGUF's order (what llama.cpp must compute)."""
    A, B = adapter.factors(module)
    order = base.layout.row_order(base.layout.gguf_name(module))
    return adapter.scale(module) * ((B if order is None else B[order]) @ A)


def llama_cpp_update(ts, name, alpha):
    """What llama.cpp computes from a file's factors: alpha / r · B A (r read off lora_b)."""
    A, B = decoded(ts[name + ".lora_a"]), decoded(ts[name + ".lora_b"])
    return (alpha / B.shape[1]) * (B @ A)


# -- the adapter file ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "a_type", "b_type", "tol"), [
    ("f32", Q.F32, Q.F32, 0.0), ("f16", Q.F16, Q.F16, 2e-3), ("bf16", Q.BF16, Q.BF16, 1.6e-2),
    ("q8_0", Q.Q8_0, Q.F16, 1.6e-2),  # lora_b rows are r = 16 long: not a multiple of Q8_0's 32
])
def test_adapter_file_reads_back_as_llama_cpp_requires(smollm2, smollm2_base, tmp_path, dtype, a_type, b_type, tol):
    folder = random_adapter(smollm2, tmp_path / "ad", LoraConfig(r=16, lora_alpha=32, target_modules=ALL,
                                                                 layers_to_transform=[0, 29]), std=0.01)
    out = tmp_path / "adapter.gguf"
    result = export_gguf(folder, smollm2_base, out, dtype=dtype)
    reader, ts = tensors(out)
    fields = {k: f for k, f in reader.fields.items()}
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields["adapter.lora.alpha"].contents() == 32.0 and result.alpha == 32.0 and not result.folded
    adapter = read_adapter(folder)
    assert len(ts) == 2 * len(adapter.modules) == 2 * 14 == result.tensors
    base_shapes = smollm2_base.layout.tensors
    for module in adapter.modules:
        name = smollm2_base.layout.gguf_name(module)
        A, B = adapter.factors(module)
        a, b = ts[name + ".lora_a"], ts[name + ".lora_b"]
        # gguf's ne order is reversed: lora_a (r, in) and lora_b (out, r) in numpy order
        assert a.shape.tolist() == [A.shape[1], 16] and b.shape.tolist() == [16, B.shape[0]]
        assert base_shapes[name] == (B.shape[0], A.shape[1])
        assert (a.tensor_type, b.tensor_type) == (a_type, b_type)
        got, want = llama_cpp_update(ts, name, 32.0), expected_update(adapter, smollm2_base, module)
        assert (got - want).abs().max() <= tol * want.abs().max() + 1e-12, module
        if dtype == "f32":  # plain LoRA: the factors as trained, B's q/k rows interleaved as the base's
            order = smollm2_base.layout.row_order(name)
            assert torch.equal(decoded(a), A) and torch.equal(decoded(b), B if order is None else B[order])
            assert (order is not None) == (module.endswith(("q_proj", "k_proj")))
    assert (result.f16_fallback != []) == (dtype == "q8_0")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rslora", "patterns"])
def test_true_peft_scale_is_folded_in_where_alpha_over_r_is_not_it(smollm2, smollm2_base, tmp_path, variant):
    if variant == "rslora":
        config = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                            layers_to_transform=[3, 29])
    else:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                            layers_to_transform=[3, 29], rank_pattern={"down_proj": 4, "layers.3.self_attn.q_proj": 12},
                            alpha_pattern={"k_proj": 40, "layers.29.mlp.down_proj": 2})
    folder = random_adapter(smollm2, tmp_path / "ad", config, std=0.01)
    out = export_gguf(folder, smollm2_base, tmp_path / "ours.gguf").path
    naive = naive_gguf(folder, smollm2_base, tmp_path / "naive.gguf")
    adapter = read_adapter(folder)
    (_, ours), (_, theirs) = tensors(out), tensors(naive)
    wrong = 0
    for module in adapter.modules:
        name = smollm2_base.layout.gguf_name(module)
        want = expected_update(adapter, smollm2_base, module)
        got = llama_cpp_update(ours, name, config.lora_alpha)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * want.abs().max()), module
        r = adapter.factors(module)[0].shape[0]
        assert ours[name + ".lora_b"].shape.tolist()[0] == r  # rank as trained (rank_pattern kept)
        off = llama_cpp_update(theirs, name, config.lora_alpha).norm() / want.norm()
        true_over_naive = adapter.scale(module) / (config.lora_alpha / r)
        assert off == pytest.approx(1 / true_over_naive, rel=1e-5)
        wrong += not math.isclose(true_over_naive, 1.0)
    # rsLoRA: every module is off by √r (×4 here); patterns: k_proj's and layer 29's down_proj's alpha
    assert wrong == (4 if variant == "rslora" else 3)


def test_a_transformers_base_gets_the_converters_layout(tiny, tiny_base, tmp_path):
    folder = random_adapter(tiny, tmp_path / "ad", LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
                            base=str(tiny_base))
    result = export_gguf(folder, str(tiny_base), tmp_path / "a.gguf", dtype="f32")
    _, ts = tensors(result.path)
    assert len(ts) == 2 * 7 * 2
    A, B = read_adapter(folder).factors("model.layers.1.self_attn.k_proj")
    order = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]  # 2 kv heads of 8 rows, halves interleaved
    assert torch.equal(decoded(ts["blk.1.attn_k.weight.lora_b"]), B[order])
    assert torch.equal(decoded(ts["blk.1.attn_k.weight.lora_a"]), A)


# -- what the LoRA form cannot hold ------------------------------------------------------------------


@pytest.mark.parametrize(("config", "reason"), [
    (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), "LoRA on embeddings"),
    (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), "lora_B biases"),
    (LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "trained biases"),  # Qwen2's q/k/v biases
    (LoraConfig(r=4, target_modules=["lm_head"]), "output head"),
])
def test_what_llama_cpp_lora_cannot_hold_is_refused_pointing_to_merged(tmp_path, capsys, config, reason):
    from transformers import AutoModelForCausalLM

    arch_config = tiny_config("qwen2")
    arch_config.tie_word_embeddings = True
    tiny = AutoModelForCausalLM.from_config(arch_config, dtype=torch.float32).eval()
    tiny_base = tmp_path / "base"
    tiny.save_pretrained(tiny_base)
    folder = random_adapter(tiny, tmp_path / "ad", config, base=str(tiny_base))
    out = tmp_path / "a.gguf"
    assert main(["export", str(folder), "--to", "gguf", "--base", str(tiny_base), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert reason in err and "--merged" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base"]


# -- bad input ---------------------------------------------------------------------------------------


def test_an_adapter_for_another_base_is_refused_naming_module_and_shapes(tiny, tiny_base, smollm2_base, tmp_path):
    folder = random_adapter(tiny, tmp_path / "ad", LoraConfig(r=4, target_modules=["down_proj"]), base=str(tiny_base))
    with pytest.raises(LorakitError) as caught:
        export_gguf(folder, smollm2_base, tmp_path / "a.gguf")
    message = str(caught.value)
    assert ("model.layers.0.mlp.down_proj is 32×64 (out×in) in the adapter but blk.0.ffn_down.weight is 576×1536"
            in message)
    assert "trained on another base model" in message
    assert not (tmp_path / "a.gguf").exists()


def test_a_base_gguf_of_another_architecture_is_refused(smollm2, tmp_path):
    # A qwen2 GGUF whose tensors have SmolLM2's names and shapes: only the architecture tells them apart.
    fake = tmp_path / "qwen2.gguf"
    writer = gguf.GGUFWriter(fake, "qwen2")
    writer.add_type("model")
    writer.add_block_count(30)
    writer.add_head_count(9)
    writer.add_head_count_kv(3)
    writer.add_tensor("blk.29.ffn_down.weight", np.zeros((576, 1536), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = random_adapter(smollm2, tmp_path / "ad", LoraConfig(r=4, target_modules=["down_proj"],
                                                                 layers_to_transform=[29]))
    with pytest.raises(LorakitError, match="trained on 'smollm2-135m-instruct', a llama model, but the base .* is "
                                           "a qwen2 model"):
        export_gguf(folder, str(fake), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_unwritable_outputs_leave_nothing_behind(tiny, tiny_base, tmp_path, capsys, monkeypatch):
    folder = random_adapter(tiny, tmp_path / "ad", LoraConfig(r=4, target_modules=ALL), base=str(tiny_base))
    args = ["export", str(folder), "--to", "gguf", "--base", str(tiny_base)]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([*args, "--out", str(blocker / "sub" / "a.gguf")]) == 2
    assert "is not a writable folder" in capsys.readouterr().err

    # the disk fills up while the tensors are written: no file, no temporary file, no new folder
    def full(self, tensor, *rest):
        if self.fout[0].tell() > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *rest)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / "new" / "deeper" / "a.gguf"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"writing {out} failed" in err and "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ad"]
    monkeypatch.undo()

    existing = tmp_path / "a.gguf"
    existing.write_bytes(b"keep me")
    assert main([*args, "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main([*args, "--out", str(existing), "--force"]) == 0
    assert "llama.cpp LoRA adapter written to" in capsys.readouterr().out
    assert gguf.GGUFReader(existing).fields["general.type"].contents() == "adapter"
    assert main([*args, "--out", str(tmp_path / "a.bin")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--to", "gguf", "--base", str(tiny_base), "--out",
                 str(tmp_path / "b.gguf")]) == 2
    assert "nope does not exist" in capsys.readouterr().err


def test_merged_needs_a_gguf_base_to_copy_tokenizer_and_template_from(tiny, tiny_base, tmp_path):
    folder = random_adapter(tiny, tmp_path / "ad", LoraConfig(r=4, target_modules=["q_proj"]), base=str(tiny_base))
    with pytest.raises(LorakitError, match="--merged needs the base model as a GGUF file"):
        export_gguf(folder, str(tiny_base), tmp_path / "m.gguf", merged=True)


# -- the merged model file --------------------------------------------------------------------------


@pytest.mark.slow
def test_merged_file_keeps_the_base_metadata_and_layout_and_adds_an_untied_head(smollm2, smollm2_base, tmp_path):
    from lorakit import load_adapter
    from lorakit.merging import merge_and_unload

    folder = random_adapter(smollm2, tmp_path / "ad", LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                 layers_to_transform=None), std=0.01)
    out = tmp_path / "merged.gguf"
    result = export_gguf(folder, smollm2_base, out, merged=True, dtype="q8_0")
    assert result.added == ["output.weight"] and result.copied == []
    reader, ts = tensors(out)
    base = smollm2_base.layout.reader
    for key, found in base.fields.items():
        if not key.startswith("GGUF.") and key != "general.file_type":
            assert reader.fields[key].contents() == found.contents(), key
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert set(ts) == {t.name for t in base.tensors} | {"output.weight"}
    assert ts["blk.0.attn_norm.weight"].tensor_type == Q.F32 and ts["blk.5.attn_q.weight"].tensor_type == Q.Q8_0
    # the merged weights, rows as the base stores them: W + ΔW of lorakit's own merge
    from lorakit.models import load_model

    model = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    load_adapter(model, folder)
    merged = merge_and_unload(model)
    q = merged.model.layers[5].self_attn.q_proj.weight.detach()
    order = smollm2_base.layout.row_order("blk.5.attn_q.weight")
    for name, want in (("blk.5.attn_q.weight", q[order]), ("output.weight", merged.lm_head.weight.detach()),
                       ("token_embd.weight", merged.model.embed_tokens.weight.detach())):
        got = decoded(ts[name])
        assert (got - want).abs().max() <= 0.01 * want.abs().max(), name  # Q8_0's rounding
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)


# -- Ollama ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ollama_folder_has_the_adapter_and_a_modelfile(smollm2, smollm2_base, tmp_path, capsys):
    folder = random_adapter(smollm2, tmp_path / "ad", LoraConfig(r=4, target_modules=["q_proj"],
                                                                 layers_to_transform=[1]))
    out = tmp_path / "my-model"
    assert main(["export", str(folder), "--to", "ollama", "--base", "smollm2-135m-instruct", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create my-model -f {out / 'Modelfile'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf"]
    lines = [line for line in (out / "Modelfile").read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"FROM {smollm2_base.gguf.resolve()}", "ADAPTER ./adapter.gguf",
                     'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    assert gguf.GGUFReader(out / "adapter.gguf").fields["general.type"].contents() == "adapter"
    # a failing export leaves neither the folder nor a temporary one
    assert main(["export", str(folder), "--to", "ollama", "--base", "smollm2-135m-instruct", "--out",
                 str(tmp_path / "other"), "--dtype", "f16", "--merged", "--force"]) == 0
    assert [line for line in (tmp_path / "other" / "Modelfile").read_text().splitlines()
            if line.startswith(("FROM", "ADAPTER"))] == ["FROM ./model.gguf"]
    assert main(["export", str(tmp_path / "nope"), "--to", "ollama", "--base", "smollm2-135m-instruct", "--out",
                 str(tmp_path / "third")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "my-model", "other"]


def test_a_base_gguf_whose_rows_match_no_known_order_is_refused(smollm2_base):
    from lorakit.export.layout import Layout, check_row_order

    layout = Layout(**{**smollm2_base.layout.__dict__, "rope_rows": {}, "_names": None})
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(576, 576)}
    with pytest.raises(LorakitError, match="rows of blk.0.attn_q.weight match the converted weight .* in no order"):
        check_row_order(layout, weights.__getitem__, {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight"})
    assert "attn_q" not in layout.rope_rows
