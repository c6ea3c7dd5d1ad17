"""``eora-ft merge``: the written checkpoint is the merged model, in every format; the residual adapter names it;
a run directory is scored as its run was; bad input stops before anything loads or is written."""

import json
import shutil

import pytest
import torch

from eora_ft.cli import main

NANO = "eora_ft/assets/models/nano-llama-5m"
SMALL = ["--calib_num_samples", "2", "--calib_seq_len", "64"]
IDS = torch.randint(1, 8192, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A 4-bit asymmetric RTN base (no sweep: quick) and an EoRA adapter on it (a trained adapter's stand-in: B is not
    zero); the merge itself runs GPTQ onto that grid."""
    root = tmp_path_factory.mktemp("merge")
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "rtn", "--bits", "4", *SMALL,
                 "--output_dir", str(root / "base")]) == 0
    assert main(["init", "--compressed_model", str(root / "base"), "--init_method", "eora", "--lora_r", "4",
                 "--lora_alpha", "8", *SMALL, "--output_dir", str(root / "adapter")]) == 0
    return root / "adapter"


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "out"
    assert main(["merge", "--adapter", str(adapter), "--output_dir", str(out), "--merge_residual_rank", "2",
                 "--evaluate", "false", *SMALL]) == 0
    return out


def test_the_written_checkpoint_is_the_merge_computed_in_memory(adapter, merged):
    from transformers import AutoTokenizer

    from eora_ft.adapters.peft_bridge import load_pretrained
    from eora_ft.compress.formats import import_model
    from eora_ft.config import CompressionArguments
    from eora_ft.run.merge import merge_adapter
    from eora_ft.run.merge_run import merge_calibration

    peft_model = load_pretrained(adapter)
    calib = merge_calibration(AutoTokenizer.from_pretrained(str(merged / "model")),
                              CompressionArguments(calib_num_samples=2, calib_seq_len=64))
    unmerged = _logits(peft_model)
    in_memory = merge_adapter(peft_model, calib, residual_rank=2, recorded=peft_model.get_base_model().compression_config,
                              progress=False)
    written = import_model(merged / "model")
    assert torch.equal(_logits(written), _logits(in_memory.model))
    assert not torch.equal(_logits(written), unmerged)
    config = json.loads((merged / "residual_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((merged / "model").resolve()) and config["r"] == 2
    with_residual = _logits(load_pretrained(merged / "residual_adapter"))
    assert torch.isfinite(with_residual).all() and not torch.equal(with_residual, _logits(written))
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["summary"]["merged linears"] == 28 and report["summary"]["format"] == "eora_ft"


def test_a_gptq_export_of_the_merge_loads_with_the_same_logits(adapter, merged, tmp_path):
    from eora_ft.compress.formats import detect_format, import_model

    out = tmp_path / "gptq"
    assert main(["merge", "--adapter", str(adapter), "--output_dir", str(out), "--merge_format", "gptq",
                 "--evaluate", "false", *SMALL]) == 0
    assert detect_format(out / "model") == "gptq" and not (out / "residual_adapter").exists()
    ours = _logits(import_model(merged / "model"))
    # the GPTQ layout stores fp16 scales: each weight moves by at most fp16's relative rounding, 2**-11
    assert (_logits(import_model(out / "model")) - ours).abs().max() < 2**-11 * ours.abs().max()


def test_a_run_directory_is_scored_as_the_run_scored_it(adapter, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    task = {"task": "arc_challenge", "eval_limit": 4, "ppl_window": 64, "ppl_max_windows": 1,
            "ppl_dataset": "eora_ft/assets/data/enwiki_heldout/wiki_49.txt"}
    (run / "results.json").write_text(json.dumps({"config": {"TaskArguments": task,
                                                             "CompressionArguments": {"compress_method": "gptq"}}}))
    assert main(["merge", "--adapter", str(run), "--output_dir", str(tmp_path / "merged"), "--merge_method", "round",
                 *SMALL]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert list(report["stages"]) == ["compressed", "base + adapter", "merged (round)"]
    for metrics in report["stages"].values():
        assert metrics["arc_challenge/n"] == 4 and metrics["enwiki_heldout/ppl"] > 1
        assert metrics["arc_challenge/eval_loss"] > 0
    assert report["summary"]["calibration tokens"] == 0  # the naive merge reads no data
    assert "kept of the adapter's change" in (tmp_path / "merged" / "merge_report.md").read_text()


@pytest.mark.parametrize("flags, error", [
    (["--output_dir", "ADAPTER/merged"], "lies inside the adapter it merges"),
    (["--merge_format", "compressed-tensors"], r"merge_format='compressed-tensors' cannot hold this base"),
    (["--merge_residual_rank", "-2"], r"merge_residual_rank=-2 is out of range"),
])
def test_bad_input_stops_before_anything_is_written(adapter, tmp_path, flags, error):
    flags = [flag.replace("ADAPTER", str(adapter)) for flag in flags]
    output = [] if "--output_dir" in flags else ["--output_dir", str(tmp_path / "out")]
    with pytest.raises((ValueError, SystemExit), match=error):
        main(["merge", "--adapter", str(adapter), *output, *flags, "--evaluate", "false", *SMALL])
    assert not (tmp_path / "out").exists() and not (adapter / "merged").exists()


def test_an_adapter_that_is_not_there_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"neither a PEFT adapter directory .* nor a run directory"):
        main(["merge", "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "out")])


def test_a_merged_symmetric_base_loads_in_plain_transformers_and_peft(tmp_path):
    """compressed-tensors pack-quantized: transformers decompresses it (no eora_ft code in the path), and PEFT puts
    the residual adapter on top; logits equal ours bit for bit."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from eora_ft.adapters.peft_bridge import load_pretrained
    from eora_ft.compress.formats import detect_format, import_model

    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "rtn", "--bits", "4", "--sym", "true",
                 *SMALL, "--output_dir", str(tmp_path / "base")]) == 0
    assert main(["init", "--compressed_model", str(tmp_path / "base"), "--init_method", "svd", "--lora_r", "4",
                 *SMALL, "--output_dir", str(tmp_path / "adapter")]) == 0
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output_dir", str(out), "--merge_format",
                 "compressed-tensors", "--merge_residual_rank", "2", "--evaluate", "false", *SMALL]) == 0
    assert detect_format(out / "model") == "compressed-tensors"
    unpack = CompressedTensorsConfig(run_compressed=False)
    plain = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, quantization_config=unpack)
    assert torch.equal(_logits(plain), _logits(import_model(out / "model")))
    peft = AutoPeftModelForCausalLM.from_pretrained(out / "residual_adapter", dtype=torch.float32,
                                                    quantization_config=unpack)
    assert torch.equal(_logits(peft), _logits(load_pretrained(out / "residual_adapter")))
