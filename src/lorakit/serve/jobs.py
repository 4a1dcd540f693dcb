"""One generation request as the HTTP server's event loop sees it: its choices, their events, the answer.

::

    engine thread ── on_event of choice i ──► loop.call_soon_threadsafe ──► asyncio.Queue[(i, event)]
                                                                                 │
                           whole answer: wait for every choice, then one body ◄──┤
                           stream: one server-sent chunk per choice and event ◄──┘

A request has ``prompts × n`` choices, each one engine request (they batch like any others, and
the prefix cache shares their prompt). The answer lists them in order (``index``); the usage counts
each prompt once and every choice's tokens. A choice that fails fails the request; a client that
leaves cancels every unfinished choice.

Streams: completions send, per choice, the echoed prompt first (with its logprobs when asked), then
text deltas; chat sends a role chunk per choice, then content deltas. With logprobs each chunk
carries the entries of the tokens since the previous chunk of that choice (a token whose text is
held back, say as a possible stop string, reports with the next chunk that has text, or the last).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from lorakit.serve.logprobs import TokenLogprob, TokenStrings, chat_logprobs, completion_logprobs
from lorakit.serve.protocol import (body, chat_choice, chunk, completion_choice, sse, usage,
                                    usage_chunk)
from lorakit.serve.requests import RequestHandle, TokenEvent

if TYPE_CHECKING:
    from lorakit.serve.http import _Server


class Job:
    """The choices of one request, bridged from the engine's thread to the event loop.

    Args:
        server: the server (its in-flight count and metrics).
        model: the ``model`` the client named.
        chat: a chat completion (else a text completion).
        request_id: the answer's ``id``.
        n: choices per prompt.
        echoes: per choice, the prompt's text to echo (completions with ``echo``), or None.
        with_logprobs: the client asked for logprobs.
        strings: token strings for logprobs.
    """

    def __init__(self, server: _Server, model: str, chat: bool, request_id: str, n: int, echoes: list[str | None],
                 with_logprobs: bool, strings: TokenStrings) -> None:
        self.server, self.model, self.chat, self.id, self.n = server, model, chat, request_id, n
        self.echoes, self.with_logprobs, self.strings = echoes, with_logprobs, strings
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.handles: list[RequestHandle] = []
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[int, TokenEvent] | None] = asyncio.Queue()
        self._watcher: asyncio.Task | None = None
        server.in_flight += len(echoes)

    @property
    def choices(self) -> int:
        return len(self.echoes)

    def listener(self, index: int) -> Callable[[TokenEvent], None]:
        """The engine's ``on_event`` for choice ``index`` (called on its thread): hand the event to the loop."""
        def put(event: TokenEvent) -> None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (index, event))

        return put

    async def next(self) -> tuple[int, TokenEvent] | None:
        """The next (choice, event); None once the client has gone."""
        return None if self.closed else await self._events.get()

    def watch(self, request: Request) -> None:
        """Close (and so cancel) this job when the client disconnects."""
        async def until_gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.close()

        self._watcher = asyncio.ensure_future(until_gone())

    async def wait(self) -> TokenEvent | None:
        """Wait for every choice: None when all finished well (or the client left: ``closed``),
        else the failing choice's last event."""
        left = self.choices
        while left:
            item = await self.next()
            if item is None:
                return None
            _, event = item
            if event.finished:
                if event.finish_reason == "error":
                    return event
                left -= 1
        return None

    def answer(self) -> dict[str, Any]:
        """The whole answer, once every choice finished."""
        completions = [h.completion for h in self.handles]
        if self.chat:
            choices = [chat_choice(i, c, self.strings, self.with_logprobs) for i, c in enumerate(completions)]
        else:
            choices = [completion_choice(i, c, self.strings, echo, self.with_logprobs)
                       for i, (c, echo) in enumerate(zip(completions, self.echoes))]
        return body(self.chat, self.id, self.created, self.model, choices, self.usage())

    def usage(self) -> dict[str, int]:
        completions = [h.completion for h in self.handles]
        prompt = sum(c.prompt_tokens for c in completions[:: self.n])  # each prompt once, not per choice
        return usage(prompt, sum(c.completion_tokens for c in completions))

    async def stream(self, first: tuple[int, TokenEvent], include_usage: bool, failure: Callable[[], Any]
                     ) -> AsyncIterator[str]:
        """The server-sent events of the answer, from its first (choice, event) on."""
        def data(index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
                 logprobs: dict[str, Any] | None = None) -> str:
            return sse(chunk(self.chat, self.id, self.created, self.model, text, finish_reason, role, include_usage,
                             index, logprobs))

        started = [False] * self.choices
        pending: list[list[TokenLogprob]] = [[] for _ in range(self.choices)]
        offsets = [0] * self.choices
        left = self.choices
        item: tuple[int, TokenEvent] | None = first
        try:
            if self.chat:
                for index in range(self.choices):
                    yield data(index, "", role=True)
            while item is not None:
                index, event = item
                if event.finish_reason == "error":
                    yield sse(failure().body())
                    break
                if not started[index]:
                    started[index] = True
                    if self.echoes[index] is not None:
                        yield data(index, self.echoes[index], logprobs=self._echo_logprobs(index, offsets))
                if event.logprob is not None:
                    pending[index].append(event.logprob)
                if event.finished:
                    text = event.text or (None if self.chat else "")
                    yield data(index, text, event.finish_reason, logprobs=self._logprobs(pending, offsets, index))
                    left -= 1
                    if not left:
                        if include_usage:
                            yield sse(usage_chunk(self.chat, self.id, self.created, self.model, self.usage()))
                        break
                elif event.text:
                    yield data(index, event.text, logprobs=self._logprobs(pending, offsets, index))
                item = await self.next()
            if item is not None:  # finished or failed: the client is still there
                yield sse("[DONE]")
        finally:
            self.close()

    def _echo_logprobs(self, index: int, offsets: list[int]) -> dict[str, Any] | None:
        if not self.with_logprobs:
            return None
        completion = self.handles[index].completion
        prompt = completion.prompt_token_ids
        out = completion_logprobs(prompt, completion.prompt_logprobs or [None] * len(prompt), self.strings)
        offsets[index] = sum(map(len, out["tokens"]))
        return out

    def _logprobs(self, pending: list[list[TokenLogprob]], offsets: list[int], index: int) -> dict[str, Any] | None:
        if not self.with_logprobs:
            return None
        entries, pending[index] = pending[index], []
        if self.chat:
            return chat_logprobs(entries, self.strings)
        out = completion_logprobs([e.token for e in entries], entries, self.strings, offsets[index])
        offsets[index] += sum(map(len, out["tokens"]))
        return out

    async def aclose(self) -> None:  # a response's background task: on the loop, not in a thread
        self.close()

    def close(self) -> None:
        """Finish the job's bookkeeping (idempotent): cancel unfinished choices, free their places, count them."""
        if self.closed:
            return
        self.closed = True
        self._events.put_nowait(None)  # wakes a waiting next()
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self.server.in_flight -= self.choices
        seconds = time.perf_counter() - self.started
        for handle in self.handles:
            completion = handle.completion
            reason = completion.finish_reason
            if not handle.done:
                handle.cancel()
                reason = "cancelled"
            self.server.metrics.generation(self.model, completion.prompt_tokens, completion.completion_tokens,
                                           reason or "cancelled", seconds)
