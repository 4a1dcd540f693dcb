"""The server's counters, written in Prometheus' text format (version 0.0.4) by hand: no dependency.

Exposed at ``GET /metrics``:

- ``lorakit_requests_total{route, code}``: HTTP requests answered, by route and status code;
- ``lorakit_requests_finished_total{reason}``: generations ended (``stop``, ``length``,
  ``cancelled`` — the client left —, ``error``);
- ``lorakit_prompt_tokens_total`` / ``lorakit_generation_tokens_total{model}``;
- ``lorakit_request_latency_seconds``: a histogram of the time from a request's arrival to its
  last token;
- gauges read from the engine at scrape time: ``lorakit_requests_running``,
  ``lorakit_requests_waiting`` (the queue depth), ``lorakit_adapters_loaded``,
  ``lorakit_adapters_resident``.

All updates happen on the server's event loop, so no lock is needed.
"""

from __future__ import annotations

import bisect
from collections import Counter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Counters of one server."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.finished: Counter[str] = Counter()
        self.prompt_tokens: Counter[str] = Counter()
        self.generation_tokens: Counter[str] = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.latency_sum = 0.0

    def answered(self, route: str, code: int) -> None:
        self.requests[(route, code)] += 1

    def generation(self, model: str, prompt_tokens: int, tokens: int, reason: str, seconds: float) -> None:
        self.finished[reason] += 1
        self.prompt_tokens[model] += prompt_tokens
        self.generation_tokens[model] += tokens
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def render(self, running: int, waiting: int, loaded: int, resident: int,
               prefix_cache: dict[str, int] | None = None) -> str:
        """The exposition text, with the engine's gauges (and its prefix cache's counters) as given."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("lorakit_requests_total", "counter", "HTTP requests answered, by route and status code.",
               [(_labels(route=r, code=c), n) for (r, c), n in sorted(self.requests.items())])
        family("lorakit_requests_finished_total", "counter", "Generations ended, by finish reason.",
               [(_labels(reason=r), n) for r, n in sorted(self.finished.items())])
        family("lorakit_prompt_tokens_total", "counter", "Prompt tokens of finished generations, by model.",
               [(_labels(model=m), n) for m, n in sorted(self.prompt_tokens.items())])
        family("lorakit_generation_tokens_total", "counter", "Generated tokens, by model.",
               [(_labels(model=m), n) for m, n in sorted(self.generation_tokens.items())])
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts):
            cumulative += count
            buckets.append((_labels(le="+Inf" if bound == float("inf") else _number(bound)), cumulative))
        lines.append("# HELP lorakit_request_latency_seconds Time from a request's arrival to its last token.")
        lines.append("# TYPE lorakit_request_latency_seconds histogram")
        lines.extend(f"lorakit_request_latency_seconds_bucket{labels} {n}" for labels, n in buckets)
        lines.append(f"lorakit_request_latency_seconds_sum {_number(self.latency_sum)}")
        lines.append(f"lorakit_request_latency_seconds_count {cumulative}")
        family("lorakit_requests_running", "gauge", "Requests in the running batch.", [("", running)])
        family("lorakit_requests_waiting", "gauge", "Requests waiting for a batch slot (queue depth).", [("", waiting)])
        family("lorakit_adapters_loaded", "gauge", "Adapters the server knows.", [("", loaded)])
        family("lorakit_adapters_resident", "gauge", "Adapters resident in the batched layers' slots.",
               [("", resident)])
        if prefix_cache is not None:
            family("lorakit_prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   [("", prefix_cache["queried_tokens"])])
            family("lorakit_prefix_cache_hit_tokens_total", "counter",
                   "Prompt tokens found in the prefix cache (not computed again).", [("", prefix_cache["hit_tokens"])])
            family("lorakit_prefix_cache_bytes", "gauge", "Memory held by cached prefixes.", [("", prefix_cache["bytes"])])
        return "\n".join(lines) + "\n"


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return f"{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
