"""benchmarks/peer_compare.py without llm-compressor: its checks, its config mapping and a toy run of our side."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("peer_compare", ROOT / "benchmarks" / "peer_compare.py")
peer_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_compare)


def _grid_weight(bits: int, rows: int = 4, k: int = 256, group: int = 128) -> torch.Tensor:
    """[rows, k] weights taking exactly 2**bits levels (own scale and offset) in every row and group."""
    codes = torch.arange(k).remainder(2**bits).repeat(rows, 1).float()
    scales = torch.rand(rows, k // group).repeat_interleave(group, dim=1) + 0.1
    return (codes - 2 ** (bits - 1)) * scales + torch.randn(rows, k // group).repeat_interleave(group, dim=1)


def test_check_compressed_passes_a_grid_and_a_2_4_pattern():
    peer_compare.check_compressed(_grid_weight(4), bits=4, group_size=128)
    peer_compare.check_compressed(_grid_weight(3, k=128), bits=3, group_size=-1)
    sparse = torch.randn(4, 256) * torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(64)
    peer_compare.check_compressed(sparse, n=2, m=4)


def test_check_compressed_raises_off_grid_or_too_dense():
    with pytest.raises(ValueError, match="not 3-bit"):
        peer_compare.check_compressed(_grid_weight(4), bits=3, group_size=128)
    with pytest.raises(ValueError, match="not 2-bit"):
        peer_compare.check_compressed(torch.randn(4, 256), bits=2, group_size=128)
    three_of_four = torch.randn(4, 256) * torch.tensor([1.0, 1.0, 0.0, 1.0]).repeat(64)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        peer_compare.check_compressed(three_of_four, n=2, m=4)


def test_checked_copy_rejects_a_tool_that_changed_a_non_target():
    base = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(128, 4, bias=False), "lm_head": torch.nn.Linear(4, 8)})
    weights = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    weights["q_proj.weight"] = _grid_weight(2, k=128)
    model = peer_compare.checked_copy(base, weights, ["q_proj"], {"bits": 2, "group_size": 128}, "toy")
    assert torch.equal(model.q_proj.weight, weights["q_proj.weight"]) and model is not base
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1
    with pytest.raises(RuntimeError, match="lm_head.weight: changed"):
        peer_compare.checked_copy(base, weights, ["q_proj"], {"bits": 2, "group_size": 128}, "toy")


def test_peer_config_copies_our_defaults():
    assert peer_compare.peer_config("gptq/3/128") == {
        "method": "gptq", "bits": 3, "group_size": 128, "sym": False, "grid_search": False, "damp": 0.01,
        "block_size": 128, "act_order": True}  # act-order is our GPTQ default (and llm-compressor's: "static")
    assert peer_compare.peer_config("sparsegpt/2:4") == {
        "method": "sparsegpt", "n": 2, "m": 4, "ratio": 0.5, "damp": 0.01, "block_size": 128}
    with pytest.raises(ValueError, match="llm-compressor counterpart"):
        peer_compare.peer_config("rtn/4/128")


def test_ours_only_run_prints_the_table_and_writes_the_rows(tmp_path):
    # RTN: the same worker, save, check, load and scoring path as GPTQ, without GPTQ's CPU column sweep
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, "benchmarks/peer_compare.py", "--tools", "ours", "--settings", "rtn/4/128",
         "--calib-samples", "4", "--calib-seq-len", "64", "--ppl-windows", "2", "--repeats", "2", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["setting"], row["tool"]) for row in rows] == [("uncompressed", "-"), ("rtn/4/128", "ours")]
    compressed = rows[1]
    for field in ("seconds", "peak_rss_gib", "loaded_rss_gib", "ppl_enwiki", "ppl_wikitext2"):
        assert math.isfinite(compressed[field]) and compressed[field] > 0, field
    assert compressed["peak_rss_gib"] >= compressed["loaded_rss_gib"]
    assert compressed["ppl_enwiki"] >= 0.9 * rows[0]["ppl_enwiki"]  # 4-bit RTN cannot help much
    assert "| setting | tool | seconds | peak_rss_gib |" in proc.stdout and "| rtn/4/128 | ours |" in proc.stdout
    assert len(compressed["seconds_each"]) == 2 and compressed["seconds"] == pytest.approx(
        sum(compressed["seconds_each"]) / 2)  # the median of two
