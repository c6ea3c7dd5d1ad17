"""The artifact cache: content keys, one build per key, corrupt or unfinished entries rebuilt, no races."""

import json
import threading
import time

import pytest
import torch

from eora_ft.run.cache import (
    MANIFEST,
    cache_key,
    check_entry,
    ensure_entry,
    model_fingerprint,
    require_entry,
    tensor_fingerprint,
)
from eora_ft.utils.atomic import current_umask


def _builder(calls: list, payload: bytes = b"packed", delay: float = 0.0):
    def build(tmp):
        calls.append(tmp)
        time.sleep(delay)
        (tmp / "base").mkdir()
        (tmp / "base" / "model.safetensors").write_bytes(payload)
        return {"calib_tokens": 7}
    return build


def test_key_depends_on_every_part_and_on_contents_only(tmp_path):
    parts = {"model": {"files": {"a": "1"}}, "compression": {"bits": 2}, "calibration": {"tokens": "x"},
             "init": {"init_method": "eora"}}
    key = cache_key(parts)
    assert key == cache_key(dict(reversed(list(parts.items()))))  # order of keys is irrelevant
    for part, changed in [("compression", {"bits": 3}), ("calibration", {"tokens": "y"}),
                          ("init", {"init_method": "loftq"}), ("model", {"files": {"a": "2"}})]:
        assert cache_key({**parts, part: changed}) != key, part
    ids = torch.arange(12).reshape(3, 4)
    assert tensor_fingerprint(ids) == tensor_fingerprint(ids.clone())
    assert tensor_fingerprint(ids) != tensor_fingerprint(ids.reshape(4, 3))
    ids2 = ids.clone()
    ids2[2, 3] += 1
    assert tensor_fingerprint(ids) != tensor_fingerprint(ids2)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    before = model_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("a model card edit does not change the weights")
    assert model_fingerprint(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert model_fingerprint(tmp_path) != before
    assert model_fingerprint(None, commit_hash="abc123") == {"commit": "abc123"}


def test_built_once_then_hit(tmp_path):
    calls = []
    entry, built = ensure_entry(tmp_path, "k1", _builder(calls))
    assert built and len(calls) == 1 and check_entry(entry) is None
    assert entry.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's 0700: caches are shared
    assert json.loads((entry / "meta.json").read_text()) == {"calib_tokens": 7}
    again, built_again = ensure_entry(tmp_path, "k1", _builder(calls))
    assert again == entry and not built_again and len(calls) == 1
    assert require_entry(tmp_path, "k1") == entry
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["k1"]  # no temp dirs left


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_manifest", "delete_file"])
def test_corrupt_or_unfinished_entry_is_rebuilt(tmp_path, damage):
    calls = []
    entry, _ = ensure_entry(tmp_path, "k", _builder(calls))
    weights = entry / "base" / "model.safetensors"
    if damage == "flip_byte":
        weights.write_bytes(b"packeD")  # same size: only the hash notices
    elif damage == "truncate":
        weights.write_bytes(b"pack")
    elif damage == "delete_manifest":
        (entry / MANIFEST).unlink()
    else:
        weights.unlink()
    assert check_entry(entry) is not None
    if damage != "flip_byte":  # other ranks check sizes only: the builder has just hashed every file
        with pytest.raises(RuntimeError, match="not usable"):
            require_entry(tmp_path, "k")
    entry2, built = ensure_entry(tmp_path, "k", _builder(calls))
    assert built and len(calls) == 2 and check_entry(entry2) is None
    assert weights.read_bytes() == b"packed"


def test_failed_build_leaves_nothing(tmp_path):
    def broken(tmp):
        (tmp / "half-written").write_text("x")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-compression

    with pytest.raises(KeyboardInterrupt):
        ensure_entry(tmp_path, "k", broken)
    assert check_entry(tmp_path / "k") == "absent"
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_concurrent_builders_build_once(tmp_path):
    calls, results = [], []

    def worker():
        results.append(ensure_entry(tmp_path, "k", _builder(calls, delay=0.3)))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(built for _, built in results) == [False, False, True]
    assert check_entry(tmp_path / "k") is None


_BUILDER_PROCESS = """
import json, sys, time
from pathlib import Path
from eora_ft.run.cache import ensure_entry

def build(tmp):
    (Path(sys.argv[2]) / f"started-{sys.argv[3]}").touch()
    time.sleep(1.0)  # long enough that the other process arrives while this one holds the lock
    (tmp / "base").mkdir()
    (tmp / "base" / "model.safetensors").write_bytes(b"packed by " + sys.argv[3].encode())
    return {"builder": sys.argv[3]}

entry, built = ensure_entry(sys.argv[1], "k", build)
print(json.dumps({"built": built, "payload": (entry / "base" / "model.safetensors").read_text()}))
"""


def test_two_processes_on_one_entry_one_builds_the_other_waits_and_loads(tmp_path):
    import subprocess
    import sys

    cache, marks = tmp_path / "cache", tmp_path / "marks"
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER_PROCESS, str(cache), str(marks), name],
                              stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    outputs = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert sorted(out["built"] for out in outputs) == [False, True]
    assert len(list(marks.iterdir())) == 1  # the build ran once
    assert outputs[0]["payload"] == outputs[1]["payload"]  # the waiter loaded what the builder wrote
    assert check_entry(cache / "k") is None


def test_full_disk_during_a_build_leaves_no_entry_and_says_so(tmp_path):
    import errno

    from eora_ft.utils.atomic import DiskFullError

    def fills_the_disk(tmp):
        (tmp / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"no space left on the device while writing artifact cache entry"):
        ensure_entry(tmp_path, "k", fills_the_disk)
    assert check_entry(tmp_path / "k") == "absent"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
