"""Process-group helpers: the CPU state is real, ZeRO-3 model building is switched off and restored."""

import torch
from accelerate import PartialState

from eora_ft.train.distributed import all_cores_while_others_wait, configure_cpu_process_state, full_model_init


def test_cpu_state_is_the_one_the_trainer_config_uses(tmp_path):
    # (2 real ranks: tests/recipes/test_multiprocess.py asserts the world size a launch got)
    from eora_ft.config import parse_recipe_args

    state = configure_cpu_process_state()
    assert state is not None and state.device.type == "cpu"
    assert configure_cpu_process_state().process_index == state.process_index  # idempotent
    *_, training, _ = parse_recipe_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert training.world_size == PartialState().num_processes == 1 and training.process_index == 0


def test_full_model_init_hides_a_zero3_config_and_restores_it():
    from transformers.integrations import deepspeed as hf_deepspeed

    class FakeConfig:
        def is_zero3(self):
            return True

    config = FakeConfig()
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with full_model_init():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_all_cores_is_a_no_op_for_one_process():
    before = torch.get_num_threads()
    with all_cores_while_others_wait(PartialState()):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
