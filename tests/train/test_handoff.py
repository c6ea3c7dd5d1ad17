"""The file handoff between the main process and the waiting ranks: payloads, failures, timeouts."""

import threading
import time
from types import SimpleNamespace

import pytest

from eora_ft.train.handoff import Handoff, MainProcessFailed


def _pair(tmp_path, timeout=5.0):
    return (Handoff(tmp_path, True, timeout, poll_seconds=0.01),
            Handoff(tmp_path, False, timeout, poll_seconds=0.01))


def test_a_waiting_rank_gets_what_the_main_process_posts_later(tmp_path):
    main, other = _pair(tmp_path)
    threading.Timer(0.2, lambda: main.post("entry", key="abc", dtype="torch.float32")).start()
    started = time.monotonic()
    assert other.wait("entry", "build the entry") == {"key": "abc", "dtype": "torch.float32"}
    assert time.monotonic() - started >= 0.15
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, then renamed into place


def test_a_failure_on_the_main_process_stops_the_waiting_ranks_with_its_message(tmp_path):
    main, other = _pair(tmp_path)
    with pytest.raises(ValueError, match="bad group size"):
        with main.main_work("compressing the model"):
            raise ValueError("bad group size")
    with pytest.raises(MainProcessFailed, match=r"failed while compressing the model \(ValueError: bad group size\)"):
        other.wait("entry", "build the entry")


def test_waiting_longer_than_the_timeout_names_the_knob(tmp_path):
    _, other = _pair(tmp_path, timeout=0.1)
    with pytest.raises(TimeoutError, match="main_process_timeout"):
        other.wait("entry", "build the entry")


def test_roles_are_enforced_and_close_removes_the_run_directory(tmp_path):
    main, other = _pair(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError):
        other.post("entry")
    with pytest.raises(RuntimeError):
        main.wait("entry", "x")
    main.post("ready")
    main.close()
    assert not (tmp_path / "run").exists()


def test_finish_removes_the_run_directory_only_after_every_rank_has_read_the_last_file(tmp_path):
    """The main process posts ``done`` and finishes at once; the other rank, still polling, must see the file
    (removing the directory first would leave it waiting until main_process_timeout)."""
    main, other = _pair(tmp_path / "run")
    (tmp_path / "run").mkdir()
    other.poll_seconds = 0.3  # it looks for the file well after the main process has posted it
    barrier = threading.Barrier(2, timeout=5)
    state = SimpleNamespace(num_processes=2, wait_for_everyone=barrier.wait)
    seen = {}

    def other_rank():
        seen["done"] = other.wait("done", "write the results")
        other.finish(state)

    waiting = threading.Thread(target=other_rank)
    waiting.start()
    time.sleep(0.05)
    main.post("done", ok=True)
    main.finish(state)
    waiting.join(timeout=5)
    assert seen == {"done": {"ok": True}} and not (tmp_path / "run").exists()
