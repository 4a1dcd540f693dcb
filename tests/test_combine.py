"""Combining adapters on ΔW: exact cat/linear, best rank-K svd, TIES/DARE against NumPy, rsLoRA vs PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny
from peft_oracle import logits, peft_load

from lorakit import LoraConfig, LorakitError, add_adapter, load_adapter, save_adapter, set_active
from lorakit.adapters.lora import LoraLayer
from lorakit.cli import main
from lorakit.combine import combine_adapters, combine_folders, module_generator
from lorakit.inject import named_adapter_layers


def _two_adapters(model, *, same_targets: bool = False):
    """Adapter a: rank 4, alpha 8, q/v + embedding; b: rank 2, rsLoRA, a rank/alpha pattern, other targets."""
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                  init_lora_weights=False), "a")
    targets = ["q_proj", "v_proj", "embed_tokens"] if same_targets else ["q_proj", "k_proj", "down_proj"]
    add_adapter(model, LoraConfig(r=2, lora_alpha=6, target_modules=targets, use_rslora=True,
                                  rank_pattern={"k_proj": 3}, alpha_pattern={"down_proj": 1.5},
                                  init_lora_weights=False), "b", activate=False)
    return model


def _deltas(model, name):
    return {m: layer.delta_weight(name).detach().double() for m, layer in named_adapter_layers(model)
            if isinstance(layer, LoraLayer) and name in layer.options}


def _expected_sum(model, names, weights):
    per = [_deltas(model, n) for n in names]
    modules = {m for d in per for m in d}
    return {m: sum(w * d[m] for d, w in zip(per, weights) if m in d) for m in modules}


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_reproduce_the_weighted_sum_exactly(method):
    model = _two_adapters(make_tiny("llama"), same_targets=method == "linear")
    weights = [0.7, -0.4]
    result = combine_adapters(model, ["a", "b"], "ab", weights, method=method)
    expected = _expected_sum(model, ["a", "b"], weights)
    got = _deltas(model, "ab")
    assert set(got) == set(expected)
    for module, want in expected.items():
        torch.testing.assert_close(got[module], want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert result.min_kept_energy == pytest.approx(1.0)
    ranks = {m: layer.options["ab"].r for m, layer in named_adapter_layers(model) if "ab" in layer.options}
    assert ranks["model.layers.0.self_attn.q_proj"] == 6  # 4 + 2 = Σ r: exact needs the full rank
    if method == "cat":
        assert ranks["model.layers.0.self_attn.k_proj"] == 3  # only b (rank_pattern 3) adapts k_proj


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_gpt2_conv1d_adapters_combine_exactly(method, input_ids):
    model = make_tiny("gpt2")  # Conv1D stores W as (in, out): fan_in_fan_out
    add_adapter(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False), "a")
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], use_rslora=True,
                                  init_lora_weights=False), "b", activate=False)
    rank = None if method == "cat" else 6  # 6 = 4 + 2: svd at full rank is exact too
    result = combine_adapters(model, ["a", "b"], "ab", [1.0, 1.0], method=method, rank=rank)
    assert result.config.fan_in_fan_out is True
    expected = _expected_sum(model, ["a", "b"], [1.0, 1.0])
    for module, delta in _deltas(model, "ab").items():
        torch.testing.assert_close(delta, expected[module], rtol=0, atol=1e-5 * float(expected[module].abs().max()))
    set_active(model, ["a", "b"])
    both = logits(model, input_ids)
    set_active(model, ["ab"])
    torch.testing.assert_close(logits(model, input_ids), both, rtol=1e-5, atol=1e-5)


def test_cat_with_unit_weights_equals_both_adapters_active(input_ids):
    model = _two_adapters(make_tiny("llama"))
    set_active(model, ["a", "b"])
    both = logits(model, input_ids)
    combine_adapters(model, ["a", "b"], "ab", method="cat", activate=True)
    torch.testing.assert_close(logits(model, input_ids), both, rtol=1e-5, atol=1e-5)


def test_combined_folder_loads_in_peft_with_the_same_logits(tmp_path, input_ids):
    model = _two_adapters(make_tiny("llama"))
    save_adapter(model, tmp_path / "a", names=["a"])
    save_adapter(model, tmp_path / "b", names=["b"])
    result = combine_folders([tmp_path / "a/a", tmp_path / "b/b"], tmp_path / "ab", [0.5, 2.0], method="cat")
    # Different ranks per module: rank_pattern and alpha_pattern keep the scaling at 1 everywhere.
    assert result.config.rank_pattern and result.config.rank_pattern == result.config.alpha_pattern
    config = json.loads((tmp_path / "ab/adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and config["use_rslora"] is False
    ours = make_tiny("llama")
    load_adapter(ours, tmp_path / "ab")
    want = _expected_sum(model, ["a", "b"], [0.5, 2.0])
    for module, delta in _deltas(ours, "default").items():
        torch.testing.assert_close(delta, want[module], rtol=0, atol=1e-5 * float(want[module].abs().max()))
    peft_model = peft_load(make_tiny("llama"), tmp_path / "ab")
    torch.testing.assert_close(logits(peft_model, input_ids), logits(ours, input_ids), rtol=1e-5, atol=1e-5)


def test_svd_is_the_best_rank_k_approximation():
    model = _two_adapters(make_tiny("llama"), same_targets=True)
    weights = [1.0, 0.5]
    result = combine_adapters(model, ["a", "b"], "low", weights, method="svd", rank=3)
    expected = _expected_sum(model, ["a", "b"], weights)
    for module, delta in _deltas(model, "low").items():
        U, S, Vt = np.linalg.svd(expected[module].numpy(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vt[:3]
        np.testing.assert_allclose(delta.numpy(), best, atol=1e-5 * np.abs(best).max())
        assert np.linalg.matrix_rank(delta.numpy(), tol=1e-6 * S[0]) == 3
    assert 0.5 < result.min_kept_energy < 1.0  # rank 6 truncated to 3 loses something


# -- NumPy reference of the formulas on ΔW --------------------------------------------------------


def _np_trim(x, density):
    k = int(density * x.size + 0.5)
    out = np.zeros_like(x)
    idx = np.argsort(-np.abs(x), axis=None)[:k]
    out.flat[idx] = x.flat[idx]
    return out


def _np_ties(xs, weights):
    xs, w = np.stack(xs), np.asarray(weights)[:, None, None]
    sign = np.sign((w * xs).sum(0))
    agree = (np.sign(xs) == sign) & (xs != 0)
    num, den = (w * xs * agree).sum(0), (w * agree).sum(0)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _np_reference(method, deltas, weights, density, module, seed):
    if method == "magnitude_prune":
        return sum(w * _np_trim(d, density) for d, w in zip(deltas, weights))
    if method == "ties":
        return _np_ties([_np_trim(d, density) for d in deltas], weights)
    g = module_generator(seed, module)  # the documented mask source: one draw per adapter, in order
    dropped = [np.where(torch.rand(d.shape, generator=g, dtype=torch.float64).numpy() < density, d / density, 0.0)
               for d in deltas]
    if method == "dare_linear":
        return sum(w * d for d, w in zip(dropped, weights))
    return _np_ties(dropped, weights)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_ties_and_dare_match_numpy_on_delta_w(method):
    model = _two_adapters(make_tiny("llama"))
    weights, density, seed = [0.6, 0.9], 0.3, 7
    full = 32  # every tiny module has min(out, in) >= 32: the SVD keeps everything
    combine_adapters(model, ["a", "b"], "m", weights, method=method, rank=full, density=density, seed=seed)
    per = [_deltas(model, n) for n in ("a", "b")]
    got = _deltas(model, "m")
    assert set(got) == set(per[0]) | set(per[1])
    for module, delta in got.items():
        # Embeddings are combined as stored, (dim, vocab): the transpose of their base layout.
        flip = (lambda x: x.T) if module.endswith("embed_tokens") else (lambda x: x)
        present = [(flip(d[module].numpy()), w) for d, w in zip(per, weights) if module in d]
        want = flip(_np_reference(method, [p for p, _ in present], [w for _, w in present], density, module, seed))
        scale = np.abs(want).max()
        np.testing.assert_allclose(delta.numpy(), want, atol=1e-5 * scale)
        assert 0 < np.count_nonzero(want) < want.size  # trimming / dropping really removed entries


def test_dare_keeps_the_expectation_and_the_seed_decides():
    model = _two_adapters(make_tiny("llama"), same_targets=True)
    combine_adapters(model, ["a"], "d1", [1.0], method="dare_linear", rank=32, density=0.5, seed=1)
    combine_adapters(model, ["a"], "d2", [1.0], method="dare_linear", rank=32, density=0.5, seed=1)
    combine_adapters(model, ["a"], "d3", [1.0], method="dare_linear", rank=32, density=0.5, seed=2)
    module = "model.layers.0.self_attn.q_proj"
    d1, d2, d3, a = (_deltas(model, n)[module] for n in ("d1", "d2", "d3", "a"))
    torch.testing.assert_close(d1, d2)
    assert not torch.allclose(d1, d3)
    survived = d1.abs() > 1e-5 * float(a.abs().max())  # factors are fp32: dropped entries are ~1e-9, not 0
    assert 0.4 < float(survived.double().mean()) < 0.6
    torch.testing.assert_close(d1[survived], 2 * a[survived], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d1[~survived], torch.zeros_like(d1[~survived]), rtol=0, atol=1e-5 * float(a.abs().max()))


def test_rslora_combination_is_exact_where_peft_is_not():
    import peft

    def peft_cfg():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                               init_lora_weights=False)

    base = make_tiny("llama")
    theirs = peft.get_peft_model(base, peft_cfg(), adapter_name="a")
    theirs.add_adapter("b", peft_cfg())
    theirs.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="linear")
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    want = 0.7 * layer.get_delta_weight("a") + 0.3 * layer.get_delta_weight("b")
    peft_error = float((layer.get_delta_weight("mix") - want).norm() / want.norm())
    assert peft_error > 0.5  # PEFT mixes A's and B's separately and rescales: far from Σ wᵢ ΔWᵢ

    ours = make_tiny("llama")  # same seed: same base; copy PEFT's adapter tensors into ours
    for name in ("a", "b"):
        add_adapter(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True), name)
    with torch.no_grad():
        for module, ours_layer in named_adapter_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(module)
            for name in ("a", "b"):
                ours_layer.lora_A[name].weight.copy_(peft_layer.lora_A[name].weight)
                ours_layer.lora_B[name].weight.copy_(peft_layer.lora_B[name].weight)
    combine_adapters(ours, ["a", "b"], "mix", [0.7, 0.3], method="linear")
    got = ours.model.layers[0].self_attn.q_proj.delta_weight("mix")
    assert float((got - want).norm() / want.norm()) < 1e-6


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_refused_with_clear_messages(tmp_path):
    model = _two_adapters(make_tiny("llama"))
    save_adapter(model, tmp_path / "src", names=["a", "b"], base_model_name_or_path="tiny-llama")
    a, b = tmp_path / "src/a", tmp_path / "src/b"
    out = tmp_path / "out"
    with pytest.raises(LorakitError, match="linear needs every adapter to adapt the same modules.*use cat"):
        combine_folders([a, b], out, method="linear")
    with pytest.raises(LorakitError, match="does not exist"):
        combine_folders([a, tmp_path / "missing"], out)
    with pytest.raises(LorakitError, match="2 adapter.*3 weight"):
        combine_folders([a, b], out, [1, 2, 3])
    with pytest.raises(LorakitError, match="cat is exact"):
        combine_folders([a, b], out, method="cat", rank=4)
    with pytest.raises(LorakitError, match="density .* must lie in"):
        combine_folders([a, b], out, method="ties", density=1.5)
    # Another base: a different recorded base model, and different shapes.
    other = make_tiny("qwen2")
    add_adapter(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(other, tmp_path / "qwen", base_model_name_or_path="tiny-qwen")
    with pytest.raises(LorakitError, match="different base models.*tiny-llama.*tiny-qwen"):
        combine_folders([a, tmp_path / "qwen"], out)
    wide = make_tiny("llama")
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)
    add_adapter(wide, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(wide, tmp_path / "wide", base_model_name_or_path="tiny-llama")
    with pytest.raises(LorakitError, match="q_proj is 32x32 in .* but 48x32 .*different base models"):
        combine_folders([a, tmp_path / "wide"], out)
    dora = make_tiny("llama")
    add_adapter(dora, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    save_adapter(dora, tmp_path / "dora", base_model_name_or_path="tiny-llama")
    with pytest.raises(LorakitError, match="DoRA adapter.*merge it into the base instead"):
        combine_folders([a, tmp_path / "dora"], out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_combine_writes_an_adapter_and_refuses_to_overwrite(tmp_path, capsys):
    model = _two_adapters(make_tiny("llama"))
    save_adapter(model, tmp_path / "src", names=["a", "b"])
    args = ["combine", str(tmp_path / "src/a"), str(tmp_path / "src/b"), "--weights", "0.7", "0.3",
            "--method", "ties", "--density", "0.5", "--rank", "4", "--out", str(tmp_path / "mix")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ties" in text and "rank 4" in text and str(tmp_path / "mix") in text
    ours = make_tiny("llama")
    load_adapter(ours, tmp_path / "mix")
    assert {layer.options["default"].r for _, layer in named_adapter_layers(ours)} == {4}
    before = (tmp_path / "mix/adapter_model.safetensors").read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "mix/adapter_model.safetensors").read_bytes() == before
    assert main([*args, "--force", "--seed", "3"]) == 0


# -- mixture-of-experts: expert weights (target_parameters) -------------------------------------------


def _expert_adapters():
    from moe_models import make_moe

    model = make_moe("qwen3_moe")
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False), "a")
    add_adapter(model, LoraConfig(r=3, lora_alpha=3, use_rslora=True, target_modules="all-linear",
                                  init_lora_weights=False), "b", activate=False)
    return model


@pytest.mark.parametrize("method,rank", [("cat", None), ("linear", None), ("svd", 10)])  # gate_up: 2·2 + 2·3
def test_expert_adapters_combine_exactly(method, rank):
    """Per expert, ΔW = Σ wᵢ ΔWᵢ (svd at rank Σ r is exact); the result is in PEFT's expert layout."""
    from moe_models import moe_ids

    model = _expert_adapters()
    weights = [0.6, -1.3]
    result = combine_adapters(model, ["a", "b"], "ab", weights, method=method, rank=rank)
    expected = _expected_sum(model, ["a", "b"], weights)
    got = _deltas(model, "ab")
    experts = [m for m in got if got[m].dim() == 3]
    assert len(experts) == 4 and set(got) == set(expected)  # 2 layers × (gate_up, down), plus attention, router
    for module, want in expected.items():
        torch.testing.assert_close(got[module], want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert result.config.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
    if method == "cat":  # cat with unit weights == both adapters active
        combine_adapters(model, ["a", "b"], "both", method="cat")
        set_active(model, ["a", "b"])
        ids = moe_ids()
        expected_logits = logits(model, ids)
        set_active(model, ["both"])
        torch.testing.assert_close(logits(model, ids), expected_logits, rtol=1e-5, atol=1e-5)


def test_combined_expert_folder_loads_in_peft(tmp_path):
    from moe_models import make_moe, moe_ids

    model = _expert_adapters()
    save_adapter(model, tmp_path / "in")
    result = combine_folders([tmp_path / "in/a", tmp_path / "in/b"], tmp_path / "ab", [1.0, 0.5], method="linear")
    assert result.min_kept_energy == pytest.approx(1.0)
    ours = make_moe("qwen3_moe")
    load_adapter(ours, tmp_path / "ab")
    want = _expected_sum(model, ["a", "b"], [1.0, 0.5])
    for module, delta in _deltas(ours, "default").items():
        torch.testing.assert_close(delta, want[module], rtol=0, atol=1e-5 * float(want[module].abs().max()))
    ids = moe_ids()
    torch.testing.assert_close(logits(peft_load(make_moe("qwen3_moe"), tmp_path / "ab"), ids), logits(ours, ids),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(LorakitError, match="ties on expert weights.*cat, linear or svd"):
        combine_folders([tmp_path / "in/a", tmp_path / "in/b"], tmp_path / "t", method="ties")
