"""Main-only work without a collective: the main process posts small files, the other ranks poll for them.

A rank waiting in a collective is killed by NCCL's watchdog after the process group's timeout
(``ddp_timeout``, 30 minutes by default), and loading, evaluating and compressing an 8B model on the
main process takes longer than that. So while the main process does what only it does, the other
ranks wait on a file in a directory every rank sees (the artifact cache), never in a collective:

    handoff = Handoff.start(state, cache_root, timeout)   # one collective, at once: the run's id
    if main: ...work...; handoff.post("entry", key=...)   # (a failure is posted too, see main_work)
    else:    payload = handoff.wait("entry", "build the compressed model")
    ...
    if main: ...last work...; handoff.post("done")          # the others wait for it, then
    handoff.finish(state)                                   # every rank: a short barrier, the directory removed

A failure on the main process is posted as well, so the others stop at once with its message
instead of waiting for the timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

logger = logging.getLogger(__name__)

HANDOFF_DIR = ".handoff"
FAILED = "failed"
STALE_SECONDS = 7 * 24 * 3600  # run directories older than this (killed runs) are swept at start


class MainProcessFailed(RuntimeError):
    """The main process posted a failure while this rank waited for it."""


class Handoff:
    """Files in ``<root>/.handoff/<run id>/``: ``<name>.json`` posted by the main process."""

    def __init__(self, directory: Path, is_main: bool, timeout: float, poll_seconds: float = 1.0,
                 log_every: float = 300.0) -> None:
        self.directory, self.is_main, self.timeout = Path(directory), is_main, timeout
        self.poll_seconds, self.log_every = poll_seconds, log_every

    @classmethod
    def start(cls, state: PartialState, root: str | os.PathLike, timeout: float, **options) -> "Handoff":
        """Agree on a fresh run directory under ``root`` (one quick collective, before any long work)."""
        base = Path(root) / HANDOFF_DIR
        box = [uuid.uuid4().hex if state.is_main_process else None]
        if state.is_main_process:
            _sweep_stale(base)
            (base / box[0]).mkdir(parents=True, exist_ok=True)
        if state.num_processes > 1:
            broadcast_object_list(box)
        handoff = cls(base / box[0], state.is_main_process, timeout, **options)
        if not handoff.directory.is_dir():  # created before the broadcast: a rank that cannot see it never will
            raise RuntimeError(f"rank {state.process_index} cannot see {handoff.directory}, which the main process "
                               f"created: put cache_dir ({root}) on a file system every rank sees")
        return handoff

    def post(self, name: str, **payload) -> None:
        """Main process: publish ``payload`` (JSON values) under ``name``, atomically."""
        if not self.is_main:
            raise RuntimeError("only the main process posts")
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.directory / f"{name}.json")

    @contextlib.contextmanager
    def main_work(self, what: str) -> Iterator[None]:
        """Main process: run the body; if it raises, post the failure (``what`` failed: the error) first."""
        try:
            yield
        except BaseException as err:
            if self.is_main:
                with contextlib.suppress(OSError):
                    self.post(FAILED, what=what, error=f"{type(err).__name__}: {err}")
            raise

    def wait(self, name: str, what: str) -> dict:
        """Other ranks: poll until the main process posts ``name`` (returns its payload) or a failure
        (raises :class:`MainProcessFailed`), or until the timeout (raises ``TimeoutError`` saying which knob)."""
        if self.is_main:
            raise RuntimeError("the main process does not wait for itself")
        path, failed = self.directory / f"{name}.json", self.directory / f"{FAILED}.json"
        start = last_log = time.monotonic()
        while True:
            if path.exists():
                return json.loads(path.read_text())
            if failed.exists():
                info = json.loads(failed.read_text())
                raise MainProcessFailed(f"the main process failed while {info['what']} ({info['error']}); "
                                        f"this rank stopped waiting for it to {what}")
            now = time.monotonic()
            if now - start > self.timeout:
                raise TimeoutError(
                    f"waited {now - start:.0f} s for the main process to {what} (no {path} appeared); raise "
                    f"main_process_timeout (now {self.timeout:.0f} s) if it is still working, or check its log")
            if now - last_log > self.log_every:
                logger.info("waiting for the main process to %s (%.0f min so far)", what, (now - start) / 60)
                last_log = now
            time.sleep(self.poll_seconds)

    def finish(self, state: PartialState) -> None:
        """Every rank, after the main process posted its last file and the others read it: one short barrier
        (nobody works any more: it lasts one poll interval), then the main process removes the run directory.
        Removing it earlier could hide that last file from a rank still polling for it."""
        if state.num_processes > 1:
            state.wait_for_everyone()
        self.close()

    def close(self) -> None:
        """Main process, after every rank has read what it needed: remove the run directory."""
        if self.is_main:
            shutil.rmtree(self.directory, ignore_errors=True)


def _sweep_stale(base: Path) -> None:
    if not base.is_dir():
        return
    now = time.time()
    for entry in base.iterdir():
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
