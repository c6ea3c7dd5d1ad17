"""recipes/sft.py (your own data) end to end at a tiny size: conversations through the default chat template, the
held-out completion loss at every stage, the template saved with the adapter; bad data refused before the model
loads."""

import json
import math

import pytest

from tests.recipes._runs import launch

SFT = "recipes/configs/sft_nano_gptq2_eora.yaml"


@pytest.mark.slow
def test_sft_recipe_trains_on_conversations_and_reports_the_held_out_completion_loss(tmp_path):
    from tests.eval.test_harness import local_task_dir

    out = tmp_path / "sft"
    results = launch("accelerate_configs/cpu.yaml", out, "--per_device_train_batch_size", "4", "--max_steps", "4",
                     "--eval_strategy", "no", "--cache_dir", str(tmp_path / "cache"), "--lm_eval_tasks",
                     "local_arc_challenge", "--lm_eval_include_path", local_task_dir(), "--lm_eval_limit", "8",
                     num_processes=1, recipe="recipes/sft.py", config=SFT)
    # lm-evaluation-harness ran on every stage's in-memory model; its columns follow the task's own
    assert [m[0] for m in results["metrics"]][:3] == ["sft/eval_loss", "lm_eval/local_arc_challenge/acc",
                                                      "lm_eval/local_arc_challenge/acc_norm"]
    assert all(metrics["lm_eval/local_arc_challenge/n"] == 8 for metrics in results["stages"].values())
    stages = results["stages"]
    assert list(stages) == ["base", "compressed", "compensated", "finetuned"]
    losses = {stage: metrics["sft/eval_loss"] for stage, metrics in stages.items()}
    assert all(math.isfinite(v) for v in losses.values())
    # compression costs loss on the held-out answers, the correction wins part of it back, training on the
    # same kind of conversation lowers it further (lr 1e-3, 4 steps)
    assert losses["base"] < losses["compressed"] and losses["compensated"] < losses["compressed"]
    assert losses["finetuned"] < losses["compensated"]
    summary = results["summary"]
    assert summary["eval items"] == 24 and "0.1 of eora_ft/assets/data/sft/gsm8k_chat.jsonl held out" in \
        summary["eval data"]
    adapter = out / "adapter"
    assert "User: " in (adapter / "chat_template.jinja").read_text()  # the default template travels with it
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "base")
    assert "| stage | eval loss (completions) | local_arc_challenge acc |" in (out / "results.md").read_text()


def test_data_in_no_trl_layout_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from eora_ft.config import parse_recipe_args
    from eora_ft.run import pipeline

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    monkeypatch.setattr(pipeline, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    args = parse_recipe_args(["--config", SFT, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
                              "--cache_dir", str(tmp_path / "cache")])
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\].*accepted layouts"):
        pipeline.run(*args[:4], args[4])
