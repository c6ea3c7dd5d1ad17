"""One reusable buffer per device and dtype for the dense weights the large-M path dequantizes.

Training dequantizes every packed linear twice per step (forward, and again in backward instead of
keeping ``W_c``), each time into a fresh ``[N, K]`` tensor; the caching allocator recycles them, but
the peak holds one per layer in flight and the allocations churn. The matmul that reads a dequantized
weight is enqueued before the next dequantization on the same stream, so one buffer, grown to the
largest layer, serves them all. Only for weights consumed at once (never hand one out).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view of the shared buffer for ``(device, dtype)``, grown when needed.

    Its contents are whatever the previous user left: the caller overwrites all of it."""
    key = (torch.device(device), dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        _BUFFERS[key] = buffer = torch.empty(rows * cols, dtype=dtype, device=device)
    return buffer[: rows * cols].view(rows, cols)


def release() -> None:
    """Drop every buffer (e.g. before evaluating a larger model on the same device)."""
    _BUFFERS.clear()
