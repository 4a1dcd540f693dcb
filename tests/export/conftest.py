"""Shared, expensive things of the export tests, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_base(smollm2_path):
    """The built-in SmolLM2 as an export base: its Q4_1 GGUF's layout (parsing it takes seconds)."""
    from lorakit.export.base import load_base

    return load_base("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def quickstart_adapter(smollm2_path, tmp_path_factory):
    """The quickstart adapter, trained as `lorakit train` trains it with no config (≈90 s on 2 cores)."""
    from lorakit.train.config import load_config
    from lorakit.train.loop import train
    from lorakit.train.quickstart import QUICKSTART

    config = load_config(None, [f"output={tmp_path_factory.mktemp('quickstart') / 'run'}"], base=QUICKSTART)
    result = train(config, quiet=True)
    assert result.stopped == "completed" and result.adapter is not None
    return result.adapter


@pytest.fixture(scope="session")
def smollm2_f32_gguf(smollm2_base, tmp_path_factory):
    """SmolLM2 as an f32 GGUF (the merged export of no adapter): llama.cpp without quantisation."""
    from lorakit.export.merged import export_merged

    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    export_merged(None, smollm2_base, out, "f32")
    return out
