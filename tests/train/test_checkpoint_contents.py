"""A checkpoint holds the adapters, optimizer, scheduler and RNG/trainer state, never the packed base,
and a run resumed from it logs the losses of the run that was not interrupted.

DeepSpeed runs as rank 0 of 1 over gloo (what ``accelerate launch --use_deepspeed`` sets up,
../shared/PLATFORM.md). Without the fix, DeepSpeed's model-states file held every packed buffer
(and, at ZeRO-3, every rank wrote one) plus the tied output head.
"""

import shutil
from pathlib import Path

import pytest
import torch

from tests.train._launch import launch_ranks, losses

pytestmark = pytest.mark.slow
# adapter file + Adam's two moments + DeepSpeed's fp32 master copy + its module copy: five copies of the
# adapters at most, plus headers and small state (RNG, scheduler, trainer state)
ADAPTER_COPIES, SLACK = 5, 128 * 1024
TOKENIZER_AND_SCRIPTS = {"tokenizer.json", "tokenizer_config.json", "README.md", "zero_to_fp32.py", "zero_to_torch.py"}


def _model_files(checkpoint: Path) -> list[Path]:
    return [p for p in checkpoint.rglob("*") if p.is_file() and p.name not in TOKENIZER_AND_SCRIPTS]


@pytest.mark.parametrize("deepspeed_stage", [None, 2, 3], ids=["one process", "zero-2", "zero-3"])
def test_a_checkpoint_is_the_adapters_state_only_and_resumes_to_the_same_losses(tmp_path, deepspeed_stage):
    out = tmp_path / "out"
    first = launch_ranks(tmp_path, "first", str(out), deepspeed_stage=deepspeed_stage)[0]
    checkpoint = out / "checkpoint-2"
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    assert total < first["packed_bytes"], f"checkpoint {total} bytes, packed base {first['packed_bytes']}"
    state = sum(p.stat().st_size for p in _model_files(checkpoint))
    assert state < ADAPTER_COPIES * first["trainable_bytes"] + SLACK, \
        f"{state} bytes of state for {first['trainable_bytes']} bytes of adapters"
    for states in checkpoint.rglob("*model_states.pt"):  # DeepSpeed's copy of the module
        saved = torch.load(states, map_location="cpu", weights_only=False)
        assert saved["module"] and all("lora_" in key for key in saved["module"]), sorted(saved["module"])[:5]
        assert not saved["buffer_names"]

    shutil.rmtree(out / "checkpoint-4")
    resumed = launch_ranks(tmp_path, "resumed", str(out), deepspeed_stage=deepspeed_stage)[0]
    assert resumed["resumed_from"] == str(checkpoint)
    assert losses(resumed) == pytest.approx(losses(first), rel=1e-5)
