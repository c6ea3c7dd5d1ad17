"""DeepSpeed ZeRO-2 and ZeRO-3 through the real recipe code, in one plain process on a CPU (gloo).

The environment is what ``accelerate launch --use_deepspeed`` would set for rank 0 of 1
(../shared/PLATFORM.md: the smallest real DeepSpeed run). The losses must equal the recorded
single-process values of tests/recipes/test_arc_e2e.py: ZeRO changes where state lives, not the math.
"""

import json
import sys

import pytest

from tests.recipes._runs import DEMO, SMALL, base_env, free_port, losses, run
from tests.recipes.test_arc_e2e import RECORDED_LOSSES, matches_a_recorded_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [2, 3])
def test_single_process_zero(stage, tmp_path):
    env = base_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage),
                   ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1",
                   LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="2")
    out = tmp_path / "run"
    run([sys.executable, "recipes/arc.py", "--config", DEMO, "--output_dir", str(out), *SMALL,
         "--per_device_train_batch_size", "8"], env)
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["training backend"] == f"deepspeed zero-{stage} x1"
    assert matches_a_recorded_run(losses(results)), f"losses {losses(results)} match no recorded run {RECORDED_LOSSES}"
    assert results["summary"]["trainable parameters"] == 311296  # counted from ZeRO-3 shards too
    assert (out / "adapter" / "adapter_model.safetensors").exists()
