"""Dequantization on the CPU: a one-pass C++ loop (``csrc/dequant_cpu.cpp``), built on first use, with the
pure-torch reference (:func:`.reference.dequantize`) as the fallback and the specification.

The reference takes four passes over the codes and the result (unpack, subtract the zero points, convert,
scale); the C++ loop reads each packed word once and writes each weight once, as bitsandbytes' CPU NF4
dequantize does, and its result is bit-equal to the reference in fp32, bf16 and fp16. It is compiled by
``torch.utils.cpp_extension`` with the host's C++ compiler and OpenMP the first time a CPU layer is
dequantized (about 30 s; cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, and
rebuilt when the source changes), for the baseline x86-64/arm64 instruction set, so a cache shared between
CPU models stays valid (``ninja``, which the build runs, comes from its pip wheel where the system has none).
Without a compiler the reference runs, with one warning. ``EORA_FT_CPU_EXTENSION=0``
forces the reference. A build killed midway (Ctrl-C, a scheduler's SIGTERM) leaves torch's ``lock`` file in the
build directory, and torch then waits for it forever in every later process: a lock older than
:data:`STALE_LOCK_SECONDS` is removed, with a warning, before the build.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .reference import dequantize as reference_dequantize

logger = logging.getLogger(__name__)

DISABLE_ENV = "EORA_FT_CPU_EXTENSION"
EXTENSION_NAME = "eora_ft_dequant_cpu"
SOURCE = Path(__file__).resolve().parent / "csrc" / "dequant_cpu.cpp"
_OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STALE_LOCK_SECONDS = 600  # a build takes ~30 s: a lock this old belongs to a process that died while building
_loaded: dict[str, object] = {}


def extension():
    """The compiled module, built on the first call; None when disabled by ``EORA_FT_CPU_EXTENSION=0`` or when
    the build fails (no compiler or OpenMP: logged once, the reference runs instead)."""
    if "module" in _loaded:
        return _loaded["module"]
    module = None
    if os.environ.get(DISABLE_ENV, "1") != "0":
        try:
            from torch.utils.cpp_extension import load

            _put_ninja_on_path()
            _remove_stale_lock()
            logger.info("building the CPU dequantize extension %s (once per source version, ~30 s)", EXTENSION_NAME)
            module = load(name=EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                          extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # noqa: BLE001 -- any build failure: no compiler, no OpenMP, read-only cache dir
            logger.warning("could not build the CPU dequantize extension (%s: %s); dequantizing with the pure-torch "
                           "reference instead (about 1.5x slower). Set %s=0 to skip the attempt.",
                           type(err).__name__, err, DISABLE_ENV)
    _loaded["module"] = module
    return module


def _remove_stale_lock(now: float | None = None) -> bool:
    """Remove torch's build ``lock`` for this extension when it is older than :data:`STALE_LOCK_SECONDS`; returns
    whether one was removed. A younger lock is another process building now: torch waits for it."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(EXTENSION_NAME, verbose=False)) / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    logger.warning("removing %s, left %.0f s ago by a build that did not finish (a killed process): torch would "
                   "wait for it forever", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _put_ninja_on_path() -> None:
    """torch's JIT build runs ``ninja`` from PATH: when the system has none, use the pip wheel's (a dependency),
    whose binary sits outside PATH unless the virtual environment is activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight ``[N, K]`` in ``dtype`` on the CPU, with :func:`.reference.dequantize`'s arguments and result.

    ``qweight`` int32 ``[K * bits / 32, N]``, ``scales`` float ``[G, N]``, ``zeros`` ``[G, N]``, all CPU. The C++
    loop runs for integer zero points, a group size that is a multiple of 32 (or -1) and a float ``dtype``;
    anything else, or no extension, goes to the reference."""
    group = in_features if group_size == -1 else group_size
    eligible = (qweight.device.type == "cpu" and not zeros.is_floating_point() and group % 32 == 0
                and bits in (2, 3, 4, 8) and dtype in _OUTPUT_DTYPES)
    module = extension() if eligible else None
    if module is None:
        return reference_dequantize(qweight, scales, zeros, bits, group_size, in_features, dtype=dtype)
    out = torch.empty(qweight.shape[1], in_features, dtype=dtype, device=qweight.device)
    return module.dequantize(qweight.contiguous(), scales.to(torch.float32).contiguous(),
                             zeros.to(torch.int32).contiguous(), bits, group, out)
