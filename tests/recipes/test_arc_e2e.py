"""A two-step end-to-end run of recipes/arc.py on the bundled nano model, through `accelerate launch`.

Its training losses are compared with values recorded on this CPU build (torch 2.13.0+cpu): a change
in data formatting, masking, initialisation or the adapter math moves them well beyond the tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
SMALL = [
    "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8",
    "--calib_num_samples", "8", "--calib_seq_len", "128", "--eval_limit", "24", "--ppl_max_windows", "2",
    "--train_limit", "64", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
]
# recorded with the command in test_two_step_run (seed 0); see the module docstring
RECORDED_LOSSES = [5.390113353729248, 5.646924018859863]
TOLERANCE = 2e-3  # relative; fp32 on one CPU build is deterministic to ~1e-6, summation order may differ across CPUs


@pytest.mark.slow
def test_two_step_run(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [str(ACCELERATE), "launch", "--config_file", "accelerate_configs/cpu.yaml", "recipes/arc.py",
           "--config", "recipes/configs/arc_nano_gptq2_eora.yaml", "--output_dir", str(out), *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["base", "compressed", "compensated", "finetuned"]
    for stage in stages.values():
        assert 0 <= stage["arc_challenge/acc"] <= 1 and 0 <= stage["arc_challenge/acc_norm"] <= 1
        assert stage["arc_challenge/n"] == 24 and stage["wikitext2/ppl"] > 1
    assert stages["compressed"]["wikitext2/ppl"] != stages["base"]["wikitext2/ppl"]
    # every one of the 28 compressed linears: the EoRA correction lowers its activation-weighted error
    assert len(results["layers"]) == 28
    assert all(row["rel_out_err/eora"] < row["rel_out_err/compressed"] for row in results["layers"])
    assert results["summary"]["calibration tokens"] == 8 * 128 and results["summary"]["train steps"] == 2

    for adapter in ("adapter", "eora_init"):
        assert (out / adapter / "adapter_config.json").exists() and (out / adapter / "adapter_model.safetensors").exists()
    assert "| finetuned |" in (out / "results.md").read_text()

    losses = [entry["loss"] for entry in results["train_loss"]]
    print("losses", losses)
    assert len(losses) == 2
    if RECORDED_LOSSES is not None:
        assert losses == pytest.approx(RECORDED_LOSSES, rel=TOLERANCE)
