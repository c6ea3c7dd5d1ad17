"""Helpers to run a recipe in a subprocess the way users do, and read what it wrote."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
DEMO = "recipes/configs/arc_nano_gptq2_eora.yaml"
# A few steps of the demo at a size CI affords: compression on 8x128 calibration tokens (cached
# across tests), 2 optimizer steps, a handful of evaluation items.
SMALL = [
    "--max_steps", "2", "--logging_steps", "1", "--calib_num_samples", "8", "--calib_seq_len", "128",
    "--eval_limit", "24", "--ppl_max_windows", "2", "--train_limit", "64", "--learning_rate", "1e-3",
    "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--report_to", "none",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the recipes run no Triton kernel on CPU
    env.update(extra)
    return env


def run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def launch(config_file: str, out: Path, *flags: str, num_processes: int | None = None,
           recipe: str = "recipes/arc.py", config: str = DEMO, **env) -> dict:
    """``accelerate launch --config_file ... recipe --config ... --output_dir out ...``; returns results.json, with
    what every rank logged under ``_log``."""
    cmd = [str(ACCELERATE), "launch", "--config_file", config_file, "--main_process_port", str(free_port())]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += [recipe, "--config", config, "--output_dir", str(out), *SMALL, *flags]
    # 2 cores: ranks x threads must not exceed them (PLATFORM.md: 2 ranks x 2 threads is 30x slower), and
    # accelerate keeps an OMP_NUM_THREADS it inherits (CI exports 2)
    env.setdefault("OMP_NUM_THREADS", "2" if num_processes == 1 else "1")
    proc = run(cmd, base_env(**env))
    return json.loads((out / "results.json").read_text()) | {"_log": proc.stdout + proc.stderr}


def losses(results: dict) -> list[float]:
    return [entry["loss"] for entry in results["train_loss"]]
