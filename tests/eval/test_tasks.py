"""The task registry: every task loads its bundled data, trains on exactly what its evaluation scores."""

import pytest

from eora_ft.config import DEFAULT_MODEL
from eora_ft.eval.tasks import TASKS, get_task

BUNDLED = {
    "arc_challenge": ("arc/ARC-Challenge/ARC-Challenge-Train.jsonl", "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"),
    "arc_easy": ("arc/ARC-Easy/ARC-Easy-Train.jsonl", "arc/ARC-Easy/ARC-Easy-Dev.jsonl"),
    "mathqa": ("mathqa/dev_head1000.json", "mathqa/test_head500.json"),
    "gsm8k": ("gsm8k/train_head1000.jsonl", "gsm8k/test_head500.jsonl"),
}
QUESTION_TASKS = sorted(BUNDLED)
BUNDLED["text"] = ("enwiki_train/wiki_00.txt", "enwiki_heldout/wiki_49.txt")


def test_every_task_has_bundled_data(assets_dir):
    assert set(TASKS) == set(BUNDLED) | {"sft"}
    assert (assets_dir / "data" / TASKS["sft"].bundled_train).is_file()  # sft holds its evaluation share out
    for name, (train, evaluation) in BUNDLED.items():
        assert (TASKS[name].bundled_train, TASKS[name].bundled_eval) == (train, evaluation)
        assert (assets_dir / "data" / train).is_file() and (assets_dir / "data" / evaluation).is_file()


def test_text_task_trains_on_every_token_and_scores_nothing_of_its_own(assets_dir):
    task = get_task("text")
    documents = task.load(str(assets_dir / "data" / BUNDLED["text"][0]), limit=3)
    assert task.sft_dataset(documents)["text"] == documents  # no prompt: TRL's loss covers every token
    assert task.metrics == () and task.evaluate(None, None, documents) == {}


def test_sft_holds_out_a_tenth_of_its_bundled_conversations_and_scores_their_completion_loss(assets_dir):
    task = get_task("sft")
    train, held, origin = task.load_items(str(assets_dir / "data" / task.bundled_train))
    assert (len(train), len(held)) == (900, 100) and "held out (seed 0" in origin
    as_text = lambda rows: {str(row["messages"]) for row in rows}  # noqa: E731
    assert not as_text(train) & as_text(held)
    assert task.metrics == (("sft/eval_loss", "eval loss (completions)", "loss"),)


@pytest.mark.parametrize("name", QUESTION_TASKS)
def test_sft_completion_is_what_evaluation_scores(name, assets_dir):
    task = get_task(name)
    train = task.load(str(assets_dir / "data" / BUNDLED[name][0]), limit=50)
    evaluation = task.load(str(assets_dir / "data" / BUNDLED[name][1]), limit=5)
    assert len(train) == 50 and len(evaluation) == 5
    data = task.sft_dataset(train)
    for item, row in zip(train, data):
        assert row["prompt"] == f"Question: {item.question}\nAnswer:"
        gold = item.choices[item.gold] if hasattr(item, "choices") else item.answer
        assert row["completion"] == " " + gold
    assert all(key.startswith(f"{name}/") for key, _, _ in task.metrics)


def test_arc_easy_has_numeric_labels_and_varying_choice_counts(assets_dir):
    items = get_task("arc_easy").load(str(assets_dir / "data" / BUNDLED["arc_easy"][0]))
    assert {len(i.choices) for i in items} >= {3, 4, 5}


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"task='squad' is unknown; valid: \['arc_challenge', 'arc_easy'"):
        get_task("squad")


@pytest.mark.slow
def test_multiple_choice_tasks_score_on_the_nano_model(nano_model_and_tokenizer, assets_dir):
    model, tokenizer = nano_model_and_tokenizer
    task = get_task("mathqa")
    items = task.load(str(assets_dir / "data" / BUNDLED["mathqa"][1]), limit=8)
    metrics = task.evaluate(model, tokenizer, items, progress=False)
    assert metrics["mathqa/n"] == 8 and 0 <= metrics["mathqa/acc"] <= 1 and 0 <= metrics["mathqa/acc_norm"] <= 1
    assert DEFAULT_MODEL.endswith("nano-llama-5m")


@pytest.mark.parametrize("name", QUESTION_TASKS)
def test_every_question_task_reports_the_loss_on_its_held_out_completions(name, nano_model_and_tokenizer, assets_dir):
    """``<task>/eval_loss``: the model's own cross-entropy on the gold completions (prompt masked, EOS included, as
    TRL trains them), token-weighted over the items."""
    import torch

    model, tokenizer = nano_model_and_tokenizer
    task = get_task(name)
    items = task.load(str(assets_dir / "data" / BUNDLED[name][1]), limit=3)
    metrics = task.evaluate(model, tokenizer, items, task.load(str(assets_dir / "data" / BUNDLED[name][0]), limit=5),
                            progress=False, max_new_tokens=4, num_fewshot=1)
    total = count = 0
    with torch.no_grad():
        for row in task.sft_dataset(items):
            prompt = tokenizer(row["prompt"])["input_ids"]
            ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
            labels = torch.tensor([[-100] * len(prompt) + ids[len(prompt):]])
            n = len(ids) - len(prompt)
            total += float(model(input_ids=torch.tensor([ids]), labels=labels).loss) * n
            count += n
    assert (f"{name}/eval_loss", f"{task.metrics[0][1].split()[0]} eval loss", "loss") in task.metrics
    assert metrics[f"{name}/eval_loss"] == pytest.approx(total / count, rel=1e-5)
