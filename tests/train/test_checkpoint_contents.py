"""A checkpoint holds the adapters, optimizer, scheduler and RNG/trainer state, never the packed base,
and a run resumed from it logs the losses of the run that was not interrupted.

DeepSpeed runs as rank 0 of 1 over gloo (what ``accelerate launch --use_deepspeed`` sets up,
../shared/PLATFORM.md); FSDP2 as two ranks over gloo. Without the fix, DeepSpeed's model-states file held every packed buffer
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


def _dcp_tensors(directory: Path) -> dict[str, int]:
    """``{key: bytes}`` of what a torch.distributed.checkpoint directory holds, from its metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return {key: item.size.numel() * item.properties.dtype.itemsize
            for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}


def test_fsdp2_shards_the_packed_base_and_checkpoints_only_the_adapter_shards(tmp_path):
    """Two FSDP2 ranks (gloo): each holds half of the packed base after sharding; a checkpoint's model part
    (torch.distributed.checkpoint, one file per rank) is the adapters exactly, its optimizer part their Adam
    state; the run resumed from it logs the uninterrupted losses, and both ranks gather the same adapters."""
    out = tmp_path / "out"
    first = launch_ranks(tmp_path, "first", str(out), world_size=2, fsdp2=True)
    assert [r["training_backend"] for r in first] == ["fsdp2 x2"] * 2
    packed = first[0]["packed_bytes"]
    held = [r["packed_bytes_here"] for r in first]
    assert sum(held) == packed and max(held) <= packed / 2 + 4096, (held, packed)  # rows split, padding not held
    assert first[0]["trained"] == first[1]["trained"] and first[0]["trained"]
    checkpoint = out / "checkpoint-2"
    model = _dcp_tensors(checkpoint / "pytorch_model_fsdp_0")
    assert model and all("lora_" in key for key in model), sorted(model)[:5]
    assert sum(model.values()) == first[0]["trainable_bytes"]
    optimizer = _dcp_tensors(checkpoint / "optimizer_0")
    assert all("lora_" in key for key in optimizer)
    assert sum(optimizer.values()) <= 2 * first[0]["trainable_bytes"] + 4096  # exp_avg, exp_avg_sq (+ steps)
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    assert total < packed, f"checkpoint {total} bytes, packed base {packed}"

    shutil.rmtree(out / "checkpoint-4")
    resumed = launch_ranks(tmp_path, "resumed", str(out), world_size=2, fsdp2=True)
    for before, after in zip(first, resumed):
        assert after["resumed_from"] == str(checkpoint)
        assert losses(after) == pytest.approx(losses(before), rel=1e-5)
        for name, values in before["trained"].items():  # the adapters it ends with, not only its logged losses
            assert torch.allclose(torch.tensor(after["trained"][name]), torch.tensor(values), rtol=1e-5, atol=1e-7)
