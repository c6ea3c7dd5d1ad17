"""The benchmark scripts still run (at toy sizes): what BENCHMARKS.md reports cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _scale_bench(shape: str, compress: str) -> list[dict]:
    """The JSON lines ``scale_bench.py`` prints for ``shape`` at a toy size."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/scale_bench.py", "--shape", shape, "--vocab", "512", "--tokens", "128",
         "--seq-len", "64", "--compress", compress],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                     "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_scale_bench_runs_every_stage_and_reports_its_memory_budget():
    rows = _scale_bench("tiny", "sparsegpt")
    stages = [row.get("stage") for row in rows]
    assert stages[:4] == ["build", "compress+eora", "peft_wrap", "train_step"]
    compress = rows[1]
    assert {"statistics", "compressor", "errors", "init:eora"} <= set(compress["per_layer_seconds"])
    summary = rows[-1]
    assert summary["budget_gb"]["total"] > 0 and summary["peak_host_gb"] >= summary["start_host_gb"]


def test_scale_bench_runs_a_mixture_of_experts_layer_and_counts_its_experts_tokens():
    summary = _scale_bench("tiny-moe", "rtn")[-1]
    tokens = summary["expert_tokens"]
    assert tokens["experts"] == 8 and 0 <= tokens["min"] <= tokens["median"] <= tokens["max"] <= 128
    assert summary["budget_gb"]["statistics"] > 0


def test_gpu_check_dry_run_runs_every_part_on_the_cpu(tmp_path):
    # exactly as its docstring says, "anywhere": no TRITON_INTERPRET in the environment (issue #34 item 16)
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and {"tests", "kernels", "crossover", "fixes", "model"} <= set(report)
    assert {row["kind"] for row in report["kernels"]} == {"packed", "dense", "nf4"}
    assert len(report["model"]) == 5 and "| shape | M | r |" in proc.stdout
    fixes = report["fixes"]  # issue #34 items 1, 2, 12, 14 at tiny sizes: every correctness check holds
    assert fixes["device_guard"]["ok"] and fixes["fallback"]["ok"] and fixes["fallback"]["warnings"] == 1
    assert all(row["ok"] for row in fixes["ranks"].values()) and set(fixes["ranks"]) == {"16", "80", "200"}
    assert all(row["torch_bit_equal"] for row in fixes["two_four"])
    assert all(row["equal"] for row in fixes["dequant_autotune"].values())
    fsdp2 = report["fsdp2"]  # issue #38 item 4: 2 CPU ranks; each holds half the packed base, same losses
    assert fsdp2["returncode"] == 0 and fsdp2["world_size"] == 2, fsdp2
    assert fsdp2["packed_share_per_rank"] == [pytest.approx(0.5, abs=0.01)] * 2
    assert fsdp2["max_relative_loss_difference"] < 1e-5  # fp32 on both sides; only the reduction order differs


def test_rank_budget_reports_every_option_at_equal_adapter_bytes():
    proc = subprocess.run(
        [sys.executable, "benchmarks/rank_budget.py", "--settings", "rtn/2/128", "--ranks", "4", "--calib-samples", "4",
         "--windows", "1", "--refine-steps", "2", "--alt-ranks", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                     "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    adapters = {(row["init"], row["allocation"]): row for row in rows if row["params"]}
    assert {("eora", "uniform"), ("eora", "budget/relative"), ("svd", "budget/absolute"), ("eora_alt", "uniform"),
            ("eora+refine/final", "uniform"), ("eora+refine/final", "budget/relative")} <= set(adapters)
    uniform = adapters[("eora", "uniform")]
    for row in adapters.values():
        # the same budget: parameters never above uniform r, and the file PEFT writes is that size
        assert row["params"] <= uniform["params"] and row["seconds"] >= 0
        assert abs(row["bytes"] - 4 * row["params"]) < 0.05 * row["bytes"]  # fp32 factors plus the header
    budget = adapters[("eora", "budget/relative")]
    assert budget["sum_rel_err2"] <= uniform["sum_rel_err2"]  # what the greedy allocation minimises
    assert "| adapter bytes | init s |" in proc.stdout


def test_ppl_memory_per_window_loss_needs_less_and_gives_the_same_perplexity():
    proc = subprocess.run([sys.executable, "benchmarks/ppl_memory.py", "--batch", "8", "--window", "128", "--vocab",
                           "32768"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[0]: (float(cells[1]), float(cells[2])) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| whole") or line.startswith("| per window"))}
    whole, per_window = rows["whole batch"], rows["per window (eora_ft)"]
    assert whole[1] == per_window[1]  # the same fp32 terms summed in fp64, printed to 6 decimals
    # fp32 logits and log-softmax of 8 windows against those of one (measured 3.1x at this size)
    assert whole[0] > 2 * per_window[0]


@pytest.mark.slow
def test_merge_bench_trains_then_scores_every_merge(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/merge_bench.py", "--recipes", "text", "--settings", "gptq/4", "--fast",
         "--residual_rank", "4", "--calib_num_samples", "2", "--calib_seq_len", "64", "--output", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "EORA_FT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert list(row["stages"]) == ["compressed", "base + adapter", "round", "regrid", "recompress",
                                   "recompress + residual r2", "recompress + residual r4"]
    assert all(metrics["enwiki_heldout/ppl"] > 1 for metrics in row["stages"].values())
    assert row["train steps"] == 2 and "| text | gptq 4-bit g128" in proc.stdout
