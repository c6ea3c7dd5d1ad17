"""Which checkpoint every rank resumes from, decided from what each rank sees (the 2-rank runs are in
test_resume_across_ranks.py), and checkpoints that leave the frozen base out."""

import pytest
import torch
from torch import nn

from eora_ft.train.adapter_trainer import only_trainable_in_state_dict
from eora_ft.train.checkpoints import RankView, complete_checkpoint_steps, last_complete_checkpoint, resume_decision


def _view(rank, steps=(), sees_marker=True, output_dir="/out"):
    return RankView(rank, f"node{rank}", output_dir, sees_marker, tuple(steps))


def test_complete_checkpoints_in_numeric_order_skipping_half_written_ones(tmp_path):
    assert complete_checkpoint_steps(str(tmp_path / "missing")) == []
    for step, complete in [(2, True), (10, True), (12, False)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    assert complete_checkpoint_steps(str(tmp_path)) == [2, 10]
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_a_rank_that_cannot_see_the_main_process_marker_is_refused_naming_both_fixes():
    views = [_view(0, [2]), _view(1, sees_marker=False), _view(2, sees_marker=False)]
    with pytest.raises(RuntimeError) as error:
        resume_decision(views, "/out", save_on_each_node=False)
    message = str(error.value)
    assert "ranks 1 (node1), 2 (node2)" in message and "output_dir /out" in message
    assert "file system every node mounts" in message and "save_on_each_node: true" in message


def test_every_rank_resumes_from_the_newest_step_all_of_them_have():
    views = [_view(0, [2, 4, 6]), _view(1, [2, 4], sees_marker=False)]
    assert resume_decision(views, "/local", save_on_each_node=True) == "/local/checkpoint-4"
    shared = [_view(0, [2, 4]), _view(1, [2, 4])]
    assert resume_decision(shared, "/out", save_on_each_node=False) == "/out/checkpoint-4"


def test_a_checkpoint_only_the_main_process_has_is_an_error_not_a_fresh_start_on_some_ranks():
    views = [_view(0, [2, 4]), _view(1, [], sees_marker=False)]
    with pytest.raises(RuntimeError, match=r"resumes from /out/checkpoint-4, but rank 1 \(node1\) cannot see it"):
        resume_decision(views, "/out", save_on_each_node=True)


def test_no_checkpoint_on_the_main_process_starts_every_rank_fresh():
    assert resume_decision([_view(0), _view(1, [2], sees_marker=False)], "/out", save_on_each_node=True) is None
    assert resume_decision([_view(0), _view(1)], "/out", save_on_each_node=False) is None


class _PackedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(4, 4, dtype=torch.int32))
        self.register_buffer("cache", torch.zeros(2), persistent=False)
        self.lora_A = nn.Parameter(torch.ones(2, 4))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


def test_state_dict_holds_only_trainable_parameters_while_a_checkpoint_is_written():
    model = nn.Sequential(_PackedLinear(), _PackedLinear())
    model[1].frozen = model[0].frozen  # tied: named_parameters lists it once, state_dict twice
    before = set(model.state_dict())
    with only_trainable_in_state_dict(model):
        with only_trainable_in_state_dict(model):  # nested (save_model inside _save_checkpoint)
            assert set(model.state_dict()) == {"0.lora_A", "1.lora_A"}
        assert set(model.state_dict()) == {"0.lora_A", "1.lora_A"}
        assert "qweight" in model[0]._non_persistent_buffers_set  # for writers that walk the modules
    assert set(model.state_dict()) == before and "1.frozen" in before
    assert model[0]._non_persistent_buffers_set == {"cache"}


def test_a_run_that_writes_no_checkpoint_may_use_per_node_output_dirs(monkeypatch):
    from types import SimpleNamespace

    from eora_ft.train import checkpoints

    monkeypatch.setattr(checkpoints, "_gather_views", lambda state, output_dir: [_view(0), _view(1, sees_marker=False)])
    two_ranks = SimpleNamespace(num_processes=2)
    assert checkpoints.agree_on_resume(two_ranks, "/out", save_on_each_node=False, saves_checkpoints=False) is None
    with pytest.raises(RuntimeError, match="save_on_each_node: true"):
        checkpoints.agree_on_resume(two_ranks, "/out", save_on_each_node=False, saves_checkpoints=True)
