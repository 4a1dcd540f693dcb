"""ASGI plumbing under the HTTP server, independent of what it serves: a body-size limit, a response
counter, and a uvicorn server in a background thread.

The two middlewares are plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so streamed responses
and client disconnects pass through them untouched.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from lorakit.errors import LorakitError
from lorakit.serve.protocol import APIError


class BodyLimit:
    """Answer 413 for a body over ``max_bytes``: at once by Content-Length, else while it arrives."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse(self._error().body(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")


class CountResponses:
    """Call ``count(route, status)`` for each response (paths not in ``routes`` as ``other``)."""

    def __init__(self, app: Any, count: Callable[[str, int], None], routes: set[str]) -> None:
        self.app, self.count, self.routes = app, count, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counting(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.count(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting)


class BackgroundServer:
    """Serve an ASGI app with uvicorn in a background thread, on a free loopback port by default.

    For tests, notebooks and benchmarks::

        with BackgroundServer(create_app(engine, "base")) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="lorakit-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LorakitError(f"the HTTP server did not start on {self.url}; see the log above")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
