"""The packed base as FSDP2 sees it: frozen parameters under the same names, the same function, the same
checkpoints; the shipped FSDP2 config; FSDP1 refused. Multi-rank runs: tests/train/test_checkpoint_contents.py,
tests/recipes/test_multiprocess.py, tests/recipes/test_faults.py, benchmarks/fsdp2_check.py (tests/test_benchmarks.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
from eora_ft.compress import CompressedLinear, SparseWeight
from eora_ft.train.adapter_trainer import only_trainable_in_state_dict
from eora_ft.train.distributed import fsdp2_requested
from eora_ft.train.sharding import PACKED_TENSORS, packed_as_parameters, packed_bytes_here
from tests.compress.test_io import LINEARS, _ids, _logits, _tiny_model, _two_four
from tests.train._launch import FSDP2_ENV

ROOT = Path(__file__).resolve().parents[2]


def _adapted_model():
    """The tiny RTN 4-bit Llama with one pruned-only layer and one act-order layer, under rank-2 adapters."""
    model = _tiny_model(bits=4)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g)
    attention = model.model.layers[0].self_attn
    attention.o_proj = SparseWeight(w * _two_four(64, 64), _two_four(64, 64)).to_module(None, torch.float32)
    codes = torch.randint(0, 16, (64, 64), generator=g)
    g_idx = torch.randperm(64, generator=g) % 2  # act-order: every group gets 32 inputs, out of order
    attention.q_proj = CompressedLinear.from_codes(codes, torch.rand(2, 64, generator=g) / 8, torch.full((2, 64), 8),
                                                   bits=4, group_size=32, g_idx=g_idx)
    torch.manual_seed(0)
    return build_lora_model(model, None, lora_config(2, 2, 0.0, LINEARS))


def test_packed_tensors_become_frozen_parameters_under_the_same_names():
    model = _adapted_model()
    with torch.no_grad():  # a trained adapter: B nonzero, so the adapter's term is in the logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    ids = _ids(seed=2)
    before_logits, before_state = _logits(model, ids), model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    packed = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, CompressedLinear)
                 for n, b in m.named_buffers() if n in PACKED_TENSORS)

    assert packed_as_parameters(model) == packed == packed_bytes_here(model)
    assert packed_as_parameters(model) == 0  # idempotent
    state = model.state_dict()
    assert list(state) == list(before_state) and all(torch.equal(state[k], before_state[k]) for k in state)
    assert torch.equal(_logits(model, ids), before_logits)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    for layer in layers:
        assert not any(name in dict(layer.named_buffers()) for name in PACKED_TENSORS)
        assert all(not p.requires_grad for p in layer.parameters())
    pruned = model.base_model.model.model.layers[0].self_attn.o_proj.base_layer
    assert pruned._two_four_frozen is True  # decided before sharding: gathered masks get new storage each time
    act_order = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert dict(act_order.named_buffers())["perm"] is act_order.perm  # small, every rank needs it whole
    with only_trainable_in_state_dict(model):  # checkpoints: the adapters only, whatever holds the codes
        assert set(model.state_dict()) == trainable


def test_fsdp1_is_refused_naming_fsdp2(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp2_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp2_requested()
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP_VERSION=1.*fsdp_version: 2.*accelerate_configs/fsdp2.yaml"):
        fsdp2_requested()


def test_the_fsdp2_config_is_what_the_multi_rank_tests_launch():
    """accelerate launch turns each ``fsdp_config`` key into its upper-case environment variable; the worker tests
    set those variables themselves, so they must be the config's."""
    config = yaml.safe_load((ROOT / "accelerate_configs" / "fsdp2.yaml").read_text())
    assert config["distributed_type"] == "FSDP"
    from_config = {key.upper(): str(value).lower() if isinstance(value, bool) else str(value)
                   for key, value in config["fsdp_config"].items()}
    expected = {k: v for k, v in FSDP2_ENV.items() if k != "ACCELERATE_USE_FSDP"}
    assert from_config == expected


MIXED_PRECISION_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r}, RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tests.train.test_sharding import _adapted_model
from tests.compress.test_io import _ids
from eora_ft.train.sharding import packed_as_parameters
model = _adapted_model()
reference = _adapted_model().to(torch.bfloat16)  # every float tensor in bf16, the integer codes untouched
ids = _ids(seed=2)
packed_as_parameters(model)
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mp_policy=policy)
fully_shard(model, mp_policy=policy)
with torch.no_grad():
    got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
print("RELATIVE", float((got - want).norm() / want.norm()))
"""


def test_fsdp2_bf16_mixed_precision_casts_the_scales_and_leaves_the_integer_codes(tmp_path):
    """What Accelerate's bf16 FSDP2 does to the packed layers: FSDP2 casts floating parameters to ``param_dtype``
    for compute and must leave integer ones alone (a cast int32 code word would lose its low bits). One rank."""
    from tests.recipes._runs import base_env, free_port

    script = tmp_path / "mixed_precision.py"
    script.write_text(MIXED_PRECISION_SCRIPT.format(root=str(ROOT), port=str(free_port())))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=base_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    relative = float(proc.stdout.split("RELATIVE")[-1])
    assert relative < 2e-2, relative  # bf16 rounding of activations and weights (8 bits): ~1e-2 at most


def test_a_node_without_host_memory_for_every_ranks_copy_is_warned(caplog):
    import psutil

    from eora_ft.train.sharding import warn_host_memory

    available = psutil.virtual_memory().available
    with caplog.at_level("WARNING", logger="eora_ft.train.sharding"):
        assert not warn_host_memory(1 << 20, 8)
        assert warn_host_memory(available // 2, 8)
    assert len(caplog.records) == 1 and "8 processes" in caplog.messages[0] and "GB available" in caplog.messages[0]


def test_sync_each_batch_and_fp32_reduction_under_fsdp2(tmp_path):
    """Gradient accumulation adds into the fp32 shards (not bf16 unsharded copies), and the ranks average
    gradients in fp32 where Accelerate would use the compute dtype."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from eora_ft.config import EoraSFTConfig
    from eora_ft.train.sharding import fsdp2_training_args, reduce_in_fp32

    args = EoraSFTConfig(output_dir=str(tmp_path), report_to="none")
    sharded = fsdp2_training_args(args)
    assert sharded.accelerator_config.gradient_accumulation_kwargs["sync_each_batch"] is True
    assert not (args.accelerator_config.gradient_accumulation_kwargs or {}).get("sync_each_batch")  # a copy
    plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                         reduce_dtype=torch.bfloat16))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    reduce_in_fp32(trainer)
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32
    plugin.mixed_precision_policy = MixedPrecisionPolicy()  # fp32 training: nothing to change
    reduce_in_fp32(trainer)
    assert plugin.mixed_precision_policy.reduce_dtype is None


def test_meta_models_only_where_accelerate_maps_their_optimizer_by_identity(monkeypatch):
    """Accelerate < 1.16 keys the FSDP2 optimizer swap on data_ptr, 0 for every meta parameter: a rank that built
    its model on the meta device would train the wrong shards, silently (measured with accelerate 1.10: the
    second loss 0.6% off DDP's). Such ranks read their own copy instead."""
    import accelerate

    from eora_ft.train.distributed import meta_models_supported

    monkeypatch.setattr(accelerate, "__version__", "1.15.0")
    assert not meta_models_supported()
    monkeypatch.setattr(accelerate, "__version__", "1.16.0")
    assert meta_models_supported()
