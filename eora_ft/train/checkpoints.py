"""Which checkpoint a run resumes from, decided once for every rank.

Every rank reads ``output_dir`` with its own eyes: with one directory per node, node 0 finds a
checkpoint, the others find none and start fresh, and DeepSpeed's load then waits in a collective
until ``ddp_timeout``. So the ranks look once, together (two small collectives before the Trainer's
first), and all take the same decision or all raise the same error: a rank that raised alone while
the others went on into the Trainer's collectives would leave them hanging.

The Trainer writes a checkpoint from the global main process only unless ``save_on_each_node`` is
set; with an ``output_dir`` the other nodes cannot see, their copy of the checkpoint never exists
and the run could never resume. :func:`agree_on_resume` refuses that layout before training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

MARKER_PREFIX = ".output-dir-check-"


def complete_checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the ``checkpoint-N`` directories in ``output_dir`` that were written to the end, ascending.

    The Trainer writes a checkpoint in place, ``trainer_state.json`` last; a run killed while saving
    leaves a directory without it, which resuming from would crash on (or silently restart).
    """
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(name.split("-")[-1]) for name in os.listdir(output_dir)
                   if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-")[-1].isdigit())
    complete = []
    for step in steps:
        path = checkpoint_path(output_dir, step)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            complete.append(step)
        else:
            logger.warning("skipping %s: incomplete (no trainer_state.json; the run stopped while saving it)", path)
    return complete


def checkpoint_path(output_dir: str, step: int) -> str:
    """``<output_dir>/checkpoint-<step>``, the Trainer's name for it."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written to the end, or None (this process's view)."""
    steps = complete_checkpoint_steps(output_dir)
    return checkpoint_path(output_dir, steps[-1]) if steps else None


@dataclass(frozen=True)
class RankView:
    """What one rank sees of its ``output_dir``: the main process's marker file, and its complete checkpoints."""

    rank: int
    host: str
    output_dir: str
    sees_marker: bool
    steps: tuple[int, ...]


def agree_on_resume(state: PartialState, output_dir: str, save_on_each_node: bool,
                    saves_checkpoints: bool = True) -> str | None:
    """The checkpoint this rank resumes from (the same step on every rank), or None to start fresh.

    A collective: every rank calls it, before ``trainer.train``. Raises (on every rank, with the same
    message) when ``output_dir`` is not one directory that every rank sees and ``save_on_each_node`` is
    off (and the run ``saves_checkpoints``), or when the main process's newest checkpoint is on no other
    rank's disk.
    """
    if state.num_processes == 1:
        return last_complete_checkpoint(output_dir)
    views = _gather_views(state, output_dir)
    return resume_decision(views, output_dir, save_on_each_node or not saves_checkpoints)


def _gather_views(state: PartialState, output_dir: str) -> list[RankView]:
    box = [f"{MARKER_PREFIX}{uuid.uuid4().hex}" if state.is_main_process else None]
    marker = None
    if state.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        marker = os.path.join(output_dir, box[0])
        with open(marker, "w") as handle:
            handle.write("written by the main process to check that every rank sees this directory\n")
    try:
        broadcast_object_list(box)  # written before the broadcast: a rank that cannot see it now never will
        view = RankView(state.process_index, socket.gethostname(), output_dir,
                        os.path.exists(os.path.join(output_dir, box[0])), tuple(complete_checkpoint_steps(output_dir)))
        views = gather_object([view])  # every rank has seen the marker once this returns
    finally:
        if marker is not None:
            with contextlib.suppress(OSError):
                os.remove(marker)
    return sorted(views, key=lambda v: v.rank)


def resume_decision(views: list[RankView], output_dir: str, save_on_each_node: bool) -> str | None:
    """What :func:`agree_on_resume` decides from every rank's view (rank 0 is the main process): the
    checkpoint in this rank's ``output_dir``, or None. ``save_on_each_node``: every node writes its own
    copy of each checkpoint (or none is written), so ranks may see different directories.

    Pure, so every rank computes the same answer from the same gathered views; the messages name the
    main process's paths, so every rank raises the same one.
    """
    main_dir = views[0].output_dir
    blind = [v for v in views if not v.sees_marker]
    if blind and not save_on_each_node:
        raise RuntimeError(
            f"output_dir {main_dir} is not one directory for every rank: {_ranks(blind)} cannot see the file "
            f"the main process ({views[0].host}) wrote there. The Trainer writes checkpoints from the main process "
            "only, so these ranks would never find one to resume from. Either put output_dir on a file system "
            "every node mounts (the same path on each), or set save_on_each_node: true to give every node its own "
            "copy of each checkpoint")
    main_steps = views[0].steps
    if not main_steps:
        stale = [v for v in views if v.steps]
        if stale:
            logger.warning("the main process has no checkpoint in %s but %s do: starting fresh on every rank",
                           main_dir, _ranks(stale))
        return None
    common = set(main_steps).intersection(*(v.steps for v in views))
    if not common:
        missing = [v for v in views if main_steps[-1] not in v.steps]
        raise RuntimeError(
            f"the main process resumes from {checkpoint_path(main_dir, main_steps[-1])}, but {_ranks(missing)} "
            f"cannot see it complete (no trainer_state.json), nor any older checkpoint the main process has. Put "
            f"output_dir on a file system every node mounts, or copy that checkpoint to the same path on those "
            f"nodes, or remove it to start fresh")
    step = max(common)
    if step != main_steps[-1]:
        missing = [v for v in views if main_steps[-1] not in v.steps]
        logger.warning("%s is not complete on %s: every rank resumes from checkpoint-%d instead",
                       checkpoint_path(main_dir, main_steps[-1]), _ranks(missing), step)
    return checkpoint_path(output_dir, step)


def _ranks(views: list[RankView]) -> str:
    names = ", ".join(f"{v.rank} ({v.host})" for v in views)
    return f"rank {names}" if len(views) == 1 else f"ranks {names}"
