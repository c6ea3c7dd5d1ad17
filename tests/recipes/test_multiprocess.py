"""Several ranks on a CPU really run (gloo), and give the losses of one process at the same global batch.

Tolerance: relative 1e-5. fp32 gradients all-reduced over 2 ranks are summed in a different order
than one process sums them; measured differences are ~1e-7 on the loss after 2 steps.
"""

import json

import pytest
import torch

from eora_ft.train.distributed import meta_models_supported
from tests.recipes._runs import launch, losses

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return launch("accelerate_configs/cpu.yaml", out, "--per_device_train_batch_size", "8", num_processes=1)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return launch("accelerate_configs/cpu.yaml", out, "--per_device_train_batch_size", "4") | {"_out": out}


def test_two_cpu_ranks_equal_one_process(one_process, two_ranks):
    assert two_ranks["summary"]["world size"] == 2 and two_ranks["summary"]["training backend"] == "multi_cpu x2"
    assert one_process["summary"]["world size"] == 1
    assert losses(two_ranks) == pytest.approx(losses(one_process), rel=TOLERANCE)
    # the main process alone evaluated: the same before-training numbers
    for stage in ("base", "compressed", "compensated"):
        assert two_ranks["stages"][stage] == one_process["stages"][stage]


def test_deepspeed_zero2_two_ranks_equal_ddp(two_ranks, tmp_path):
    ds = launch("accelerate_configs/deepspeed_zero2.yaml", tmp_path / "run", "--per_device_train_batch_size", "4",
                num_processes=2)
    assert ds["summary"]["world size"] == 2 and ds["summary"]["training backend"] == "deepspeed zero-2 x2"
    assert losses(ds) == pytest.approx(losses(two_ranks), rel=TOLERANCE)


def test_fsdp2_two_ranks_equal_ddp_and_save_the_same_adapter(two_ranks, tmp_path):
    """FSDP2 shards the packed base and the adapters (tests/train/test_checkpoint_contents.py measures the
    shards); the math is DDP's. After training the main process evaluates and saves an unsharded copy with the
    gathered adapters: the fine-tuned metrics and the adapter file are DDP's."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    fsdp = launch("accelerate_configs/fsdp2.yaml", out, "--per_device_train_batch_size", "4", num_processes=2)
    assert fsdp["summary"]["world size"] == 2 and fsdp["summary"]["training backend"] == "fsdp2 x2"
    # fsdp2.yaml's CPU-RAM-efficient loading: rank 1 read no weights, the main process's were broadcast (an
    # Accelerate that would bind its optimizer to the wrong meta parameters: rank 1 reads its own copy)
    assert fsdp["_log"].count("this rank builds the model on the meta device") == int(meta_models_supported())
    assert losses(fsdp) == pytest.approx(losses(two_ranks), rel=TOLERANCE)
    assert fsdp["stages"]["finetuned"] == pytest.approx(two_ranks["stages"]["finetuned"], rel=TOLERANCE)
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(two_ranks["_out"] / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], rtol=TOLERANCE, atol=1e-7), name


def test_a_comparison_with_its_uncompressed_ceiling_runs_under_fsdp2(tmp_path):
    """Several trainings in one process under FSDP2, the dense ceiling among them: rank 1 builds each model on the
    meta device (the ceiling too: its tied head must stay tied there), the main process's weights are broadcast."""
    comparison = launch("accelerate_configs/fsdp2.yaml", tmp_path / "cmp", "--inits", "qlora", "--seeds", "0",
                        "--ceiling", "true", "--per_device_train_batch_size", "4", "--cache_dir", str(tmp_path / "cache"),
                        num_processes=2, recipe="recipes/compare.py", config="recipes/configs/compare_arc_nano_gptq2.yaml")
    assert sorted(comparison["runs"]) == ["lora", "qlora"]
    assert all(run["summary"]["training backend"] == "fsdp2 x2" for run in comparison["runs"].values())
    assert comparison["_log"].count("this rank builds the model on the meta device") == 2 * meta_models_supported()
    assert comparison["runs"]["lora"]["summary"]["decoder weights compressed"] == "0.0%"
    # the compare config returns each run's adapter at its lowest validation loss: under FSDP2 every rank loads
    # the same checkpoint back (a rank loading another one fails in the collective load)
    for run in comparison["runs"].values():
        assert run["best"]["eval_loss"] == min(point["loss"] for point in run["eval_loss"])


def test_main_only_work_outlasting_the_collective_timeout_does_not_kill_the_other_rank(tmp_path):
    """Rank 1 waits on a file while rank 0 loads, evaluates and compresses (fresh cache), with every
    collective bounded by ddp_timeout as NCCL's watchdog bounds it on GPUs; a rank waiting in a barrier
    instead would time out."""
    timeout = 8
    results = launch("accelerate_configs/cpu.yaml", tmp_path / "run", "--per_device_train_batch_size", "4",
                     "--ddp_timeout", str(timeout), "--eval_limit", "96", "--ppl_max_windows", "8",
                     "--merge", "true", "--merge_residual_rank", "2",  # main-only after training: the merge
                     EORA_FT_CACHE=str(tmp_path / "fresh_cache"))
    main_only = sum(results["timings"][stage] for stage in
                    ("load", "eval_base", "compress_and_init", "eval_compressed", "eval_compensated"))
    assert main_only > timeout, f"main-only work took {main_only:.1f} s: too short to test anything"
    assert results["summary"]["world size"] == 2 and len(losses(results)) == 2
    assert results["summary"]["artifact cache"] == "base: built, init: built"
    merged = tmp_path / "run" / "merged"
    report = json.loads((merged / "merge_report.json").read_text())
    # the run's own compressed and fine-tuned rows are the report's reference, not measured again
    assert report["stages"]["compressed"] == results["stages"]["compressed"]
    assert report["stages"]["base + adapter"] == results["stages"]["finetuned"]
    assert {"merged (recompress)", "merged (recompress) + residual r2"} <= set(report["stages"])
    assert (merged / "model" / "compression_config.json").exists()  # the run's base format (2-bit asymmetric)
    named = json.loads((merged / "residual_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str((merged / "model").resolve())


def test_a_comparison_survives_main_only_evaluation_after_training_outlasting_the_collective_timeout(tmp_path):
    """After training, rank 0 evaluates the fine-tuned model and writes alone while rank 1 would go on to the
    next run's collectives; it waits on a file instead, so a final evaluation longer than ddp_timeout (as on
    an 8B model, against NCCL's 30 minutes) does not kill the comparison."""
    timeout = 4
    comparison = launch("accelerate_configs/cpu.yaml", tmp_path / "cmp", "--inits", "qlora", "--seeds", "0", "1",
                        "--ceiling", "false", "--per_device_train_batch_size", "4", "--ddp_timeout", str(timeout),
                        "--eval_limit", "200", "--ppl_max_windows", "10", "--eval_base", "false",
                        "--cache_dir", str(tmp_path / "cache"),
                        recipe="recipes/compare.py", config="recipes/configs/compare_arc_nano_gptq2.yaml")
    first = comparison["runs"]["qlora_seed0"]
    assert first["timings"]["eval_finetuned"] > timeout, \
        f"the final evaluation took {first['timings']['eval_finetuned']:.1f} s: too short to test anything"
    assert sorted(comparison["runs"]) == ["qlora_seed0", "qlora_seed1"]
    assert all(run["summary"]["world size"] == 2 for run in comparison["runs"].values())


def test_a_run_that_training_only_worsens_returns_its_initial_adapter_under_deepspeed(tmp_path):
    """load_best_model_at_end on a validation split: at a diverging rate no step beats the start, so both ranks load
    checkpoint-0 back (DeepSpeed's own loader) and the saved adapter is the initial one, bit for bit."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    results = launch("accelerate_configs/deepspeed_zero2.yaml", out, "--per_device_train_batch_size", "4",
                     "--learning_rate", "0.05", "--validation_fraction", "0.25", "--eval_strategy", "steps",
                     "--eval_steps", "1", "--eval_on_start", "true", "--save_strategy", "steps", "--save_steps", "1",
                     "--load_best_model_at_end", "true", num_processes=2)
    assert results["summary"]["training backend"] == "deepspeed zero-2 x2"
    curve = [point["loss"] for point in results["eval_loss"]]
    assert results["best"] == {"step": 0, "eval_loss": curve[0]} and min(curve[1:]) > curve[0]
    assert results["stages"]["finetuned"] == results["stages"]["compensated"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    initial = load_file(str(out / "eora_init" / "adapter_model.safetensors"))
    assert saved.keys() == initial.keys() and all(saved[k].equal(initial[k]) for k in saved)
