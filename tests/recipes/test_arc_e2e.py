"""A two-step end-to-end run of recipes/arc.py on the bundled nano model, through `accelerate launch`.

Its training losses are compared with values recorded on this CPU build (torch 2.13.0+cpu): a change
in data formatting, masking, initialisation or the adapter math moves them well beyond the tolerance.
"""

import json
from pathlib import Path

import pytest

from tests.recipes._runs import launch, losses

# recorded with the command in test_two_step_run (seed 0), one list per CPU kind the project runs on; see the module
# docstring. Re-recorded 2026-12-01 when the compressor and the adapter got separate calibrations, and 2026-12-02
# when true_sequential became off by default (a different compressed base; Intel was [5.43404, 5.55494] before).
RECORDED_LOSSES = {
    "Intel Xeon, AVX-512 (2026-12-02)": [5.455551624298096, 5.6107001304626465],
    "AMD EPYC, AVX2 (2026-12-02, the same commit and the commit before #18)": [5.486660003662109, 5.63101053237915],
}
# Relative, around the list of either CPU kind. On one CPU the run is deterministic to ~1e-6, but fp32
# summation order differs between CPU kinds, and GPTQ's 2-bit rounding turns a 1e-7 difference in a calibration
# activation into a whole quantization step wherever a weight sits near a rounding boundary: the two kinds differ
# by 5.7e-3 and 3.6e-3 here (1.5e-3 and 2.2e-3 before 2026-12-02). A tolerance around one list wide enough for
# both would miss the changes that moved these values on 2026-11-22 (6e-3 to 9e-3); around each list it still
# catches them, and leaves room for CPUs of either kind we have not measured. Same-machine comparisons
# (tests/recipes/test_resume.py, test_faults.py, test_multiprocess.py) hold runs to 1e-5.
TOLERANCE = 5e-3


def matches_a_recorded_run(observed: list[float]) -> bool:
    """True when ``observed`` equals one CPU kind's recorded losses within ``TOLERANCE`` (relative)."""
    return any(observed == pytest.approx(recorded, rel=TOLERANCE) for recorded in RECORDED_LOSSES.values())


@pytest.mark.slow
def test_two_step_run(tmp_path):
    out = tmp_path / "run"
    results = launch("accelerate_configs/cpu.yaml", out, "--per_device_train_batch_size", "8", "--report_to",
                     "tensorboard", num_processes=1, OMP_NUM_THREADS="2")
    stages = results["stages"]
    assert list(stages) == ["base", "compressed", "compensated", "finetuned"]
    for stage in stages.values():
        assert 0 <= stage["arc_challenge/acc"] <= 1 and 0 <= stage["arc_challenge/acc_norm"] <= 1
        assert stage["arc_challenge/n"] == 24
        assert all(stage[f"{text}/ppl"] > 1 for text in ("enwiki_heldout", "c4_heldout", "wikitext2"))
    assert stages["compressed"]["enwiki_heldout/ppl"] > stages["base"]["enwiki_heldout/ppl"]
    # every one of the 28 compressed linears: the EoRA correction lowers its activation-weighted error
    assert len(results["layers"]) == 28
    assert all(row["rel_out_err/eora"] < row["rel_out_err/compressed"] for row in results["layers"])
    summary = results["summary"]
    assert summary["calibration tokens"] == 8 * 128 and summary["adapter calibration tokens"] == 8 * 128
    assert summary["train steps"] == 2 and results["divergence"] is None
    assert summary["decoder weights compressed"] == "100.0%"  # every decoder matrix is a target linear

    for adapter in ("adapter", "eora_init"):
        assert (out / adapter / "adapter_config.json").exists() and (out / adapter / "adapter_model.safetensors").exists()
        # the adapter names the compressed base it belongs to (exported next to it), not the uncompressed model
        named = json.loads((out / adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert named == str((out / "base").resolve())
    assert (out / "base" / "compression_config.json").exists()  # 2-bit asymmetric: eora_ft's own format
    # load_pretrained rebuilds the model the run meant: the cache entry's compressed base with the adapter on top
    import torch

    from eora_ft.adapters.peft_bridge import load_adapter, load_pretrained
    from eora_ft.compress.io import load_compressed
    from eora_ft.run.artifacts import base_directory

    ids = torch.randint(1, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = load_adapter(load_compressed(base_directory(Path(summary["init entry"]))), out / "adapter")
    with torch.no_grad():
        assert torch.equal(load_pretrained(out / "adapter")(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert summary["adapter base"] == f"{(out / 'base').resolve()} (eora_ft)"
    assert "| finetuned |" in (out / "results.md").read_text()

    assert list(out.glob("runs/*/events.out.tfevents.*")), "tensorboard logging is on by default"
    assert matches_a_recorded_run(losses(results)), f"losses {losses(results)} match no recorded run {RECORDED_LOSSES}"
