"""dtype auto: the checkpoint's own on an accelerator, fp32 on a CPU; explicit settings win; bad names refused."""

import json

import pytest
import torch

from eora_ft.config import EoraModelConfig
from eora_ft.utils.dtypes import checkpoint_dtype, model_dtype

NANO = "eora_ft/assets/models/nano-llama-5m"


def _checkpoint(tmp_path, dtype):
    config = json.loads((__import__("pathlib").Path(NANO) / "config.json").read_text())
    config.pop("torch_dtype", None), config.pop("dtype", None)
    if dtype is not None:
        config["dtype"] = dtype
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_auto_is_the_checkpoints_dtype_on_a_gpu_and_fp32_on_a_cpu(tmp_path):
    bf16 = _checkpoint(tmp_path, "bfloat16")
    assert EoraModelConfig().dtype == "auto"  # not TRL's float32: 282 GB of host memory at 70B
    assert model_dtype("auto", bf16, torch.device("cuda", 1)) == torch.bfloat16
    assert model_dtype(None, bf16, "cuda") == torch.bfloat16
    assert model_dtype("auto", bf16, "cpu") == torch.float32  # bf16 matmuls are slow on CPUs without AMX
    assert model_dtype("float16", bf16, "cpu") == torch.float16
    assert model_dtype("float32", bf16, "cuda:0") == torch.float32
    assert checkpoint_dtype(NANO) == torch.bfloat16  # as trained; on this CPU it runs in fp32: recorded values stay
    assert model_dtype("auto", NANO, "cpu") == torch.float32


def test_a_checkpoint_without_a_dtype_loads_in_fp32_and_unknown_names_are_refused(tmp_path):
    assert model_dtype("auto", _checkpoint(tmp_path, None), "cuda:0") == torch.float32
    with pytest.raises(ValueError, match=r"dtype='half' is unknown; valid: \['auto', 'float32'"):
        model_dtype("half", tmp_path, "cpu")
