"""The one-pass CPU dequantizer (C++ extension) is bit-equal to the pure-torch reference, and falls back to it."""

import shutil
from pathlib import Path

import pytest
import torch

from eora_ft.kernels import cpu_dequant
from eora_ft.kernels.packing import pack_codes
from eora_ft.kernels.reference import dequantize as reference_dequantize

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


def _packed(bits: int, k: int, n: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    groups = k // (k if group == -1 else group)
    scales = torch.rand(groups, n, generator=g) * 0.1 + 1e-3
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).to(torch.uint8)
    return pack_codes(codes, bits), scales, zeros


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the reference runs instead")
def test_extension_builds_where_a_compiler_exists():
    assert cpu_dequant.extension() is not None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the reference runs instead")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extension_is_bit_equal_to_the_reference(bits, group, dtype):
    k, n = 256, 40  # n not a multiple of the 16-row tile
    qweight, scales, zeros = _packed(bits, k, n, group, seed=bits * 7 + (group % 97))
    got = cpu_dequant.dequantize(qweight, scales, zeros, bits, group, k, dtype=dtype)
    want = reference_dequantize(qweight, scales, zeros, bits, group, k, dtype=dtype)
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, want)


def test_float_zero_points_and_disabled_extension_use_the_reference(monkeypatch):
    qweight, scales, zeros = _packed(4, 128, 8, 32, seed=1)
    float_zeros = zeros.to(torch.float32) + 0.5  # not integer: only the reference handles them
    assert torch.equal(cpu_dequant.dequantize(qweight, scales, float_zeros, 4, 32, 128),
                       reference_dequantize(qweight, scales, float_zeros, 4, 32, 128))
    monkeypatch.setattr(cpu_dequant, "_loaded", {})
    monkeypatch.setenv(cpu_dequant.DISABLE_ENV, "0")
    assert cpu_dequant.extension() is None
    assert torch.equal(cpu_dequant.dequantize(qweight, scales, zeros, 4, 32, 128),
                       reference_dequantize(qweight, scales, zeros, 4, 32, 128))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_dequant, "_loaded", {})
    monkeypatch.delenv(cpu_dequant.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    qweight, scales, zeros = _packed(2, 64, 4, 32, seed=2)
    with caplog.at_level("WARNING", logger=cpu_dequant.__name__):
        first = cpu_dequant.dequantize(qweight, scales, zeros, 2, 32, 64)
        cpu_dequant.dequantize(qweight, scales, zeros, 2, 32, 64)
    assert sum("could not build" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(first, reference_dequantize(qweight, scales, zeros, 2, 32, 64))


def test_the_pip_ninja_is_put_on_path_when_the_system_has_none(monkeypatch):
    ninja = pytest.importorskip("ninja")  # a dependency: present wherever eora_ft is installed
    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    cpu_dequant._put_ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """torch waits forever on the lock file of a build that died; one from a build running now must stay."""
    import os

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(cpu_dequant.EXTENSION_NAME, verbose=False)) / "lock"
    lock.touch()
    assert not cpu_dequant._remove_stale_lock() and lock.exists()  # just made: a build in progress
    old = lock.stat().st_mtime - cpu_dequant.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        assert cpu_dequant._remove_stale_lock()
    assert not lock.exists() and "did not finish" in caplog.text
