"""Our `kernels/` folder must never shadow Hugging Face's `kernels` package, which transformers probes for."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, json, torch, transformers\n"
    "from transformers.utils import is_kernels_available\n"
    "import eora_ft.kernels.packing as p\n"
    "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
    " num_attention_heads=2, num_key_value_heads=1)\n"
    "out = transformers.LlamaForCausalLM(cfg)(input_ids=torch.tensor([[1, 2, 3]])).logits\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "print(json.dumps({'top_level': spec.origin if spec else None, 'hf_kernels': is_kernels_available(),"
    " 'ours': p.__name__, 'finite': bool(torch.isfinite(out).all())}))\n"
)


def _probe(cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_installed_package_adds_no_top_level_kernels(tmp_path):
    result = _probe(tmp_path)
    assert result["top_level"] is None  # installing eora_ft does not create `import kernels`
    assert result["ours"] == "eora_ft.kernels.packing"
    assert result["hf_kernels"] is False and result["finite"]


def test_transformers_still_runs_from_the_repo_root():
    # With the checkout's root as cwd, `python -c` puts it on sys.path and `kernels` does resolve to our
    # folder (it needs an __init__.py for the editable eora_ft.kernels mapping). What must hold: transformers
    # does not take it for Hugging Face's package, and models still run.
    result = _probe(ROOT)
    assert result["top_level"] == str(ROOT / "kernels" / "__init__.py")
    assert result["hf_kernels"] is False and result["finite"]
