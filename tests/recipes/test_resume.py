"""Rerunning the same command after a crash continues from the last complete checkpoint, same result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from eora_ft.train.trainer import last_complete_checkpoint
from tests.recipes._runs import DEMO, ROOT, SMALL, base_env, losses, run

pytestmark = pytest.mark.slow
STEPS = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "8",
         "--eval_limit", "8", "--ppl_max_windows", "1"]


def _cmd(out):
    return [sys.executable, "recipes/arc.py", "--config", DEMO, "--output_dir", str(out), *SMALL, *STEPS]


def test_last_complete_checkpoint_skips_a_half_written_one(tmp_path):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    for step, complete in [(2, True), (10, True), (12, False)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric, not lexical order


def test_killed_run_resumes_at_its_checkpoint(tmp_path):
    env = base_env(OMP_NUM_THREADS="2")
    reference = tmp_path / "reference"
    run(_cmd(reference), env)
    expected = json.loads((reference / "results.json").read_text())

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "results.json").exists() and not (out / "checkpoint-8").exists()
    resumed_from = int(last_complete_checkpoint(str(out)).rsplit("-", 1)[1])
    assert 2 <= resumed_from < 8

    proc = run(_cmd(out), env)
    assert f"resuming from {out / f'checkpoint-{resumed_from}'}" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["train steps"] == 8
    assert [e["step"] for e in results["train_loss"]] == list(range(1, 9))
    assert losses(results) == pytest.approx(losses(expected), rel=1e-5)
    got, ref = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, reference))
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-5
