"""`eora-ft eval`: the same numbers as the library, for a plain model, a compressed one and an adapter."""

import json

import pytest

from eora_ft.cli import main

NANO = "eora_ft/assets/models/nano-llama-5m"


def test_eval_plain_model_matches_the_model_card_numbers(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "--model_name_or_path", NANO, "--tasks", "arc_challenge,wikitext2", "--ppl_max_windows", "40",
                 "--output_file", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    # the bundled model card's lm-eval numbers (also tests/eval/test_scoring.py)
    assert metrics["arc_challenge/acc"] == pytest.approx(0.2174, abs=5e-5)
    assert metrics["arc_challenge/acc_norm"] == pytest.approx(0.2776, abs=5e-5)
    assert metrics["wikitext2/ppl"] == pytest.approx(441.21, abs=0.01)
    assert "| ARC-C acc | 21.74 |" in capsys.readouterr().out


def test_eval_compressed_with_adapter_and_every_task(tmp_path):
    # a compressed base and an adapter from the CLI's own compress + init commands
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    small = ["--calib_num_samples", "2", "--calib_seq_len", "64"]
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "rtn", "--bits", "4", *small, "--output_dir", str(base)]) == 0
    assert main(["init", "--compressed_model", str(base), "--init_method", "svd", "--lora_r", "4", "--output_dir", str(adapter)]) == 0
    out = tmp_path / "r.json"
    assert main(["eval", "--compressed_model", str(base), "--model_name_or_path", NANO, "--adapter", str(adapter), "--tasks",
                 "arc_challenge,arc_easy,mathqa,gsm8k", "--eval_limit", "4", "--max_new_tokens", "16",
                 "--output_file", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["adapter"] == str(adapter)
    for key in ("arc_challenge/acc", "arc_easy/acc_norm", "mathqa/acc", "gsm8k/strict", "gsm8k/flexible"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    assert results["metrics"]["gsm8k/n"] == 4


@pytest.mark.parametrize("flags,match", [
    (["--tasks", "arc_challenge", "--data", "mathqa=x.json"], "names task 'mathqa', which is not in --tasks"),
    (["--tasks", "arc_challenge", "--data", "arc_challenge"], "expected TASK=PATH"),
])
def test_bad_eval_input_is_named(tmp_path, flags, match):
    with pytest.raises(SystemExit, match=match):
        main(["eval", "--model_name_or_path", NANO, *flags, "--output_file", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_a_compressed_model_without_a_tokenizer_uses_its_originals_and_a_wrong_one_is_refused(tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "rtn", "--bits", "4", "--calib_num_samples",
                 "2", "--calib_seq_len", "64", "--output_dir", str(base)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    out = tmp_path / "r.json"
    args = ["eval", "--compressed_model", str(base), "--tasks", "arc_challenge", "--eval_limit", "2", "--output_file", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["tokenizer"] == NANO  # recorded by eora-ft compress as the original model

    wrong = AutoTokenizer.from_pretrained(NANO)
    wrong.add_tokens([f"<extra_{i}>" for i in range(20_000)])  # a tokenizer of a larger vocabulary
    wrong.save_pretrained(base)
    out.unlink()
    with pytest.raises(SystemExit, match=r"has \d+ tokens but the model has vocab_size=\d+"):
        main(args)
    assert not out.exists()


def test_a_perplexity_text_without_a_suffix_is_text_and_a_bad_one_is_named_before_loading(tmp_path, monkeypatch):
    """`--data wikitext2=/data/heldout` reads the file as UTF-8 text (issue #32); a binary one is refused by name
    before any model is loaded."""
    import json

    text = tmp_path / "heldout"
    text.write_text("A held-out paragraph of plain text for the nano model.\n\nAnother one, a bit longer.\n")
    out = tmp_path / "r.json"
    assert main(["eval", "--model_name_or_path", NANO, "--tasks", "wikitext2", "--data", f"wikitext2={text}",
                 "--ppl_window", "16", "--output_file", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["wikitext2/ppl"] > 1
    binary = tmp_path / "heldout.bin"
    binary.write_bytes(b"\x00\x01\x02binary")
    monkeypatch.setattr("eora_ft.cli.eval._load", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(ValueError, match=r"--data wikitext2 .*heldout\.bin, line 1: holds NUL bytes"):
        main(["eval", "--model_name_or_path", NANO, "--tasks", "wikitext2", "--data", f"wikitext2={binary}",
              "--output_file", str(tmp_path / "r2.json")])


def test_an_lm_eval_task_runs_in_the_harness_beside_ours_into_one_results_file(tmp_path, capsys):
    """A --tasks name that is not ours is an lm-eval task: the harness runs it on the loaded model (here a local
    copy of its arc_challenge definition, tests/eval/test_harness.py) with the same numbers as our path."""
    pytest.importorskip("lm_eval")
    from tests.eval.test_harness import local_task_dir

    out = tmp_path / "r.json"
    assert main(["eval", "--model_name_or_path", NANO, "--tasks", "arc_challenge,local_arc_challenge",
                 "--eval_limit", "24", "--lm_eval_limit", "24", "--lm_eval_num_fewshot", "0",
                 "--lm_eval_include_path", local_task_dir(), "--output_file", str(out)]) == 0
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    assert metrics["lm_eval/local_arc_challenge/n"] == metrics["arc_challenge/n"] == 24
    for metric in ("acc", "acc_norm"):
        assert metrics[f"lm_eval/local_arc_challenge/{metric}"] == pytest.approx(metrics[f"arc_challenge/{metric}"],
                                                                                 abs=1e-12)
    assert ["lm_eval/local_arc_challenge/acc", "local_arc_challenge acc", "pct"] in results["columns"]
    assert results["lm_eval"]["tasks"] == ["local_arc_challenge"] and results["lm_eval"]["limit"] == 24
    assert f"| local_arc_challenge acc | {100 * metrics['arc_challenge/acc']:.2f} |" in capsys.readouterr().out


def test_a_name_neither_ours_nor_lm_evals_is_refused_before_loading(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from tests.eval.test_harness import local_task_dir

    monkeypatch.setattr("eora_ft.cli.eval._load", lambda *a: pytest.fail("the model was loaded before the check"))
    common = ["eval", "--model_name_or_path", NANO, "--lm_eval_include_path", local_task_dir(),
              "--output_file", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match=r"unknown \['squad'\].*closest squadv2.*Ours: \['arc_challenge'"):
        main([*common, "--tasks", "arc_challenge,squad"])
    with pytest.raises(SystemExit, match="names lm-eval task 'local_arc_challenge': its YAML says where its data is"):
        main([*common, "--tasks", "local_arc_challenge", "--data", "local_arc_challenge=x.json"])
    assert not (tmp_path / "r.json").exists()


def test_an_lm_eval_task_without_lm_eval_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    with pytest.raises(SystemExit, match=r"\['mmlu'\] are not ours .*pip install -e \"\.\[eval\]\""):
        main(["eval", "--model_name_or_path", NANO, "--tasks", "arc_challenge,mmlu", "--output_file",
              str(tmp_path / "r.json")])


def test_the_sft_task_is_refused_with_where_it_is_scored():
    from eora_ft.cli.eval import eval_command

    with pytest.raises(SystemExit, match=r"\['sft'\] scores your own data .* run recipes/sft.py"):
        eval_command(["--model_name_or_path", "eora_ft/assets/models/nano-llama-5m", "--tasks", "sft,wikitext2",
                      "--output_file", "/tmp/unused.json"])
