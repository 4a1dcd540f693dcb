"""Spectrum: the SNR math on synthetic Marchenko–Pastur matrices, selection, the streaming scan,
its cache, the CLI, and a Spectrum training run that changes exactly the selected tensors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.spectrum import (CONFIG_NAME, WEIGHTS_NAME, MatrixSnr, freeze_for_spectrum, load_spectrum, module_type,
                              save_spectrum, scan, select, selected_modules, snr, snr_from_singular_values)


# LAPACK's SVD with 2 threads on a busy 2-core machine is up to 10× slower than with 1.
pytestmark = pytest.mark.usefixtures("one_thread")


def noise(m: int, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def planted(m: int, n: int, rank: int, strength: float, seed: int) -> torch.Tensor:
    """Unit-variance noise plus a rank-``rank`` signal whose singular values are strength·√n."""
    g = torch.Generator().manual_seed(seed + 1000)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    return noise(m, n, seed) + strength * math.sqrt(n) * u @ v.T


def mp_singular_value_quantiles(m: int, n: int, qs: list[float]) -> list[float]:
    """Quantiles of the singular values of an m×n (m ≤ n) unit-variance noise matrix, from the
    Marchenko–Pastur law: eigenvalues λ of XXᵀ/n have density √((λ₊−λ)(λ−λ₋)) / (2πβλ)."""
    beta = m / n
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    lam = np.linspace(lo, hi, 400_001)
    dens = np.sqrt(np.clip((hi - lam) * (lam - lo), 0, None)) / (2 * math.pi * beta * lam)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(lam))])
    cdf /= cdf[-1]
    return [math.sqrt(n * float(np.interp(q, cdf, lam))) for q in qs]


# ----------------------------------------------------------------------------- the math


def test_snr_matches_an_independent_numpy_computation():
    w = noise(48, 80, seed=3) + 0.5 * torch.outer(torch.linspace(-1, 1, 48, dtype=torch.float64),
                                                    torch.ones(80, dtype=torch.float64))
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    q1, q3 = np.percentile(s, [25, 75])
    thr = (q3 - q1) / 1.349 * (1 + math.sqrt(48 / 80))
    expected = s[s > thr].sum() / s[s <= thr].sum() / s.max()
    assert snr(w) == pytest.approx(expected, rel=1e-5)
    assert snr(w.T) == pytest.approx(expected, rel=1e-5)  # orientation does not matter


def test_threshold_sits_where_marchenko_pastur_puts_it():
    m, n = 200, 600
    stats = snr_from_singular_values(torch.linalg.svdvals(noise(m, n, seed=0).float()), (m, n))
    q1, q3 = mp_singular_value_quantiles(m, n, [0.25, 0.75])
    expected = (q3 - q1) / 1.349 * (1 + math.sqrt(m / n))
    assert stats["threshold"] == pytest.approx(expected, rel=0.03)
    # Scaling the matrix scales σ and the threshold; the signal/noise ratio is scale-free, and the
    # reference's division by max(S) makes the SNR scale as 1/scale (so compare within a type only).
    scaled = snr_from_singular_values(torch.linalg.svdvals(noise(m, n, seed=0, scale=7.0).float()), (m, n))
    assert scaled["threshold"] == pytest.approx(7.0 * stats["threshold"], rel=1e-5)
    assert scaled["n_signal"] == stats["n_signal"]
    assert scaled["snr"] == pytest.approx(stats["snr"] / 7.0, rel=1e-5)


def test_snr_orders_matrices_by_their_true_signal_to_noise():
    m, n, k = 128, 384, 4
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(m, 16, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=torch.float64))
    bulk_edge = math.sqrt(n) * (1 + math.sqrt(m / n))  # MP edge of unit-variance noise

    def stats(rank: int, noise_level: float) -> dict[str, float]:
        signal = 2.0 * bulk_edge * u[:, :rank] @ v[:, :rank].T  # rank spikes at twice the edge
        w = signal + noise_level * noise(m, n, seed=0)
        return snr_from_singular_values(torch.linalg.svdvals(w), (m, n))

    # Same signal, more noise (true SNR 2·edge/ν): lower SNR, from clear spikes to spikes lost in
    # the bulk. (More spikes at fixed noise do not order: IQR(S) and max(S) move with them.)
    by_noise = [stats(k, nu)["snr"] for nu in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 6, by_noise
    # The planted spikes sit where BBP puts them, above the threshold.
    beta, theta = m / n, 2.0 * (1 + math.sqrt(m / n))
    r = stats(k, 1.0)
    assert r["max_sv"] == pytest.approx(math.sqrt(n * (1 + theta**2) * (beta + theta**2)) / theta, rel=0.03)
    assert r["max_sv"] > r["threshold"]


def test_reference_normalisation_makes_a_single_stronger_spike_lower_the_snr():
    # A documented property of Spectrum's definition (SNR divided by max S), kept on purpose:
    # at fixed noise, scaling one spike up raises max(S) faster than the signal sum.
    m, n = 128, 384
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(m, 1, generator=g, dtype=torch.float64), torch.randn(1, n, generator=g, dtype=torch.float64)
    spike = u @ v / (u.norm() * v.norm())
    values = [snr_from_singular_values(torch.linalg.svdvals((noise(m, n, 0) + a * math.sqrt(n) * spike).float()),
                                       (m, n))["snr"]
              for a in (4.0, 8.0, 16.0)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("bad", [torch.zeros(8, 4), torch.full((8, 4), float("nan"))])
def test_degenerate_matrices_raise_instead_of_nan(bad):
    with pytest.raises(ValueError):
        snr(bad)


def test_module_type_groups_by_name_after_the_layer_index():
    assert module_type("model.layers.12.mlp.down_proj.weight") == ("mlp.down_proj", 12)
    assert module_type("transformer.h.3.attn.c_attn.weight") == ("attn.c_attn", 3)
    assert module_type("model.layers.2.mlp.experts.7.up_proj.weight") == ("mlp.experts.*.up_proj", 2)
    assert module_type("model.embed_tokens.weight") is None
    assert module_type("lm_head.weight") is None


@pytest.mark.parametrize("top", [0, 10, 25, 33.3, 50, 99, 100])
def test_selection_keeps_int_len_pct_per_group_and_the_highest_snr(top):
    gen = torch.Generator().manual_seed(0)
    results = [MatrixSnr(f"model.layers.{i}.{kind}.weight", kind, i, (4, 4), float(torch.rand(1, generator=gen)),
                         1.0, 1.0, 1.0, 1)
               for kind, count in [("self_attn.q_proj", 30), ("mlp.up_proj", 7), ("mlp.down_proj", 3), ("x.y", 1)]
               for i in range(count)]
    chosen = select(results, top)
    for kind, count in [("self_attn.q_proj", 30), ("mlp.up_proj", 7), ("mlp.down_proj", 3), ("x.y", 1)]:
        group = [r for r in results if r.module_type == kind]
        mine = [r for r in chosen if r.module_type == kind]
        assert len(mine) == int(count * top / 100)
        if mine and len(mine) < count:
            assert min(r.snr for r in mine) >= max(r.snr for r in group if r not in mine)
    assert selected_modules(results, top) == [r.name.removesuffix(".weight") for r in chosen]
    with pytest.raises(LorakitError):
        select(results, 120)


# ----------------------------------------------------------------------------- the scan


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def test_scan_streams_shards_and_matches_in_memory_snr(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    results = scan(tiny_folder, cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    weights = {n: p for n, p in model.named_parameters() if p.dim() == 2 and module_type(n)}
    assert [r.name for r in results] == sorted(weights, key=lambda n: (module_type(n)[1], n))
    for r in results:
        assert r.snr == pytest.approx(snr(weights[r.name]), rel=1e-6)
        assert r.shape == tuple(weights[r.name].shape)
    assert {r.module_type for r in results} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_scan_holds_one_matrix_at_a_time(tiny_folder, tmp_path, monkeypatch):
    import weakref

    import safetensors

    real_open, live, peak = safetensors.safe_open, [0], [0]

    class Tracking:  # safe_open whose tensors are counted while alive
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            t = self.handle.get_tensor(name)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Tracking)
    results = scan(tiny_folder, use_cache=False)
    assert len(results) == 28 and peak[0] == 1 and live[0] == 0


def test_scan_cache_is_keyed_by_file_identity(tiny_folder, tmp_path, monkeypatch):
    first = scan(tiny_folder, cache_dir=tmp_path)
    assert len(list((tmp_path / "spectrum").glob("*.json"))) == 1
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: pytest.fail("cache miss"))
    assert scan(tiny_folder, cache_dir=tmp_path) == first
    shard = sorted(tiny_folder.glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(BaseException, match="cache miss"):
        scan(tiny_folder, cache_dir=tmp_path)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(LorakitError, match="no \\*.safetensors"):
        scan(tmp_path, cache_dir=tmp_path)


@pytest.mark.slow
def test_smollm2_scan(smollm2_path):
    from safetensors import safe_open

    results = scan(smollm2_path)  # the normal cache: a full scan once (≈6–20 s on 2 cores), then instant
    assert len(results) == 30 * 7
    assert all(math.isfinite(r.snr) and r.snr > 0 for r in results)
    assert len(selected_modules(results, 25)) == 7 * int(30 * 25 / 100)
    with safe_open(str(smollm2_path / "model.safetensors"), framework="pt") as f:
        for r in (results[0], results[100], results[-1]):  # the cached values are the real ones
            assert r.snr == pytest.approx(snr(f.get_tensor(r.name)), rel=1e-5)


# ----------------------------------------------------------------------------- training


def test_spectrum_run_trains_only_the_selected_tensors(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    modules = selected_modules(scan(tiny_folder, cache_dir=tmp_path), 25)
    assert len(modules) == 7  # 7 module types × int(4 · 25 / 100)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = freeze_for_spectrum(model, modules)  # embeddings and head train too, as the reference
    expected = sorted([f"{m}.weight" for m in modules] + ["model.embed_tokens.weight", "lm_head.weight"])
    assert trainable == expected
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in expected:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # bit-identical
    out = save_spectrum(model, tmp_path / "run", base_model=str(tiny_folder), top=25)
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        assert sorted(f.keys()) == expected
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["method"] == "spectrum" and config["tensors"] == expected and config["top_percent"] == 25
    fresh = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    assert load_spectrum(fresh, out) == expected
    for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n


def test_freeze_without_embeddings_and_bad_inputs(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    assert freeze_for_spectrum(model, ["model.layers.1.mlp.up_proj"], train_embeddings=False) == \
        ["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(LorakitError, match="no 2-D weight"):
        freeze_for_spectrum(model, ["model.layers.9.mlp.up_proj"])
    out = save_spectrum(model, tmp_path / "s")
    import transformers as tf

    other = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4))
    with pytest.raises(LorakitError, match="shape"):
        load_spectrum(other, out)
    with pytest.raises(LorakitError, match=CONFIG_NAME):
        load_spectrum(model, tmp_path)


# ----------------------------------------------------------------------------- CLI


def test_cli_spectrum_table_and_yaml(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sel.yaml"
    assert main(["spectrum", str(tiny_folder), "--top", "50", "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "mlp.down_proj  (2 of 4 selected" in text.out and "spectrum: 28/28 matrices" in text.err
    config = yaml.safe_load(out.read_text())
    results = scan(tiny_folder, cache_dir=tmp_path / "cache")
    assert config["adapter"]["method"] == "spectrum"
    assert config["adapter"]["targets"] == selected_modules(results, 50)
    assert main(["spectrum", str(tiny_folder), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["selected"]) == 7


def test_cli_spectrum_user_errors(tiny_folder, capsys):
    assert main(["spectrum", str(tiny_folder), "--top", "150"]) == 2
    assert "--top 150: expected a percentage" in capsys.readouterr().err
    assert main(["spectrum", "/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err


def test_moe_expert_weights_are_not_ranked_and_the_cli_says_so(tmp_path, monkeypatch, capsys):
    """A mixture-of-experts checkpoint (transformers saves experts per expert): the routed experts are
    excluded (documented: they train as 3-D tensors), routers and attention are ranked."""
    from moe_models import make_moe

    folder = tmp_path / "moe"
    make_moe("qwen2_moe").save_pretrained(folder)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    results = scan(folder, cache_dir=tmp_path / "cache")
    kinds = {r.module_type for r in results}
    assert "mlp.gate" in kinds and "mlp.shared_expert.down_proj" in kinds and "self_attn.q_proj" in kinds
    assert not any(".experts." in r.name for r in results)
    from lorakit.spectrum import excluded_experts

    assert excluded_experts(folder) == 2 * 4 * 3  # layers × experts × (gate, up, down)
    assert main(["spectrum", str(folder), "--top", "50"]) == 0
    assert "Not ranked: 24 routed-expert weight tensors" in capsys.readouterr().out
