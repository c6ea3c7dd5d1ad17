"""Every Triton launch goes through :func:`launch`: on the data's device, and with a clear signal when
Triton itself cannot run.

Device: Triton launches on the *current* CUDA device, not the one its tensors live on, so a layer on
``cuda:1`` launched while ``cuda:0`` is current reads foreign addresses (an illegal memory access). The
launch enters ``torch.cuda.device(tensor.device)`` first (nothing for CPU tensors under the interpreter).

Infrastructure: the first launch builds Triton's driver stubs with the host's C compiler and finds the
GPU driver; a minimal runtime image without ``gcc`` (or a cache directory it cannot write) fails there,
not in our code. Such failures are recorded once per process and raised as :class:`TritonUnavailable`,
so that callers fall back to pure torch (:mod:`.fallback`); a kernel's own errors (a shape
``ValueError``, a ``CompilationError``, ``OutOfResources``) propagate unchanged.

Imports no Triton: it must work where Triton is missing.
"""

from __future__ import annotations

import contextlib
import subprocess
import warnings

import torch

# RuntimeError messages of triton/runtime/build.py and driver.py when the host lacks what Triton needs
_INFRASTRUCTURE_MESSAGES = ("Failed to find C compiler", "Failed to find C++ compiler", "active drivers",
                            "Failed to load newly compiled", "libcuda")
# Triton's own error classes that mean "this toolchain cannot build for this GPU" (e.g. ptxas too old)
_INFRASTRUCTURE_CLASSES = ("PTXASError",)

_failure: BaseException | None = None
_warned = False


class TritonUnavailable(RuntimeError):
    """Triton cannot compile or launch on this host (no C compiler, no driver, no Triton); ``cause`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Triton cannot run here: {type(cause).__name__}: {cause}")
        self.cause = cause


class TritonFallbackWarning(RuntimeWarning):
    """Issued once per process when a Triton kernel is replaced by its pure-torch equivalent."""


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor, a no-op context otherwise (CPU, interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def is_infrastructure_failure(err: BaseException) -> bool:
    """Whether ``err`` (raised by a Triton import, build or launch) means Triton cannot run on this host,
    as opposed to a problem with the kernel or its arguments."""
    if isinstance(err, (ImportError, OSError, subprocess.CalledProcessError)):
        return True
    if type(err).__name__ in _INFRASTRUCTURE_CLASSES:
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _INFRASTRUCTURE_MESSAGES)


def record_failure(err: BaseException) -> TritonUnavailable:
    """Remember that Triton cannot run (later calls skip it) and return the exception to raise."""
    global _failure
    _failure = err
    return TritonUnavailable(err)


def unavailable() -> BaseException | None:
    """The infrastructure failure seen in this process, or None while Triton has not failed."""
    return _failure


def launch(kernel, grid, tensor: torch.Tensor, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``tensor``'s device. Raises :class:`TritonUnavailable` (at once
    after a first failure) when Triton cannot build or launch on this host; other errors pass through."""
    if _failure is not None:
        raise TritonUnavailable(_failure)
    try:
        with device_guard(tensor):
            kernel[grid](*args, **kwargs)
    except Exception as err:  # noqa: BLE001 -- classified: only infrastructure failures are translated
        if is_infrastructure_failure(err):
            raise record_failure(err) from err
        raise


def warn_fallback(what: str, cost: str) -> None:
    """One :class:`TritonFallbackWarning` per process: ``what`` runs in pure torch instead, at ``cost``."""
    global _warned
    if _warned:
        return
    _warned = True
    cause = f"{type(_failure).__name__}: {_failure}" if _failure is not None else "unknown"
    warnings.warn(f"Triton cannot run on this host ({cause}); {what} now run in pure torch instead: {cost}. "
                  "Install a C compiler (gcc) where Triton runs, or check the GPU driver, to get the kernels back.",
                  TritonFallbackWarning, stacklevel=3)
