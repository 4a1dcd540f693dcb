"""The bad-input matrix's shared world (built once per session) and its closing figures."""

from __future__ import annotations

import pytest
from bad_input.bad_helpers import FAULTS, GENERATED, REQUESTS, SEEN, build_world
from train.train_helpers import tiny_model_dir


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("bad-input"), tiny_model_dir)


def pytest_terminal_summary(terminalreporter):
    if SEEN["cases"] or GENERATED["rows"] or REQUESTS["requests"] or FAULTS["injected"]:
        terminalreporter.write_line(
            f"bad input: {SEEN['cases']} refusals checked, {SEEN['tracebacks']} tracebacks or wrong exception "
            f"types seen; {GENERATED['rows']:,} generated data rows; {REQUESTS['requests']} generated HTTP requests; "
            f"{FAULTS['injected']} write faults injected")
