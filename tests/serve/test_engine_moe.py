"""The engine on tiny mixture-of-experts models: a batch mixing an expert adapter (LoRA on the experts
and the router), a dense adapter (attention only) and the base equals each request alone, merged."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_models import make_moe
from serve.serve_helpers import WordTokenizer, greedy_reference, merged_copy, save_random_adapter

from lorakit.errors import LorakitError
from lorakit.serve import Engine, SamplingParams

# What the expert adapter targets per architecture: all-linear trains experts and router where PEFT's
# rule does (Qwen3-MoE, DeepSeek-V3); elsewhere the expert weights and the router are named.
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERT_TARGETS = {
    "qwen3_moe": dict(targets="all-linear"),
    "mixtral": dict(targets="all-linear"),
    "olmoe": dict(targets="all-linear"),
    "deepseek_v3": dict(targets="all-linear"),
    "gpt_oss": dict(targets=["q_proj"], target_parameters=[*EXPERTS, "router.weight"]),
    "qwen2_moe": dict(targets=["q_proj", "shared_expert.down_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"]),
}
ROUTERS = {"gpt_oss": ["router.weight"], "qwen2_moe": ["mlp.gate.weight"]}  # outside PEFT's all-linear rule


@pytest.fixture(scope="module", params=sorted(EXPERT_TARGETS))
def setup(request, tmp_path_factory):
    arch = request.param
    base = make_moe(arch)
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    root = tmp_path_factory.mktemp(f"moe-adapters-{arch}")
    folders = {
        "experts": save_random_adapter(base, root / "experts", r=2, seed=1, **EXPERT_TARGETS[arch]),
        "dense": save_random_adapter(base, root / "dense", r=4, seed=2, targets=["o_proj"]),
    }
    return arch, base, folders


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 96, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_mixed_batch_of_expert_dense_and_base_equals_each_alone_merged(setup):
    arch, base, folders = setup
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_resident=2, max_rank=8,
                    target_parameters=ROUTERS.get(arch))
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    requests = list(zip(_prompts(9), [None, "experts", "dense"] * 3))
    handles = [engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=6, temperature=0))
               for p, a in requests]
    got = [h.result().token_ids for h in handles]
    merged = {a: merged_copy(base, folders.get(a)) for a in (None, "experts", "dense")}
    assert got == [greedy_reference(merged[a], p, 6) for p, a in requests]
    plain = [greedy_reference(merged[None], p, 6) for p, _ in requests]
    for name in ("experts", "dense"):  # not vacuous: each adapter changes some of its outputs
        assert any(g != b for g, b, (_, a) in zip(got, plain, requests) if a == name), name
    info = {i.name: i for i in engine.adapters()}
    all_linear = EXPERT_TARGETS[arch]["targets"] == "all-linear"
    assert info["experts"].rank == (4 if all_linear else 2)  # per expert; all-linear fuses gate_up at 2r


def test_expert_adapter_the_engine_does_not_serve_is_refused(tmp_path):
    base = make_moe("gpt_oss")
    folder = save_random_adapter(base, tmp_path / "a", r=2, targets=["q_proj"], target_parameters=["router.weight"])
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_resident=1, max_rank=8)  # no router slots
    with pytest.raises(LorakitError, match="router.weight.*does not serve"):
        engine.load_adapter("a", folder)
    folder = save_random_adapter(base, tmp_path / "b", r=16, targets=["q_proj"],
                                 target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(LorakitError, match="rank 16, above this engine's max_rank 8"):
        engine.load_adapter("b", folder)
