"""The server's OpenAPI schema (``GET /openapi.json``) with the request bodies it really reads.

The routes parse their raw bodies themselves (to answer in OpenAI's error shape, with limits),
so FastAPI cannot see the body models; :func:`describe_bodies` adds them to the schema FastAPI
generates, so clients, generators and fuzzers (schemathesis) know what each POST takes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def describe_bodies(app: Any, bodies: dict[str, type[BaseModel]]) -> None:
    """Make ``app.openapi()`` declare ``bodies`` (path -> model) as the JSON body of each POST."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            keys = [(model, "validation") for model in bodies.values()]
            refs, definitions = models_json_schema(keys, ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            for path, model in bodies.items():
                operation = schema["paths"][path]["post"]
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": refs[(model, "validation")]}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build
