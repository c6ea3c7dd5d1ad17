"""Our `kernels/` folder must never shadow Hugging Face's `kernels` package, which transformers (>= 5.25) imports.

`kernels/` has no ``__init__.py``: seen from the repo root it is at most a namespace portion, and a namespace
portion loses to a regular package anywhere on ``sys.path``. eora_ft reaches it as ``eora_ft.kernels``
through the link ``eora_ft/kernels -> ../kernels`` (editable installs) or as files copied under
``eora_ft/kernels/`` (wheels). Each probe runs in a fresh interpreter, as a user's ``python -c`` would.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.metadata, importlib.util, json, torch, transformers\n"
    "from transformers.utils import is_kernels_available\n"
    "import eora_ft.kernels.packing as p\n"
    "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
    " num_attention_heads=2, num_key_value_heads=1)\n"
    "out = transformers.AutoModelForCausalLM.from_config(cfg)(input_ids=torch.tensor([[1, 2, 3]])).logits\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "loaded = getattr(__import__('kernels'), '__file__', None) if spec else None\n"
    "print(json.dumps({'kernels_origin': spec and spec.origin, 'kernels_file': loaded,"
    " 'hf_kernels': is_kernels_available(), 'ours': p.__file__, 'finite': bool(torch.isfinite(out).all())}))\n"
)
HF_KERNELS = importlib.util.find_spec("kernels")


def _probe(cwd: Path, extra_path: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is_hf_kernels(origin: str | None) -> bool:
    # a namespace portion has no origin; ours would lie in the checkout's kernels/ (the venv may lie in the checkout)
    return origin is not None and not Path(origin).resolve().is_relative_to((ROOT / "kernels").resolve())


def test_the_kernels_folder_is_no_regular_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "eora_ft" / "kernels").resolve() == (ROOT / "kernels").resolve()


@pytest.mark.skipif(HF_KERNELS is None, reason="Hugging Face's kernels is not installed (the test extra installs it)")
def test_hf_kernels_wins_and_transformers_runs(tmp_path):
    results = {where: _probe(cwd) for where, cwd in (("repo root", ROOT), ("elsewhere", tmp_path))}
    for where, result in results.items():
        assert _is_hf_kernels(result["kernels_origin"]) and _is_hf_kernels(result["kernels_file"]), (where, result)
        assert result["finite"], where
        assert Path(result["ours"]).resolve() == (ROOT / "kernels" / "packing.py").resolve(), where
    # transformers' own verdict on HF's kernels (its version window) is the same wherever it starts
    assert results["repo root"]["hf_kernels"] == results["elsewhere"]["hf_kernels"]


def test_a_wheel_carries_the_kernels_under_eora_ft_only(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    for name in ("eora_ft", "kernels"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("eora_ft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "eora_ft/kernels/packing.py" in names and "eora_ft/kernels/csrc/dequant_cpu.cpp" in names
    assert not any(name.startswith("kernels/") for name in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    result = _probe(tmp_path, extra_path=tmp_path / "site")  # the unpacked wheel comes before the editable install
    assert Path(result["ours"]).resolve() == (tmp_path / "site" / "eora_ft" / "kernels" / "packing.py").resolve()
    assert result["finite"] and (HF_KERNELS is None or _is_hf_kernels(result["kernels_origin"]))
