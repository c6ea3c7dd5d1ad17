"""Atomic writers: a reader, or a rerun after a crash or a full disk, sees the old version or the new one."""

import errno
import os

import pytest

from eora_ft.utils.atomic import DiskFullError, atomic_directory, atomic_write_text, exchange
from eora_ft.run.report import write_results


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_when_writing_results_keeps_the_previous_results(tmp_path, monkeypatch):
    old = {"title": "before", "stages": {}, "metrics": []}
    json_path, md_path = write_results(tmp_path, old)
    before = json_path.read_bytes(), md_path.read_bytes()
    monkeypatch.setattr("eora_ft.utils.atomic.os.fsync", _no_space)  # the kernel reports ENOSPC at flush time
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing file .*results\.json: "
                                            r"nothing was replaced .*free space there or write elsewhere"):
        write_results(tmp_path, {"title": "after", "stages": {}, "metrics": []})
    assert (json_path.read_bytes(), md_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temp files


def test_full_disk_while_writing_a_directory_keeps_the_previous_one(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target, lambda d: True, "adapter") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"old")
    with pytest.raises(DiskFullError, match="while writing adapter"):
        with atomic_directory(target, lambda d: True, "adapter") as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"new, half")
            _no_space()
    assert (target / "adapter_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_replacing_a_directory_swaps_it_whole_and_sweeps_a_killed_writers_remains(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target, lambda d: True, "model") as tmp:
        (tmp / "a").write_text("1")
    (tmp_path / ".model.tmp-killed").mkdir()  # what a SIGKILLed writer leaves
    with atomic_directory(target, lambda d: True, "model") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "one").touch()
    (second / "two").touch()
    if not exchange(first, second):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE): the two-rename fallback is used")
    assert os.listdir(first) == ["two"] and os.listdir(second) == ["one"]


def test_a_write_error_other_than_a_full_disk_is_not_renamed(tmp_path, monkeypatch):
    def denied(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("eora_ft.utils.atomic.os.fsync", denied)
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "x.txt", "text")
    assert list(tmp_path.iterdir()) == []
