"""Shared test setup: offline hub access, a 2-thread torch, and the bundled nano model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One artifact cache for the whole session (subprocess runs inherit it): identical compression
# settings across tests are computed once, and nothing lands in the user's ~/.cache.
import tempfile  # noqa: E402

os.environ.setdefault("EORA_FT_CACHE", tempfile.mkdtemp(prefix="eora_ft_test_cache_"))
# Triton has no CPU backend: without a GPU its kernels run in the interpreter, which must be chosen
# before triton is first imported (PLATFORM.md). GPU machines keep the compiled path.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

_ASSETS = Path(__file__).resolve().parents[1] / "eora_ft" / "assets"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return _ASSETS


@pytest.fixture(scope="session")
def nano_model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _ASSETS / "models" / "nano-llama-5m"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
