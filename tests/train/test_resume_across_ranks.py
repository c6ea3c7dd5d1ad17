"""Two gloo ranks agree on the checkpoint they resume from, or all stop with one message (never hang).

Per-node output directories are simulated by giving each rank its own ``output_dir`` and making it
local rank 0 of its own "node", which is what a multi-node launch with node-local disks looks like.
"""

import shutil

import pytest

from tests.train._launch import launch_ranks, losses

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # the same ranks, data and arithmetic: only the order of fp32 sums may differ


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """4 steps on 2 ranks in one shared output_dir, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("shared")
    reports = launch_ranks(tmp, "first", str(tmp / "out"), world_size=2)
    return tmp, reports


def test_a_shared_output_dir_trains_with_ddp_find_unused_parameters_off(shared_run):
    _, reports = shared_run
    for report in reports:
        assert sorted(losses(report)) == [1, 2, 3, 4]
        assert report["find_unused_parameters"] is False  # transformers' default for a PEFT model is True
        assert report["args_untouched"]  # the caller's (recorded) config keeps None
    assert losses(reports[0]) == losses(reports[1])


def test_a_shared_output_dir_resumes_every_rank_from_the_same_step(shared_run):
    tmp, first = shared_run
    out = tmp / "out"
    shutil.rmtree(out / "checkpoint-4")  # as if the run had died after its step-2 checkpoint
    reports = launch_ranks(tmp, "resumed", str(out), world_size=2)
    assert [r["resumed_from"] for r in reports] == [str(out / "checkpoint-2")] * 2
    for report in reports:
        assert losses(report) == pytest.approx(losses(first[0]), rel=TOLERANCE)


def test_per_node_output_dirs_are_refused_on_every_rank_without_save_on_each_node(tmp_path):
    reports = launch_ranks(tmp_path, "per_node", str(tmp_path / "node{rank}"), world_size=2, one_node_per_rank=True)
    errors = {report.get("error") for report in reports}
    assert len(errors) == 1 and None not in errors, f"every rank must stop, with the same message: {reports}"
    message = errors.pop()
    assert "rank 1 (" in message and str(tmp_path / "node0") in message  # the main process's path
    assert "file system every node mounts" in message and "save_on_each_node: true" in message
    assert not (tmp_path / "node0" / "checkpoint-2").exists()  # refused before the first step


def test_per_node_output_dirs_with_save_on_each_node_resume_from_the_step_every_node_has(shared_run, tmp_path):
    _, shared = shared_run
    nodes = [tmp_path / f"node{rank}" for rank in range(2)]
    first = launch_ranks(tmp_path, "first", str(tmp_path / "node{rank}"), world_size=2, one_node_per_rank=True,
                         save_on_each_node=True)
    for report in first:
        assert losses(report) == pytest.approx(losses(shared[0]), rel=TOLERANCE)
    for node in nodes:  # each node wrote its own copy of every checkpoint
        assert (node / "checkpoint-2" / "trainer_state.json").exists()
        assert (node / "checkpoint-4" / "trainer_state.json").exists()

    # node 1 died while writing checkpoint-4: the main process has it, node 1 has not, so both take step 2
    (nodes[1] / "checkpoint-4" / "trainer_state.json").unlink()
    resumed = launch_ranks(tmp_path, "resumed", str(tmp_path / "node{rank}"), world_size=2, one_node_per_rank=True,
                           save_on_each_node=True)
    assert [r["resumed_from"] for r in resumed] == [str(node / "checkpoint-2") for node in nodes]
    for report in resumed:
        assert losses(report) == pytest.approx(losses(shared[0]), rel=TOLERANCE)
