"""The comparison table: rows compression x init with mean ± std over seeds, the ceiling and floor rows,
steps to QLoRA's eval loss, overlapping seed bands flagged; the loss plot is written; arguments are checked."""

import math
from pathlib import Path

import pytest

from eora_ft.run.compare import CompareArguments, comparison_markdown, write_comparison
from eora_ft.run.compare_table import inseparable, mean_std, steps_to_target, with_sampling_error
from eora_ft.run.report import model_card

METRICS = [["arc_challenge/acc", "ARC-C acc", "pct"], ["wikitext2/ppl", "WikiText-2 ppl", "ppl"]]


def _run(init, before, after, lr=2e-4, compressed=(0.25, 500.0), eval_curve=(6.2, 5.9), method="gptq",
         compression="gptq 2-bit g128", divergence=None):
    stage = lambda acc, ppl: {"arc_challenge/acc": acc, "wikitext2/ppl": ppl}  # noqa: E731
    return {"metrics": METRICS, "task": "arc_challenge", "divergence": divergence,
            "stages": {"compressed": stage(*compressed), "compensated": stage(*before), "finetuned": stage(*after)},
            "summary": {"compression": compression, "train steps": 10, "train items": 64, "eval items": 16,
                        "calibration tokens": 1024, "adapter calibration tokens": 2048, "model": "nano",
                        "compressed base": "/c/k/base", "adapter base": "/c/k/base (eora_ft)"},
            "config": {"AdapterInitArguments": {"init_method": init}, "SFTConfig": {"learning_rate": lr},
                       "CompressionArguments": {"compress_method": method}},
            "train_loss": [{"step": 5, "loss": 6.0}, {"step": 10, "loss": 5.5}],
            "eval_loss": [{"step": 0, "loss": eval_curve[0]}, {"step": 5, "loss": (eval_curve[0] + eval_curve[1]) / 2},
                          {"step": 10, "loss": eval_curve[1]}]}


def test_one_seed_table_has_the_papers_shape_and_says_it_cannot_separate(tmp_path):
    comparison = {"title": "t", "base": {"arc_challenge/acc": 0.3, "wikitext2/ppl": 400.0},
                  "runs": {"loftq": _run("loftq", (0.26, 480.0), (0.27, 470.0), compressed=(0.2, 490.0)),
                           "eora": _run("eora", (0.28, 450.0), (0.30, 440.0))}}
    text = comparison_markdown(comparison)
    lines = text.splitlines()
    assert lines[2].startswith("| compression | init | lr | seeds | ARC-C acc before | ARC-C acc after | WikiText-2 ppl before")
    assert "| none (uncompressed) | no adapter | – | – | 30.00 | – | 400.00 | – | – | – |" in lines
    # the no-adapter row (the floor) comes from a plain run, not LoftQ's re-compressed base
    assert "| gptq 2-bit g128 | none (no adapter) | – | – | 25.00 | – | 500.00 | – | – | – |" in lines
    # with one seed only exact ties are inseparable (both final eval losses are 5.9), and accuracies within the
    # 16 items' sampling error (30% vs 27%)
    assert "| gptq 2-bit g128 | eora | 0.0002 | 1 | 28.00 | 30.00 ≈ | 450.00 | 440.00 | 5.9000 ≈ | 5.5000 |" in lines
    assert "One seed: no spread is measured" in text
    write_comparison(tmp_path, comparison)
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "README.md").read_text() == text
    from eora_ft.utils.atomic import default_file_mode

    for name in ("loss_curves.png", "results.json", "results.md"):  # temp files are 0600; outputs must not be
        assert (tmp_path / name).stat().st_mode & 0o777 == default_file_mode()


def _seeded_comparison():
    runs, groups = {}, {}
    plans = {"lora": [(0.40, 380.0, 5.0), (0.42, 382.0, 5.1)],
             "qlora": [(0.30, 445.0, 5.8), (0.32, 455.0, 6.0)],
             "eora": [(0.33, 430.0, 5.5), (0.35, 431.0, 5.6)],
             "svd": [(0.31, 449.0, 5.9), (0.36, 452.0, 5.7)]}
    for init, seeds in plans.items():
        for seed, (acc, ppl, loss) in enumerate(seeds):
            label = f"{init}_seed{seed}"
            lora = init == "lora"
            runs[label] = _run("qlora" if lora else init, (0.25, 500.0), (acc, ppl), eval_curve=(6.2, loss),
                               method="none" if lora else "gptq",
                               compression="none (uncompressed)" if lora else "gptq 2-bit g128",
                               divergence="non-finite loss (nan) at step 5" if (init, seed) == ("svd", 1) else None)
            groups.setdefault(init, []).append(label)
    return {"title": "t", "base": {}, "runs": runs, "groups": groups}


def _with_eval_items(comparison, items):
    for run in comparison["runs"].values():
        run["summary"]["eval items"] = items
    return comparison


def test_seeds_give_mean_and_std_ceiling_row_steps_to_target_and_flags(tmp_path):
    comparison = _with_eval_items(_seeded_comparison(), 10**9)  # the seeds' spread alone decides the flags
    text = comparison_markdown(comparison)
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["lora"].startswith("| none (uncompressed) | lora | 0.0002 | 2 | 25.00 ± 0.00 | 41.00 ± 1.41 |")
    # ppl after: eora 430.5 ± 0.7 is best; svd (450.5 ± 2.1) and qlora (450 ± 7.1) do not reach its band
    assert "430.50 ± 0.71 |" in rows["eora"] and "≈" not in rows["eora"].split(" | ")[7]
    # acc after: eora 34.0 ± 1.4 is best; svd's 33.5 ± 3.5 overlaps it, qlora's 31.0 ± 1.4 does not
    assert rows["eora"].split(" | ")[5].endswith("≈") and rows["svd"].split(" | ")[5].endswith("≈")
    assert not rows["qlora"].split(" | ")[5].endswith("≈")
    # qlora's final eval loss is 5.9 (mean of 5.8 and 6.0): eora's curves (6.2, 5.85/5.9, 5.5/5.6) reach it at
    # step 5, svd's at 10, qlora's own second seed (final 6.0) never
    assert " | 5, 5 | " in rows["eora"] and " | 10, 10 | " in rows["svd"] and " | 10, never | " in rows["qlora"]
    assert "(diverged 1/2)" in rows["svd"] and "Mean ± sample std over 2 seeds" in text
    write_comparison(tmp_path, comparison)
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_accuracy_bands_hold_the_evaluation_sets_sampling_error():
    """299 ARC items: eora's 34.0 and qlora's 31.0 (seed std 1.4 each) are within 2.7 points of sampling error
    (binomial, sqrt(p(1-p)/299)) of each other, so the table cannot tell them apart; perplexity is unaffected."""
    text = comparison_markdown(_with_eval_items(_seeded_comparison(), 299))
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert all(rows[init].split(" | ")[5].endswith("≈") for init in ("qlora", "svd", "eora"))
    assert "≈" not in rows["eora"].split(" | ")[7] and "≈" not in rows["qlora"].split(" | ")[7]
    assert "binomial standard error (sqrt(p(1-p)/299), 2.5 points at 25%)" in text
    assert with_sampling_error((0.25, 0.0), 299)[1] == pytest.approx(math.sqrt(0.25 * 0.75 / 299))
    assert with_sampling_error((0.25, 0.03), 10**12)[1] == pytest.approx(0.03) and with_sampling_error(None, 299) is None


def test_mean_std_inseparable_and_steps_to_target():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([2.0, float("nan")]) == (2.0, 0.0) and mean_std([None]) is None
    assert inseparable({"a": (1.0, 0.1), "b": (1.15, 0.1), "c": (2.0, 0.1)}, lower_is_better=True) == {"a", "b"}
    assert inseparable({"a": (1.0, 0.0), "b": (1.1, 0.0)}, lower_is_better=True) == set()
    steps, target = steps_to_target(_seeded_comparison(), "eora")
    assert target == pytest.approx(5.9) and steps == [5, 5]


def test_steps_to_target_takes_qlora_at_its_best_rate():
    """A learning-rate sweep: the target is QLoRA where it ends lowest (5.6 at 4e-4, not 6.0 at 1e-4, the first)."""
    runs = {"qlora_lr0.0001_seed0": _run("qlora", (0.25, 500.0), (0.3, 450.0), lr=1e-4, eval_curve=(6.2, 6.0)),
            "qlora_lr0.0004_seed0": _run("qlora", (0.25, 500.0), (0.3, 450.0), lr=4e-4, eval_curve=(6.2, 5.6)),
            "eora_lr0.0001_seed0": _run("eora", (0.28, 450.0), (0.3, 440.0), lr=1e-4, eval_curve=(6.2, 5.8))}
    comparison = {"title": "t", "base": {}, "runs": runs, "groups": {label[:-6]: [label] for label in runs}}
    steps, target = steps_to_target(comparison, "eora_lr0.0001")
    assert target == pytest.approx(5.6) and steps == [None]  # eora ends at 5.8: never reaches QLoRA's best
    assert steps_to_target(comparison, "qlora_lr0.0001")[0] == [None]
    assert steps_to_target(comparison, "qlora_lr0.0004")[0] == [10]
    assert "with several rates, QLoRA at the rate where it is lowest" in comparison_markdown(comparison)


def test_a_rate_sweep_plots_one_colour_per_init_and_one_line_style_per_rate():
    from eora_ft.run.plots import line_styles

    styles = line_styles(["qlora_lr0.0001", "qlora_lr0.0004", "eora_lr0.0001", "eora_lr0.0004"])
    assert styles["qlora_lr0.0001"]["color"] == styles["qlora_lr0.0004"]["color"] != styles["eora_lr0.0001"]["color"]
    assert styles["qlora_lr0.0001"]["linestyle"] == styles["eora_lr0.0001"]["linestyle"] == "-"
    assert styles["qlora_lr0.0004"]["linestyle"] == styles["eora_lr0.0004"]["linestyle"] == "--"
    plain = line_styles(["lora", "qlora", "eora"])  # one rate: one solid line per init, each its own colour
    assert len({s["color"] for s in plain.values()}) == 3 and {s["linestyle"] for s in plain.values()} == {"-"}


def test_model_card_has_metadata_results_and_usage():
    card = model_card({**_run("eora", (0.28, 450.0), (0.30, 440.0)), "title": "arc: x"})
    assert card.startswith("---\nlibrary_name: peft\nbase_model: nano\ntags: [eora_ft, lora, gptq, eora, arc_challenge]")
    assert "| finetuned | 30.00 | 440.00 |" in card
    assert "`/c/k/base` (eora_ft)" in card and 'load_pretrained("adapter")' in card and "Training loss: 6.0000 at step 5 -> 5.5000 at step 10" in card


@pytest.mark.parametrize("kwargs,match", [
    ({"inits": ["eora", "dora"]}, r"unknown: \['dora'\]"),
    ({"inits": []}, "non-empty"),
    ({"inits": ["eora", "eora"]}, "repeats"),
    ({"learning_rates": [1e-4, 0.0]}, "must be positive"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"seeds": []}, "non-empty"),
])
def test_bad_compare_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompareArguments(**kwargs)


def test_an_interrupted_comparison_resumes_at_its_first_unfinished_run(tmp_path, monkeypatch):
    """Finished runs (results.json with the same configuration) are reused; a changed knob or resume=False reruns."""
    import eora_ft.run.compare as compare_module
    from eora_ft.config import parse_recipe_args
    from eora_ft.run.pipeline import run_config
    from eora_ft.run.report import write_results

    calls = []

    given = []

    def fake_run(task_args, compress_args, init_args, training_args, model_args, scored_bases=None):
        calls.append(Path(training_args.output_dir).name)
        given.append(dict(scored_bases))
        if len(calls) == 3 and not getattr(fake_run, "finish", False):
            raise KeyboardInterrupt  # the comparison is stopped during its third run
        results = {**_run(init_args.init_method, (0.28, 450.0), (0.30, 440.0)),
                   "config": run_config(task_args, compress_args, init_args, training_args, model_args)}
        write_results(training_args.output_dir, results)
        return results

    monkeypatch.setattr(compare_module, "run", fake_run)
    config = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "compare_arc_nano_gptq2.yaml"
    argv = ["--config", str(config), "--output_dir", str(tmp_path)]

    def parse(extra=()):
        return parse_recipe_args(argv + list(extra), extra=(CompareArguments,))[:-1]  # the config's inits/seeds aside

    compare_args = CompareArguments(inits=["qlora", "eora"], seeds=[0, 1], ceiling=True)
    with pytest.raises(KeyboardInterrupt):
        compare_module.compare(*parse(), compare_args)
    assert calls == ["lora_seed0", "lora_seed1", "qlora_seed0"]

    calls.clear()
    fake_run.finish = True
    comparison = compare_module.compare(*parse(), compare_args)
    assert calls == ["qlora_seed0", "qlora_seed1", "eora_seed0", "eora_seed1"]  # the two finished runs are reused
    # and so is the compressed row they measured: each later run is handed it rather than scoring that base again
    assert all(scored == {"/c/k/base": {"arc_challenge/acc": 0.25, "wikitext2/ppl": 500.0}} for scored in given[3:])
    assert list(comparison["runs"]) == ["lora_seed0", "lora_seed1", "qlora_seed0", "qlora_seed1", "eora_seed0", "eora_seed1"]
    assert (tmp_path / "results.md").is_file()

    calls.clear()
    compare_module.compare(*parse(["--learning_rate", "1e-4"]), compare_args)
    assert len(calls) == 6  # another configuration: nothing is reused
    calls.clear()
    compare_module.compare(*parse(["--learning_rate", "1e-4"]),
                           CompareArguments(inits=["qlora", "eora"], seeds=[0, 1], resume=False))
    assert len(calls) == 6


def _validated_sweep(losses: dict, best_steps=True):
    """A comparison of inits x rates x 2 seeds whose eval losses are on a validation split:
    ``losses[init][rate] = (seed-0 loss, seed-1 loss)``."""
    runs, groups = {}, {}
    for init, by_rate in losses.items():
        for rate, seeds in by_rate.items():
            group = f"{init}_lr{rate:g}"
            for seed, loss in enumerate(seeds):
                run = _run(init, (0.25, 500.0), (0.26, 480.0 + 100 * loss), lr=rate, eval_curve=(6.2, loss + 0.5))
                run["summary"]["eval loss on"] = "validation: 8 training items held out (seed 0)"
                run["best"] = {"step": 5, "eval_loss": loss} if best_steps else None
                runs[f"{group}_seed{seed}"] = run
                groups.setdefault(group, []).append(f"{group}_seed{seed}")
    return {"title": "t", "base": {}, "runs": runs, "groups": groups}


def test_each_init_is_reported_at_the_rate_its_validation_loss_chose(tmp_path):
    from eora_ft.run.compare_select import choose_rates

    comparison = _validated_sweep({"qlora": {1e-4: (5.0, 5.2), 3e-4: (4.8, 4.9), 1e-3: (4.9, 5.0)},
                                   "eora": {1e-4: (4.7, 4.8), 3e-4: (4.6, 4.9), 1e-3: (4.4, 4.5)}})
    choices = choose_rates(comparison)
    assert {m: (c.rate, c.at_edge) for m, c in choices.items()} == {"qlora": (3e-4, False), "eora": (1e-3, True)}
    assert choices["eora"].losses[1e-3] == pytest.approx((4.45, math.sqrt(0.005)))
    text = comparison_markdown(comparison)
    rows = [line for line in text.splitlines() if line.startswith("| gptq 2-bit g128 | ")]
    # one row per init, at its chosen rate; the reported adapter's validation loss and step per seed
    assert [row.split(" | ")[1:3] for row in rows[1:]] == [["qlora", "0.0003"], ["eora", "0.001"]]
    assert "| lr (chosen on validation) |" in text and "| validation loss | reported step |" in text
    assert "4.4500 ± 0.0707 | 5, 5 |" in rows[2]
    assert "| qlora | 5.1000 ± 0.1414 | **4.8500 ± 0.0707** | 4.9500 ± 0.0707 | 0.0003 |" in text
    assert "eora at 0.001, the highest rate tried" in text and "extend learning_rates" in text
    # the table's accuracy and perplexity come from the chosen runs: eora's after-ppl is 480 + 100 x 4.45
    assert "925.00 ± 7.07" in rows[2]
    write_comparison(tmp_path, comparison)  # the plot draws the chosen groups only
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_no_rate_choice_without_a_validation_split_or_a_sweep():
    from eora_ft.run.compare_select import choose_rates

    comparison = _validated_sweep({"qlora": {1e-4: (5.0, 5.2), 3e-4: (4.8, 4.9)}})
    for run in comparison["runs"].values():  # eval loss on the evaluation items: a curve to look at, not to choose by
        run["summary"].pop("eval loss on")
    assert choose_rates(comparison) is None
    assert "lr (chosen" not in comparison_markdown(comparison)
    single = _validated_sweep({"qlora": {1e-4: (5.0, 5.2)}, "eora": {1e-4: (4.0, 4.1)}}, best_steps=False)
    assert choose_rates(single) is None
    text = comparison_markdown(single)
    # without load_best_model_at_end the reported adapter is the last step's: its last logged validation loss
    assert "| validation loss |" in text and "reported step" not in text and "4.5500 ± 0.0707" in text


def test_the_next_rate_is_one_grid_step_beyond_the_chosen_edge():
    from eora_ft.run.compare_select import RateChoice, next_rate

    losses = {1e-4: (5.0, 0.0), 3e-4: (4.9, 0.0), 1e-3: (4.8, 0.0)}
    groups = {rate: f"eora_lr{rate:g}" for rate in losses}
    assert next_rate(RateChoice("eora", 1e-3, losses, groups)) == pytest.approx(3.33e-3)
    assert next_rate(RateChoice("eora", 1e-4, losses, groups)) == pytest.approx(3.33e-5)
    assert not RateChoice("eora", 3e-4, losses, groups).at_edge


def test_an_extended_grid_reports_each_init_at_its_new_best_rate_in_the_inits_order():
    from eora_ft.run.compare_select import choose_rates

    # qlora's third rate was added beyond the edge after eora's groups: its row still comes first
    comparison = _validated_sweep({"qlora": {1e-4: (5.0, 5.2), 3e-4: (4.8, 4.9)},
                                   "eora": {1e-4: (4.7, 4.8), 3e-4: (4.5, 4.9)}})
    extra = _validated_sweep({"qlora": {9e-4: (4.7, 4.7)}})
    comparison["runs"] |= extra["runs"]
    comparison["groups"] |= extra["groups"]
    assert choose_rates(comparison)["qlora"].rate == 9e-4
    rows = [line.split(" | ")[1:3] for line in comparison_markdown(comparison).splitlines()
            if line.startswith("| gptq 2-bit g128 | ")][1:]
    assert rows == [["qlora", "0.0009"], ["eora", "0.0003"]]
    assert "| eora | 4.7500 ± 0.0707 | **4.7000 ± 0.2828** | not run |" in comparison_markdown(comparison)


@pytest.mark.parametrize("kwargs", [{"grid_extensions": 2}, {"grid_extensions": 1, "learning_rates": [1e-4]},
                                    {"grid_extensions": -1, "learning_rates": [1e-4, 2e-4]}])
def test_grid_extensions_need_a_grid(kwargs):
    with pytest.raises(ValueError, match="grid_extensions"):
        CompareArguments(**kwargs)
