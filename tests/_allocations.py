"""Peak memory a block of CPU code allocates, from torch's profiler: every allocation through torch's CPU
allocator is recorded (those inside a kernel too, e.g. a structured op's out= proxy), not only op outputs."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def peak_bytes() -> Iterator[dict]:
    """``with peak_bytes() as peak: ...`` then ``peak["bytes"]``: the largest total of bytes allocated inside the
    block and alive at once (memory alive before the block is not counted)."""
    from torch._C._profiler import _EventType

    found: dict = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield found
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):  # frees are negative sizes
        live += size
        peak = max(peak, live)
    found["bytes"] = peak
