"""Serving tests run single-threaded: on the shared 2-core machines two intra-op threads under
load are up to 15x slower than one (OpenMP threads waiting on each other); restored afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def page_world(smollm2_path, tmp_path_factory):
    """The page tests' base, adapters, 10-row file and ``lorakit eval``'s report on it (page_helpers)."""
    from serve.page_helpers import build_world

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_world(tmp_path_factory.mktemp("page-world"), smollm2_path)
    finally:
        torch.set_num_threads(before)
