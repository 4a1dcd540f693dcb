"""The prefix cache: keys/values (and last hidden states) of prompt prefixes already computed, per adapter.

::

    adapter version 3 ─► [system prompt …] ─┬─► [user: question 1 …] ─┬─► [" Paris"]
                                             │                         └─► [" Rome"]
                                             └─► [user: question 2 …]

A radix tree per adapter version (as SGLang's RadixAttention): each node holds a run of tokens
and, for each of them, every layer's key and value (heads, tokens, head_dim) and the backbone's
last hidden state (tokens, d). A new prompt walks down the tree as far as its tokens agree
(:meth:`PrefixCache.match`, to the token, not to a block), takes those keys/values as its past and
prefills only the rest; after the prefill its new tokens are added under the matched path
(:meth:`PrefixCache.insert`), splitting a node where the prompt leaves it. So a multiple-choice
question's requests share their context, and a system prompt is computed once per adapter.

Why per adapter version: every layer an adapter changes changes the keys and values of the
tokens after it, so prefixes are only shared between requests of the same adapter (or of the
base). A reloaded or replaced adapter gets a new version (:class:`~lorakit.serve.registry.
AdapterRegistry`), whose tree starts empty; :meth:`drop` frees an old one.

Memory: at most ``max_bytes``; past it the least recently used leaves go first (a shared prefix
stays as long as any of its continuations is used). Nodes own their tensors (a split copies both
halves), so the count is exact. The hidden states are what make prompt logprobs of cached tokens
possible without their keys being recomputed (the head is applied to them again).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values (heads, tokens, head_dim)


class _Node:
    __slots__ = ("tokens", "kv", "hidden", "children", "parent", "used", "nbytes")

    def __init__(self, tokens: list[int], kv: KV, hidden: torch.Tensor | None, parent: _Node | None) -> None:
        self.tokens, self.kv, self.hidden, self.parent = tokens, kv, hidden, parent
        self.children: dict[int, _Node] = {}
        self.used = 0
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in kv) + (hidden.nbytes if hidden is not None else 0)

    def slice(self, start: int, stop: int) -> tuple[KV, torch.Tensor | None]:
        kv = [(k[:, start:stop], v[:, start:stop]) for k, v in self.kv]
        return kv, None if self.hidden is None else self.hidden[start:stop]


@dataclass
class Match:
    """A cached prefix of a prompt: its length and the nodes it runs through (the last one maybe in part)."""

    key: int
    length: int = 0
    path: list[tuple[_Node, int]] = field(default_factory=list)  # (node, tokens used from it)


class PrefixCache:
    """Cached prefixes of prompts, by adapter version, within ``max_bytes``.

    Not thread-safe: the engine uses it from its loop only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._roots: dict[int, _Node] = {}
        self._clock = itertools.count(1)
        self.queried_tokens = 0  # prompt tokens looked up …
        self.hit_tokens = 0  # … and found

    def match(self, key: int, tokens: list[int], limit: int | None = None, count: bool = True) -> Match:
        """The longest cached prefix of ``tokens`` (at most ``limit`` tokens) for adapter version ``key``.

        ``count=False`` only looks (for scheduling): no statistics, no recency.
        """
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        found = Match(key)
        node = self._roots.get(key)
        while node is not None and found.length < limit:
            child = node.children.get(tokens[found.length])
            if child is None:
                break
            used = common_length(child.tokens, tokens, found.length, limit)
            found.path.append((child, used))
            found.length += used
            node = child if used == len(child.tokens) else None
        if count:
            self.queried_tokens += len(tokens)
            self.hit_tokens += found.length
            tick = next(self._clock)
            for node, _ in found.path:
                node.used = tick
        return found

    def past(self, found: Match) -> tuple[KV, torch.Tensor | None]:
        """The matched prefix's keys/values per layer (heads, length, head_dim) and hidden states (length, d)."""
        parts = [node.slice(0, used) for node, used in found.path]
        kv = [(torch.cat([p[0][i][0] for p in parts], dim=1), torch.cat([p[0][i][1] for p in parts], dim=1))
              for i in range(len(parts[0][0]))]
        hidden = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return kv, hidden

    def insert(self, key: int, tokens: list[int], start: int, kv: KV, hidden: torch.Tensor | None) -> None:
        """Add ``tokens`` for adapter version ``key``, whose part from ``start`` on has ``kv`` and ``hidden``
        (views are fine: what is kept is copied); the part before ``start`` must be cached already."""
        if self.max_bytes <= 0:
            return
        root = self._roots.get(key)
        if root is None:
            root = self._roots[key] = _Node([], [], None, None)
        node, pos, tick = root, 0, next(self._clock)
        while pos < len(tokens):
            node.used = tick
            child = node.children.get(tokens[pos])
            if child is None:
                break
            used = common_length(child.tokens, tokens, pos, len(tokens))
            if used < len(child.tokens):
                child = self._split(child, used)
            node, pos = child, pos + used
        node.used = tick
        if pos == len(tokens) or pos < start:  # all there already, or the prefix it builds on was dropped
            return
        part_kv = [(k[:, pos - start:].clone(), v[:, pos - start:].clone()) for k, v in kv]
        part_hidden = None if hidden is None else hidden[pos - start:].clone()
        leaf = _Node(list(tokens[pos:]), part_kv, part_hidden, node)
        leaf.used = tick
        node.children[tokens[pos]] = leaf
        self.nbytes += leaf.nbytes
        self._evict()

    def drop(self, key: int) -> None:
        """Forget every prefix of adapter version ``key``."""
        root = self._roots.pop(key, None)
        if root is not None:
            self.nbytes -= _total(root)

    def clear(self) -> None:
        self._roots.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, int]:
        return {"bytes": self.nbytes, "max_bytes": self.max_bytes, "queried_tokens": self.queried_tokens,
                "hit_tokens": self.hit_tokens}

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after ``at`` tokens; returns the new upper node (both own copies of their halves)."""
        upper_kv, upper_hidden = node.slice(0, at)
        lower_kv, lower_hidden = node.slice(at, len(node.tokens))
        upper = _Node(node.tokens[:at], [(k.clone(), v.clone()) for k, v in upper_kv],
                      None if upper_hidden is None else upper_hidden.clone(), node.parent)
        upper.used = node.used
        node.parent.children[node.tokens[0]] = upper
        lower = _Node(node.tokens[at:], [(k.clone(), v.clone()) for k, v in lower_kv],
                      None if lower_hidden is None else lower_hidden.clone(), upper)
        lower.children, lower.used = node.children, node.used
        for child in lower.children.values():
            child.parent = lower
        upper.children[lower.tokens[0]] = lower
        self.nbytes += upper.nbytes + lower.nbytes - node.nbytes
        return upper

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            leaves = sorted(_leaves(self._roots.values()), key=lambda n: n.used)
            if not leaves:
                return
            for leaf in leaves:
                if self.nbytes <= self.max_bytes:
                    return
                del leaf.parent.children[leaf.tokens[0]]
                self.nbytes -= leaf.nbytes
            for key in [k for k, root in self._roots.items() if not root.children]:
                del self._roots[key]


def common_length(segment: list[int], tokens: list[int], start: int = 0, stop: int | None = None) -> int:
    """How many leading tokens of ``segment`` equal those of ``tokens[start:stop]``."""
    n = min(len(segment), (len(tokens) if stop is None else stop) - start)
    if segment[:n] == tokens[start:start + n]:
        return n
    i = 0
    while i < n and segment[i] == tokens[start + i]:
        i += 1
    return i


def _leaves(roots) -> list[_Node]:
    out, stack = [], [c for root in roots for c in root.children.values()]
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        else:
            out.append(node)
    return out


def _total(node: _Node) -> int:
    total, stack = 0, [node]
    while stack:
        n = stack.pop()
        total += n.nbytes
        stack.extend(n.children.values())
    return total
