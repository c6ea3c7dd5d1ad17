"""Our multiple-choice scores equal lm-evaluation-harness's, run offline on the same local items.

lm-eval (a test dependency) evaluates the bundled nano model through its own ``HFLM`` on task YAMLs
that copy its ``arc_challenge`` and ``mathqa`` definitions, pointed at local JSON files (the hub is
unreachable here). Equality is exact: same prompts, same tokenization, same length normalisation.
"""

import json

import pytest

from eora_ft.eval.tasks import get_task

lm_eval = pytest.importorskip("lm_eval")

METRICS_YAML = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ARC_YAML = """task: local_arc_challenge
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
""" + METRICS_YAML
MATHQA_YAML = """task: local_mathqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{Problem}}}}\\nAnswer:"
doc_to_target: "{{{{['a', 'b', 'c', 'd', 'e'].index(correct)}}}}"
doc_to_choice: !function utils.doc_to_choice
""" + METRICS_YAML
# lm-eval 0.4.13 lm_eval/tasks/mathqa/utils.py
MATHQA_UTILS = '''import re


def doc_to_choice(doc):
    return [c[4:].rstrip(" ,") for c in re.findall(r"[abcd] \\) .*?, |e \\) .*?$", doc["options"])]
'''


def _hf_arc_schema(raw_path, out_path, limit):
    # lm-eval's arc tasks read the HF allenai/ai2_arc schema; the bundled files are AI2's raw one
    with open(raw_path) as src, open(out_path, "w") as dst:
        for line in list(src)[:limit]:
            r = json.loads(line)
            dst.write(json.dumps({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                                  "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                              "label": [c["label"] for c in r["question"]["choices"]]}}) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("task_name,limit", [("arc_challenge", 299), ("mathqa", 100)])
def test_acc_and_acc_norm_equal_lm_eval(task_name, limit, tmp_path, assets_dir, nano_model_and_tokenizer):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = nano_model_and_tokenizer
    task = get_task(task_name)
    source = assets_dir / "data" / task.bundled_eval
    if task_name == "arc_challenge":
        data = tmp_path / "arc.jsonl"
        _hf_arc_schema(source, data, limit)
        (tmp_path / "arc.yaml").write_text(ARC_YAML.format(path=data))
    else:
        data = tmp_path / "mathqa.json"
        data.write_text(json.dumps(json.loads(source.read_text())[:limit]))
        (tmp_path / "mathqa.yaml").write_text(MATHQA_YAML.format(path=data))
        (tmp_path / "utils.py").write_text(MATHQA_UTILS)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32)
    reference = simple_evaluate(model=lm, tasks=[f"local_{task_name}"], num_fewshot=0,
                                task_manager=TaskManager(include_path=str(tmp_path)))["results"][f"local_{task_name}"]

    items = task.load(str(source), limit=limit)
    ours = task.evaluate(model, tokenizer, items, progress=False)
    assert ours[f"{task_name}/n"] == limit
    assert ours[f"{task_name}/acc"] == pytest.approx(reference["acc,none"], abs=1e-12)
    assert ours[f"{task_name}/acc_norm"] == pytest.approx(reference["acc_norm,none"], abs=1e-12)
