"""Measure CPU memory from the profiler's allocator events (shared by the memory tests)."""

from __future__ import annotations

import numpy as np


def peak_allocated(prof) -> int:
    """Peak bytes the CPU allocator held during a profile, above what was live before it."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = np.cumsum([size for _, size in sorted(events)])
    assert len(live), "the profiler recorded no allocations"
    return int(live.max())
