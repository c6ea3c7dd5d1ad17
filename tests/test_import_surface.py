"""What users import, imported the way they do: a fresh interpreter started at the repo root (``python -c``,
a notebook, pytest's rootdir put the checkout on ``sys.path``).

A release of transformers, PEFT, TRL, accelerate or compressed-tensors that breaks one of these imports
fails here, in one test named after the import, instead of as a dozen collection errors elsewhere (as
transformers 5.25 did on 2026-12-06, when our ``kernels/`` folder shadowed Hugging Face's ``kernels``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (what a user writes, a statement that exercises it beyond the import)
SURFACE = {
    "transformers models": "import torch, transformers\n"
                           "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
                           " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
                           "model = transformers.AutoModelForCausalLM.from_config(cfg)\n"
                           "assert model(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 64)",
    "transformers Trainer": "from transformers import Trainer, TrainingArguments",
    "peft": "from peft import LoraConfig, PeftModel, get_peft_model\nfrom peft.tuners.lora import Linear",
    "trl": "from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser",
    "accelerate": "from accelerate import Accelerator, PartialState",
    "datasets": "import datasets",
    "compressed-tensors": "import compressed_tensors\nfrom compressed_tensors.quantization import QuantizationArgs",
    "deepspeed": "import deepspeed",
    "safetensors": "from safetensors.torch import load_file, save_file",
}


def _eora_ft_modules() -> list[str]:
    """Every module of the package as installed (``eora_ft/kernels`` links to ``kernels/``, a namespace package
    that pkgutil would skip), ``__main__`` modules left out."""
    package = ROOT / "eora_ft"
    names = set()
    for directory, _, files in os.walk(package, followlinks=True):
        if "assets" in Path(directory).relative_to(package).parts or "__pycache__" in directory:
            continue
        for file in files:
            if file.endswith(".py") and file != "__main__.py":
                parts = ("eora_ft",) + (Path(directory) / file).relative_to(package).with_suffix("").parts
                names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _failures(snippets: dict[str, str], prelude: str = "") -> dict[str, str]:
    """Run each snippet in one fresh interpreter at the repo root, after ``prelude``; ``{name: traceback}`` of
    those that raised."""
    code = (f"{prelude}\nimport json, traceback\nfailed = {{}}\n"
            f"for name, snippet in {snippets!r}.items():\n"
            "    try:\n        exec(snippet, {})\n"
            "    except Exception:\n        failed[name] = traceback.format_exc(limit=4)\n"
            "print(json.dumps(failed))")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def surface_failures() -> dict[str, str]:
    return _failures(SURFACE)


@pytest.mark.parametrize("name", SURFACE)
def test_users_can_import_from_the_repo_root(name, surface_failures):
    assert name not in surface_failures, f"{name} no longer imports from the repo root:\n{surface_failures[name]}"


def test_every_eora_ft_module_imports_from_the_repo_root():
    modules = _eora_ft_modules()
    assert "eora_ft.kernels.packing" in modules and "eora_ft.run.pipeline" in modules
    failed = _failures({name: f"import {name}" for name in modules})
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())


def test_eora_ft_runs_without_the_optional_bitsandbytes():
    """bitsandbytes is the nf4 extra: every module imports without it (PEFT's own import of it is optional too),
    and only compress_method nf4 asks for it."""
    snippets = {name: f"import {name}" for name in _eora_ft_modules()}
    snippets["nf4 refused"] = ("from eora_ft.config import CompressionArguments\n"
                               "CompressionArguments(compress_method='gptq')\n"
                               "try:\n    CompressionArguments(compress_method='nf4')\n"
                               "except ValueError as err:\n    assert 'pip install' in str(err), err\n"
                               "else:\n    raise AssertionError('nf4 accepted without bitsandbytes')")
    failed = _failures(snippets, prelude="import sys\nsys.modules['bitsandbytes'] = None  # its import now raises")
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())


def _triton_modules() -> set[str]:
    """The modules that import Triton at their top: Triton kernels, which only a CUDA tensor reaches."""
    found = {f"eora_ft.kernels.{path.stem}" for path in (ROOT / "kernels").glob("*.py")
             if "\nimport triton" in path.read_text() or "\nfrom triton" in path.read_text()}
    assert found, "no Triton kernel found in kernels/"
    return found


def test_eora_ft_runs_on_a_cpu_without_triton():
    """Triton is not a dependency (a CUDA build of torch brings its own): every module but the Triton kernels
    imports without it, and a compressed model computes, and its adapters train, on the CPU."""
    snippets = {name: f"import {name}" for name in _eora_ft_modules() if name not in _triton_modules()}
    snippets["forward and backward"] = (
        "import torch\nfrom eora_ft.compress import make_compressor\n"
        "from eora_ft.adapters.peft_bridge import build_lora_model, lora_config\n"
        "from eora_ft.init.sequential import compress_model\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        "model = LlamaForCausalLM(cfg)\nids = torch.randint(0, 64, (2, 16))\n"
        "compress_model(model, ids, make_compressor('rtn', bits=4, group_size=32), [], progress=False)\n"
        "peft = build_lora_model(model, None, lora_config(4, 8, 0.0, None))\n"
        "peft(input_ids=ids, labels=ids).loss.backward()\n"
        "assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)")
    failed = _failures(snippets, prelude="import sys\nsys.modules['triton'] = None  # its import now raises")
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())
