"""Several ranks on a CPU really run (gloo), and give the losses of one process at the same global batch.

Tolerance: relative 1e-5. fp32 gradients all-reduced over 2 ranks are summed in a different order
than one process sums them; measured differences are ~1e-7 on the loss after 2 steps.
"""

import pytest

from tests.recipes._runs import launch, losses

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return launch("accelerate_configs/cpu.yaml", out, "--per_device_train_batch_size", "8", num_processes=1)


def test_two_cpu_ranks_equal_one_process(one_process, tmp_path):
    two = launch("accelerate_configs/cpu.yaml", tmp_path / "run", "--per_device_train_batch_size", "4")
    assert two["summary"]["world size"] == 2 and two["summary"]["training backend"] == "multi_cpu x2"
    assert one_process["summary"]["world size"] == 1
    assert losses(two) == pytest.approx(losses(one_process), rel=TOLERANCE)
    # the main process alone evaluated: the same before-training numbers, finetuned ones within noise
    for stage in ("base", "compressed", "compensated"):
        assert two["stages"][stage] == one_process["stages"][stage]


def test_deepspeed_zero2_two_ranks_equal_ddp(one_process, tmp_path):
    ds = launch("accelerate_configs/deepspeed_zero2.yaml", tmp_path / "run", "--per_device_train_batch_size", "4",
                num_processes=2, OMP_NUM_THREADS="1")
    assert ds["summary"]["world size"] == 2 and ds["summary"]["training backend"] == "deepspeed zero-2 x2"
    assert losses(ds) == pytest.approx(losses(one_process), rel=TOLERANCE)
