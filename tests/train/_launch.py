"""Start the ranks of a small training run (tests/train/_train_worker.py) as plain processes, read their reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.recipes._runs import ROOT, base_env, free_port

WORKER = Path(__file__).with_name("_train_worker.py")
# what `accelerate launch` sets from accelerate_configs/fsdp2.yaml (tests/train/test_fsdp2.py checks it still does)
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
             "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_OFFLOAD_PARAMS": "false",
             "FSDP_ACTIVATION_CHECKPOINTING": "false"}


def launch_ranks(tmp_path: Path, name: str, output_dir: str, world_size: int = 1, max_steps: int = 4,
                 save_on_each_node: bool = False, one_node_per_rank: bool = False, deepspeed_stage: int | None = None,
                 fsdp2: bool = False, timeout: int = 600) -> list[dict]:
    """Run ``world_size`` ranks of the worker; each rank's report (``error`` set if it stopped with one).

    ``fsdp2``: the environment ``accelerate launch --config_file accelerate_configs/fsdp2.yaml`` sets.
    ``one_node_per_rank``: every rank is local rank 0 of its own "node" (what per-node output dirs look like).
    A rank still running after ``timeout`` seconds fails the test: the ranks hung.
    """
    spec = tmp_path / f"{name}.json"
    report = str(tmp_path / f"{name}.rank{{rank}}.report.json")
    spec.write_text(json.dumps({"output_dir": output_dir, "max_steps": max_steps, "report": report,
                                "save_on_each_node": save_on_each_node}))
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = base_env(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, LOCAL_RANK="0" if one_node_per_rank else str(rank),
                       LOCAL_WORLD_SIZE="1" if one_node_per_rank else str(world_size))
        if world_size == 1 and deepspeed_stage is None and not fsdp2:  # a plain single process, as `python recipe.py`
            for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                env.pop(variable)
        if deepspeed_stage is not None:
            env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(deepspeed_stage),
                       ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true")
        if fsdp2:
            env.update(FSDP2_ENV)
        log = open(tmp_path / f"{name}.rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(spec)], cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    hung = []
    for rank, (proc, log) in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung.append(rank)
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
    logs = "\n".join((tmp_path / f"{name}.rank{rank}.log").read_text()[-3000:] for rank in range(world_size))
    assert not hung, f"ranks {hung} still running after {timeout} s (hung in a collective?)\n{logs}"
    reports = []
    for rank in range(world_size):
        path = Path(report.format(rank=rank))
        assert path.exists(), f"rank {rank} wrote no report\n{logs}"
        reports.append(json.loads(path.read_text()))
    return reports


def losses(report: dict) -> dict[int, float]:
    """The logged training losses of one rank's report, by step."""
    assert "error" not in report, report["error"]
    return {int(step): loss for step, loss in report["losses"].items()}
