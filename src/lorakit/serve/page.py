"""The page ``lorakit serve`` serves at ``/``, and the two endpoints its compare view needs.

Routes (added to the app by :func:`add_page`):

- ``GET /``: the page (``static/index.html``); ``GET /ui/{file}``: its script, stylesheets and
  icon, from a fixed list (the icon also as ``/favicon.ico``). Plain HTML, CSS and JavaScript
  shipped in the package: no build step, nothing fetched from elsewhere. The playground talks to
  the OpenAI-compatible routes
  (``/v1/models``, streaming ``/v1/chat/completions`` and ``/v1/completions``), one request per
  chosen model at once, so the engine answers them in one batch.
- ``GET /v1/lorakit/data_files``: the data files under the server's data roots (``--data-root``,
  and ``--adapter-root``) and the largest upload it takes.
- ``POST /v1/lorakit/compare``: base and adapters on a data file (:mod:`lorakit.serve.compare`,
  ``lorakit eval``'s measurements), streamed as server-sent events: ``lorakit.compare.progress``
  chunks, then one ``lorakit.compare.report`` with the report and its HTML
  (:func:`lorakit.evaluate.html.fragment`), then ``[DONE]``.

Security:

- The page and its assets hold no data and are served without the API key (as ``/health`` is);
  everything they fetch is under ``/v1/`` and needs the key when the server has one. The page
  asks for the key and keeps it in the tab (``sessionStorage``) only.
- The page is sent with a Content-Security-Policy that allows scripts, styles and connections
  to this server only, and no framing.
- Server-side files: only data files (by suffix) whose real path (symlinks resolved) lies under
  a data root, named relative to it; ``..`` and absolute paths are refused. An upload is at most
  the server's body limit (``--max-body-bytes``), is written to a private temporary folder and
  removed afterwards.
- One comparison runs at a time (429 while one does); at most :data:`MAX_ROWS` rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorakit.data.readers import SUFFIXES
from lorakit.errors import LorakitError
from lorakit.evaluate import html as report_html
from lorakit.evaluate.core import EvalConfig
from lorakit.serve.compare import CompareCancelled, compare_on_engine
from lorakit.serve.engine import Engine
from lorakit.serve.protocol import APIError, parse_request, sse

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
ASSETS = {  # name under /ui/ -> (file, media type)
    "page.js": (STATIC / "page.js", "text/javascript; charset=utf-8"),
    "page.css": (STATIC / "page.css", "text/css; charset=utf-8"),
    "favicon.svg": (STATIC / "favicon.svg", "image/svg+xml"),
    "report.css": (report_html.CSS_FILE, "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_ROWS = 2000
"""The most rows one comparison measures."""
MAX_LISTED = 500
_UPLOAD_SUFFIXES = {s for s, kind in SUFFIXES.items() if kind != "parquet"}  # text formats
_NOT_DATA = re.compile(r"^(.*config|tokenizer.*|special_tokens_map|trainer_state|report|metrics|examples)\.jsonl?$")
_SKIP_DIRS = {"checkpoints", "__pycache__", "node_modules"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DataFile(_Strict):
    root: str
    path: str


class Upload(_Strict):
    name: str
    content: str


class CompareRequest(_Strict):
    """``POST /v1/lorakit/compare``: the models (served names, in report order) and one data source."""

    models: list[str] = Field(min_length=1, max_length=16)
    file: DataFile | None = None
    upload: Upload | None = None
    limit: int | None = Field(None, ge=1, le=MAX_ROWS)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    format: str = "auto"


def add_page(app: FastAPI, engine: Engine, resolve_model: Callable[[str], str | None], auth: list[Depends], *,
             data_roots: dict[str, Path], max_upload_bytes: int) -> None:
    """Serve the page at ``/`` and its endpoints on ``app``.

    Args:
        app: the server's app.
        engine: its engine.
        resolve_model: served model name -> adapter name (None: the base); raises the 404 APIError.
        auth: the dependencies that check the API key.
        data_roots: label -> folder whose data files the compare view may read.
        max_upload_bytes: the largest uploaded data file.

    Raises:
        LorakitError: a data root that is not a folder.
    """
    for label, root in data_roots.items():  # labels: "data" (--data-root), "adapter" (--adapter-root)
        if not Path(root).is_dir():
            raise LorakitError(f"--{label}-root {root} is not a folder; create it or pass an existing one")
    page = _Page(engine, resolve_model, {k: Path(os.path.realpath(v)) for k, v in data_roots.items()},
                 max_upload_bytes)
    app.add_api_route("/", page.index, methods=["GET"])
    app.add_api_route("/ui/{name}", page.asset, methods=["GET"])
    app.add_api_route("/favicon.ico", page.icon, methods=["GET"])  # browsers ask for it by that name
    app.add_api_route("/v1/lorakit/data_files", page.data_files, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/lorakit/compare", page.compare, methods=["POST"], dependencies=auth)


class _Page:
    """The routes' state: the engine, the model resolver, the data roots, one comparison at a time."""

    def __init__(self, engine: Engine, resolve_model: Callable[[str], str | None], roots: dict[str, Path],
                 max_upload_bytes: int) -> None:
        self.engine, self.resolve_model, self.roots = engine, resolve_model, roots
        self.max_upload_bytes = max_upload_bytes
        self.busy = threading.Lock()

    async def index(self) -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)

    async def asset(self, name: str) -> Response:
        if name not in ASSETS:
            raise APIError(404, f"GET /ui/{name}: no such file; the page's files are {', '.join(ASSETS)}")
        path, media_type = ASSETS[name]
        return Response(path.read_bytes(), media_type=media_type, headers={"X-Content-Type-Options": "nosniff",
                                                                           "Cache-Control": "no-cache"})

    async def icon(self) -> Response:
        return await self.asset("favicon.svg")

    # -- data files ------------------------------------------------------------------------------

    async def data_files(self) -> dict[str, Any]:
        files, truncated = await asyncio.to_thread(self._list_files)
        return {"object": "list", "roots": list(self.roots), "data": files, "truncated": truncated,
                "max_upload_bytes": self.max_upload_bytes, "max_rows": MAX_ROWS,
                "upload_suffixes": sorted(_UPLOAD_SUFFIXES)}

    def _list_files(self) -> tuple[list[dict[str, Any]], bool]:
        files: list[dict[str, Any]] = []
        for label, root in self.roots.items():
            for folder, dirs, names in os.walk(root):  # symlinked folders are not followed
                depth = len(Path(folder).relative_to(root).parts)
                dirs[:] = sorted(d for d in dirs if depth < 6 and not d.startswith(".") and d not in _SKIP_DIRS)
                for name in sorted(names):
                    path = Path(folder) / name
                    if name.startswith(".") or path.suffix.lower() not in SUFFIXES or _NOT_DATA.match(name):
                        continue
                    real = Path(os.path.realpath(path))
                    if not real.is_relative_to(root) or not real.is_file():
                        continue
                    if len(files) == MAX_LISTED:
                        return files, True
                    files.append({"root": label, "path": path.relative_to(root).as_posix(),
                                  "bytes": real.stat().st_size})
        return files, False

    def _server_file(self, file: DataFile) -> Path:
        root = self.roots.get(file.root)
        if root is None:
            known = ", ".join(self.roots) or "none: start the server with --data-root DIR"
            raise APIError(400, f"file.root {file.root!r} is not a data root of this server (roots: {known})",
                           param="file.root")
        given = Path(file.path)
        if given.is_absolute() or ".." in given.parts:
            raise APIError(403, "file.path must be relative to its root, without '..'", param="file.path",
                           type="permission_error")
        real = Path(os.path.realpath(root / given))
        if not real.is_relative_to(root):
            raise APIError(403, f"file.path {file.path!r} leads outside the {file.root} root (symlinks resolved)",
                           param="file.path", type="permission_error")
        if real.suffix.lower() not in SUFFIXES:
            raise APIError(400, f"file.path {file.path!r} is not a data file (expected {', '.join(SUFFIXES)})",
                           param="file.path")
        if not real.is_file():
            raise APIError(404, f"file.path {file.path!r}: no such file under the {file.root} root",
                           param="file.path", code="file_not_found")
        return real

    def _upload(self, upload: Upload, folder: Path) -> Path:
        name = Path(upload.name.replace("\\", "/")).name
        suffix = Path(name).suffix.lower()
        if suffix not in _UPLOAD_SUFFIXES:
            raise APIError(400, f"upload.name {upload.name!r}: upload a {', '.join(sorted(_UPLOAD_SUFFIXES))} file",
                           param="upload.name")
        # Its size is bounded by the body limit (413 before it is parsed); the page checks it first.
        path = folder / (re.sub(r"[^\w.-]", "_", Path(name).stem)[:80] + suffix)
        path.write_text(upload.content, encoding="utf-8")
        return path

    # -- the comparison --------------------------------------------------------------------------

    async def compare(self, request: Request) -> Response:
        body = parse_request(await request.body(), CompareRequest)
        if (body.file is None) == (body.upload is None):
            raise APIError(400, "give exactly one data source: file (a file under a data root) or upload",
                           param="file")
        if len(set(body.models)) != len(body.models):
            raise APIError(400, "models: a model is named twice", param="models")
        models = {name: self.resolve_model(name) for name in body.models}
        if not self.busy.acquire(blocking=False):
            raise APIError(429, "a comparison is already running on this server; wait for it to finish",
                           type="rate_limit_error", code="comparison_running", headers={"Retry-After": "5"})
        job = _CompareJob(asyncio.get_running_loop())
        folder: Path | None = None
        try:
            if body.upload is not None:
                folder = Path(tempfile.mkdtemp(prefix="lorakit-compare-"))
                path = self._upload(body.upload, folder)
                label = f"{Path(body.upload.name).name} (uploaded)"
            else:
                path = self._server_file(body.file)
                label = f"{body.file.root}:{body.file.path}"
            config = EvalConfig(limit=min(body.limit or MAX_ROWS, MAX_ROWS), max_new_tokens=body.max_new_tokens,
                                format=body.format, max_length=min(EvalConfig.max_length, self.engine.max_context))
        except BaseException:
            self._finish(folder)
            raise

        def run() -> tuple[dict[str, Any], str]:
            try:
                report = compare_on_engine(self.engine, models, str(path), config, label=label, progress=job.progress,
                                           cancel=job.cancel)
                return report, report_html.fragment(report)  # here, not on the event loop: diffs take time
            finally:
                self._finish(folder)

        job.start(run)
        first = await job.next()
        if first[0] == "error":  # the file could not be read: an ordinary 400
            raise _as_api_error(first[1])
        return StreamingResponse(self._events(job, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _finish(self, folder: Path | None) -> None:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        self.busy.release()

    async def _events(self, job: _CompareJob, event: tuple[str, Any]):
        try:
            while True:
                kind, value = event
                if kind == "progress":
                    yield sse({"object": "lorakit.compare.progress", "done": value[0], "total": value[1]})
                elif kind == "error":
                    yield sse(_as_api_error(value).body())
                    break
                else:
                    report, fragment = value
                    yield sse({"object": "lorakit.compare.report", "report": _finite(report), "html": fragment})
                    break
                event = await job.next()
            yield sse("[DONE]")
        finally:
            job.cancel.set()  # the client left, or the job is over: either way nothing more to do


class _CompareJob:
    """A comparison in a worker thread; its progress, result or error reach the loop as events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.cancel = threading.Event()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._last = 0.0

    def start(self, run: Callable[[], tuple[dict[str, Any], str]]) -> None:
        def target() -> None:
            try:
                self._put("report", run())
            except BaseException as err:  # noqa: BLE001 - every failure is reported to the client
                if not isinstance(err, LorakitError):
                    log.exception("the comparison failed")
                self._put("error", err)

        threading.Thread(target=target, name="lorakit-compare", daemon=True).start()

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - self._last >= 0.1:  # at most ten updates a second
            self._last = now
            self._put("progress", (done, total))

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server stopped (its loop is closed): nobody is listening
            self.cancel.set()

    async def next(self) -> tuple[str, Any]:
        return await self.events.get()


def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, CompareCancelled):
        return APIError(499, str(err), code="cancelled")
    if isinstance(err, LorakitError):
        code = getattr(err, "code", None)
        status = 404 if code == "model_not_found" else 400
        return APIError(status, str(err), code=code if isinstance(code, str) else None)
    return APIError(500, f"the comparison failed: {type(err).__name__}: {err}", type="server_error")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: the report as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

