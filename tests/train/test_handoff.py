"""The file handoff between the main process and the waiting ranks: payloads, failures, timeouts."""

import threading
import time

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
