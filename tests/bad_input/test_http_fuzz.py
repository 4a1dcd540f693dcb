"""schemathesis against the server's own OpenAPI schema (``/openapi.json``, FastAPI's, with the
request bodies declared), on a tiny model on a free loopback port: bounded in count and time; no
5xx, every error in OpenAI's shape, and the server still answers a good request afterwards."""

from __future__ import annotations

import time

import httpx
import pytest
from bad_input.bad_helpers import REQUESTS
from hypothesis import HealthCheck, given, settings

KEY = "sk-fuzz"
PER_OPERATION = 40  # generated requests per operation at most (210 in all when measured); under a minute
SECONDS = 240  # and never longer than this in all


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    from lorakit.serve.asgi import BackgroundServer
    from lorakit.serve.engine import Engine
    from lorakit.serve.http import create_app

    engine = Engine.from_pretrained(str(world.model), max_rank=8, max_batch=4, max_context=64)
    app = create_app(engine, "tiny", api_key=KEY, adapter_root=world.root, data_root=world.root, max_queue=4,
                     max_body_bytes=64 * 1024)
    with BackgroundServer(app) as running:
        yield running.url


def _check_error_shape(response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def test_generated_requests_get_no_5xx_and_openai_shaped_errors(server):
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + SECONDS
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models",
                                              "/v1/load_lora_adapter"}
    for operation in operations:
        @settings(max_examples=PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            if time.monotonic() > deadline:
                return
            response = case.call(base_url=server, headers=headers, timeout=60)
            REQUESTS["requests"] += 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
            if response.status_code >= 400 and operation.path.startswith("/v1/"):
                REQUESTS["errors"] += 1
                _check_error_shape(response)

        fuzz()
    print(f"schemathesis: {REQUESTS['requests']} generated requests over {len(operations)} operations, "
          f"{REQUESTS['errors']} answered with an error, 0 with 5xx")
    assert REQUESTS["requests"] >= 100
    good = httpx.post(f"{server}/v1/completions", headers=headers, timeout=60,
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert good.status_code == 200 and good.json()["choices"][0]["text"] is not None
