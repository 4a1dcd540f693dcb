"""The Python entry points × the input families: ``load_adapter``, ``get_peft_model``,
``merge_and_unload``, ``Engine`` and ``train`` raise :class:`LorakitError` naming the culprit
(never another exception type), and leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from bad_input.bad_helpers import (
    ADAPTER_FAMILIES,
    DATA_FAMILIES,
    MODEL_FAMILIES,
    YAML_FAMILIES,
    raised,
)
from bad_input.test_cli_matrix import OVERRIDES

import lorakit
from lorakit.errors import LorakitError


def _base(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world.model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base(world):
    return _base(world)


@pytest.mark.parametrize("family", ADAPTER_FAMILIES)
def test_load_adapter(world, base, family):
    folder, culprit = world.bad_adapters[family]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    raised(LorakitError, lambda: lorakit.load_adapter(base, folder), culprit)
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


GET_PEFT = [
    ("target_matches_nothing", dict(target_modules=["nope_proj"]), "nope_proj"),
    ("one_target_of_two_matches_nothing", dict(target_modules=["q_proj", "qq_proj"]), "qq_proj"),
    ("regex_matches_nothing", dict(target_modules=r".*\.frob"), "frob"),
    ("invalid_regex", dict(target_modules="(q_proj"), "(q_proj"),
    ("rank_zero", dict(r=0), "r"),
    ("rank_negative", dict(r=-4), "r"),
    ("rank_wrong_type", dict(r="eight"), "r"),
    ("alpha_wrong_type", dict(lora_alpha="big"), "lora_alpha"),
    ("dropout_out_of_range", dict(lora_dropout=1.5), "lora_dropout"),
    ("bias_unknown", dict(bias="some"), "bias"),
    ("init_unknown", dict(init_lora_weights="zeros"), "init_lora_weights"),
    ("layers_out_of_range", dict(layers_to_transform=[7]), "7"),
    ("exclude_everything", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "q_proj"),
    ("rank_pattern_wrong_type", dict(rank_pattern={"q_proj": "x"}), "rank_pattern"),
    ("modules_to_save_missing", dict(modules_to_save=["classifier_head"]), "classifier_head"),
]


@pytest.mark.parametrize("settings,culprit", [(s, c) for _, s, c in GET_PEFT], ids=[i for i, *_ in GET_PEFT])
def test_get_peft_model(world, settings, culprit):
    model = _base(world)
    before = [name for name, _ in model.named_modules()]

    def call():
        config = lorakit.LoraConfig(**{"target_modules": ["q_proj", "v_proj"], **settings})
        lorakit.get_peft_model(model, config)

    raised(LorakitError, call, culprit)
    assert [name for name, _ in model.named_modules()] == before  # nothing half-injected


def test_merge_and_unload_of_unknown_adapter_names_it(world):
    model = _base(world)
    lorakit.load_adapter(model, world.adapter, "tone")
    raised(LorakitError, lambda: lorakit.merge_and_unload(model, ["legal"]), "legal")
    assert any("lora" in name for name, _ in model.named_modules())  # still an adapter model


def test_merge_and_unload_of_something_not_a_module(world):
    raised(LorakitError, lambda: lorakit.merge_and_unload("runs/adapter"), "nn.Module")


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_engine_from_pretrained_bad_base(world, family):
    from lorakit.serve.engine import Engine

    path, culprit = world.bad_models[family]
    raised(LorakitError, lambda: Engine.from_pretrained(str(path)), culprit)


@pytest.mark.parametrize("family", ADAPTER_FAMILIES)
def test_engine_load_adapter(world, family):

    engine = _engine(world)
    folder, culprit = world.bad_adapters[family]
    raised(LorakitError, lambda: engine.load_adapter("bad", folder), culprit)
    assert "bad" not in engine.registry.names()


ENGINE_SETTINGS = [("max_batch", 0), ("max_resident", 0), ("max_rank", 0), ("strategy", "fastest"),
                   ("max_context", -1), ("target_modules", ["nope_proj"])]


@pytest.mark.parametrize("setting,value", ENGINE_SETTINGS, ids=[s for s, _ in ENGINE_SETTINGS])
def test_engine_settings(world, setting, value):
    from lorakit.models import load_tokenizer
    from lorakit.serve.engine import Engine

    raised(LorakitError, lambda: Engine(_base(world), load_tokenizer(str(world.model)), **{setting: value}),
           "nope_proj" if setting == "target_modules" else setting)


def test_train_and_tokenize_file_refuse_messages_for_a_tokenizer_without_template(world, tmp_path):
    from lorakit.data import DataConfig, tokenize_file
    from lorakit.models import load_tokenizer
    from lorakit.train.loop import train

    culprits = ("train.jsonl line 1", "no-chat-template", "data.chat_template: plain")
    raised(LorakitError, lambda: train(_run_config(world, [f"model={world.no_template}",
                                                           f"output={tmp_path / 'run'}"]), quiet=True), *culprits)
    assert not (tmp_path / "run" / "adapter").exists()
    tokenizer = load_tokenizer(str(world.no_template))
    raised(LorakitError, lambda: tokenize_file(str(world.data), tokenizer, DataConfig(cache=False)), *culprits)


_ENGINE = {}


def _engine(world):
    from lorakit.serve.engine import Engine

    if "engine" not in _ENGINE:
        _ENGINE["engine"] = Engine.from_pretrained(str(world.model), max_rank=8)
    return _ENGINE["engine"]


def _run_config(world, overrides: list[str]):
    from lorakit.train.config import load_config

    return load_config(world.config, overrides)


@pytest.mark.parametrize("family", DATA_FAMILIES)
def test_train_bad_data(world, family, tmp_path):
    from lorakit.train.loop import train

    path, culprit = world.bad_data[family]
    extra = ["data.on_bad_row=skip"] if family == "zero_usable_rows" else []
    raised(LorakitError, lambda: train(_run_config(world, [f"data.train={path}", f"output={tmp_path / 'run'}",
                                                           *extra]), quiet=True), culprit)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("family", [f for f in MODEL_FAMILIES])
def test_train_bad_model(world, family, tmp_path):
    from lorakit.train.loop import train

    path, culprit = world.bad_models[family]
    raised(LorakitError, lambda: train(_run_config(world, [f"model={path}", f"output={tmp_path / 'run'}"]),
                                       quiet=True), culprit)


@pytest.mark.parametrize("family", YAML_FAMILIES)
def test_load_config_bad_yaml(world, family):
    from lorakit.train.config import load_config

    path, culprit = world.bad_yaml[family]
    if family in ("data_missing", "model_missing"):  # the YAML is fine; train() finds the missing path
        from lorakit.train.loop import train

        raised(LorakitError, lambda: train(load_config(path), quiet=True), culprit)
    else:
        raised(LorakitError, lambda: load_config(path), culprit)


@pytest.mark.parametrize("item,culprit", OVERRIDES, ids=[i for i, _ in OVERRIDES])
def test_run_config_bad_values(world, item, culprit, tmp_path):
    from lorakit.train.loop import train

    def call():
        train(_run_config(world, [item, f"output={tmp_path / 'run'}"]), quiet=True)

    raised(LorakitError, call, culprit)
