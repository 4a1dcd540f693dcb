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
