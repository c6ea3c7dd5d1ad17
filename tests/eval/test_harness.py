"""lm-evaluation-harness on the in-memory model (eora_ft.eval.harness): the same numbers as our own path.

lm-eval runs offline on a local copy of its ``arc_challenge`` definition (the arrangement of
test_lm_eval_agreement.py), on the bundled nano model and on a compressed model under a PEFT adapter.
The task directory is made once per test process (:func:`local_task_dir`, shared with tests/cli/test_eval.py)
so that lm-eval indexes its registry (about 15 s) once.
"""

import atexit
import copy
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from eora_ft.eval.harness import check_lm_eval_tasks, flatten_results, harness_evaluate, harness_table_metrics
from eora_ft.eval.tasks import get_task

ASSETS = Path(__file__).resolve().parents[2] / "eora_ft" / "assets"
LIMIT = 40
GROUP_YAML = "group: local_arc_group\ntask:\n  - local_arc_challenge\naggregate_metric_list:\n  - metric: acc\n"
_DIR_VARIABLE = "EORA_FT_TEST_LM_EVAL_TASKS"  # the process's one task directory, whichever module imported this


def local_task_dir() -> str:
    """A directory with lm-eval's ``arc_challenge`` YAML as ``local_arc_challenge`` (every item of the bundled
    ARC-Challenge dev file), a group ``local_arc_group`` over it and ``local_arc_missing``, whose data file is
    absent (as a hub dataset is on a machine without the hub); one per process, removed at exit."""
    if os.environ.get(_DIR_VARIABLE) and Path(os.environ[_DIR_VARIABLE]).is_dir():
        return os.environ[_DIR_VARIABLE]
    from tests.eval.test_lm_eval_agreement import ARC_YAML, _hf_arc_schema

    directory = Path(tempfile.mkdtemp(prefix="eora_ft_lm_eval_tasks_"))
    atexit.register(shutil.rmtree, directory, True)
    _hf_arc_schema(ASSETS / "data" / get_task("arc_challenge").bundled_eval, directory / "arc.jsonl", None)
    (directory / "arc.yaml").write_text(ARC_YAML.format(path=directory / "arc.jsonl"))
    (directory / "group.yaml").write_text(GROUP_YAML)
    (directory / "missing.yaml").write_text(ARC_YAML.format(path=directory / "absent.jsonl")
                                            .replace("task: local_arc_challenge", "task: local_arc_missing"))
    os.environ[_DIR_VARIABLE] = str(directory)
    return str(directory)


def _ours(model, tokenizer, limit: int = LIMIT) -> dict:
    task = get_task("arc_challenge")
    items = task.load(str(ASSETS / "data" / task.bundled_eval), limit=limit)
    return task.evaluate(model, tokenizer, items, progress=False)


def _assert_equal(harness: dict, ours: dict, limit: int = LIMIT) -> None:
    assert harness["lm_eval/local_arc_challenge/n"] == ours["arc_challenge/n"] == limit
    assert harness["lm_eval/local_arc_challenge/acc"] == pytest.approx(ours["arc_challenge/acc"], abs=1e-12)
    assert harness["lm_eval/local_arc_challenge/acc_norm"] == pytest.approx(ours["arc_challenge/acc_norm"], abs=1e-12)


@pytest.fixture(scope="module")
def task_dir():
    pytest.importorskip("lm_eval")
    return local_task_dir()


def test_harness_gives_our_numbers_on_the_nano_model(task_dir, nano_model_and_tokenizer):
    model, tokenizer = nano_model_and_tokenizer
    names = check_lm_eval_tasks("local_arc_challenge", task_dir)
    found = harness_evaluate(model, tokenizer, names, num_fewshot=0, limit=LIMIT, batch_size=16, include_path=task_dir,
                             progress=False)
    _assert_equal(found, _ours(model, tokenizer))
    assert found["lm_eval/local_arc_challenge/acc_stderr"] > 0  # kept for results.json, not a column
    assert harness_table_metrics(found) == [("lm_eval/local_arc_challenge/acc", "local_arc_challenge acc", "pct"),
                                            ("lm_eval/local_arc_challenge/acc_norm", "local_arc_challenge acc_norm", "pct")]
    json.dumps(found)  # results.json takes it as it is


def test_harness_runs_a_compressed_model_under_a_peft_adapter_in_memory(task_dir, nano_model_and_tokenizer):
    from eora_ft.adapters import build_lora_model, lora_config
    from eora_ft.compress import CompressedLinear, make_compressor
    from eora_ft.init.sequential import compress_model

    model, tokenizer = copy.deepcopy(nano_model_and_tokenizer[0]), nano_model_and_tokenizer[1]
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    result = compress_model(model, ids, make_compressor("rtn", bits=3, group_size=128), ["svd"], rank=4,
                            target_modules=["q_proj", "v_proj", "down_proj"], batch_size=2, progress=False)
    peft_model = build_lora_model(model, {p: f["svd"] for p, f in result.factors.items()},
                                  lora_config(4, 4, 0.0, ["q_proj", "v_proj", "down_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, CompressedLinear)
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))  # this very object computes: no copy, no reload
    peft_model.train()  # left as found: a stage evaluated before training keeps training's mode and random draws
    torch.manual_seed(7), random.seed(7)
    found = harness_evaluate(peft_model, tokenizer, ["local_arc_challenge"], num_fewshot=0, limit=24, batch_size=24,
                             include_path=task_dir, progress=False)
    after = torch.rand(3), random.random()
    torch.manual_seed(7), random.seed(7)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()
    assert calls and peft_model.training and layer.training
    peft_model.eval()
    _assert_equal(found, _ours(peft_model, tokenizer, limit=24), limit=24)


def test_unknown_task_is_refused_with_the_closest_names(task_dir):
    with pytest.raises(ValueError, match=r"unknown \['local_arc_challange'\].*closest local_arc_challenge"):
        check_lm_eval_tasks("local_arc_challenge, local_arc_challange", task_dir)
    with pytest.raises(ValueError, match="is not a directory"):
        check_lm_eval_tasks("local_arc_challenge", task_dir + "/missing")
    # what only building the tasks tells (before any model is loaded or compressed): data lm-eval cannot read
    with pytest.raises(ValueError, match=r"lm-eval cannot build \['local_arc_missing'\]"):
        check_lm_eval_tasks("local_arc_missing", task_dir)
    assert check_lm_eval_tasks("local_arc_missing", task_dir, load=False) == ["local_arc_missing"]
    assert check_lm_eval_tasks(" local_arc_group,, local_arc_group ", task_dir) == ["local_arc_group"]


def test_missing_lm_eval_is_refused_naming_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    assert check_lm_eval_tasks(None, None) == [] and check_lm_eval_tasks(" , ", None) == []  # nothing asked: no lm-eval
    with pytest.raises(ImportError, match=r'not installed: pip install -e "\.\[eval\]"'):
        check_lm_eval_tasks("mmlu", None)


def test_groups_filters_and_stderrs_flatten_as_documented():
    # the shape of simple_evaluate's output for mmlu (nested groups), gsm8k (two filters) and a scoreless group
    raw = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01},
            "mmlu_stem": {"alias": " - stem", "acc,none": 0.25, "acc_stderr,none": 0.02},
            "mmlu_anatomy": {"alias": "  - anatomy", "acc,none": 0.2, "acc_stderr,none": "N/A", "sample_len": 10},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.03,
                      "exact_match,flexible-extract": 0.2},
            "wikitext": {"word_perplexity,none": 30.5, "bits_per_byte,none": 0.9},
            "bag": {"alias": "bag"},
            "boolq": {"acc,none": 0.6, "mcc,none": 0.1},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy"], "bag": ["boolq"]},
        "n-samples": {"mmlu_anatomy": {"original": 135, "effective": 10}, "gsm8k": {"effective": 5},
                      "wikitext": {"effective": 2}, "boolq": {"effective": 7}},
    }
    flat = flatten_results(raw, ["gsm8k", "mmlu", "wikitext", "bag"])
    assert flat == {
        "lm_eval/gsm8k/exact_match_strict-match": 0.1, "lm_eval/gsm8k/exact_match_strict-match_stderr": 0.03,
        "lm_eval/gsm8k/exact_match_flexible-extract": 0.2, "lm_eval/gsm8k/n": 5,
        "lm_eval/mmlu/acc": 0.3, "lm_eval/mmlu/acc_stderr": 0.01, "lm_eval/mmlu/n": 10,
        "lm_eval/mmlu/mmlu_stem/acc": 0.25, "lm_eval/mmlu/mmlu_stem/acc_stderr": 0.02, "lm_eval/mmlu/mmlu_stem/n": 10,
        "lm_eval/mmlu/mmlu_anatomy/acc": 0.2, "lm_eval/mmlu/mmlu_anatomy/n": 10,
        "lm_eval/wikitext/word_perplexity": 30.5, "lm_eval/wikitext/bits_per_byte": 0.9, "lm_eval/wikitext/n": 2,
        "lm_eval/boolq/acc": 0.6, "lm_eval/boolq/mcc": 0.1, "lm_eval/boolq/n": 7,  # "bag" has no score: its members show
    }
    assert harness_table_metrics(flat) == [
        ("lm_eval/gsm8k/exact_match_strict-match", "gsm8k exact_match_strict-match", "pct"),
        ("lm_eval/gsm8k/exact_match_flexible-extract", "gsm8k exact_match_flexible-extract", "pct"),
        ("lm_eval/mmlu/acc", "mmlu acc", "pct"),
        ("lm_eval/wikitext/word_perplexity", "wikitext word_perplexity", "ppl"),
        ("lm_eval/wikitext/bits_per_byte", "wikitext bits_per_byte", "ppl"),
        ("lm_eval/boolq/acc", "boolq acc", "pct"), ("lm_eval/boolq/mcc", "boolq mcc", "num"),
    ]
    assert harness_table_metrics({"arc_challenge/acc": 0.2}) == []
