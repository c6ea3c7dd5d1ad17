"""What users get wrong, in one table: each bad input, where it is caught, and the words its error must say.

Every row runs for real. Rows caught by the recipe (``run``) go through :func:`eora_ft.run.pipeline.run` with
its expensive stages (evaluation, perplexity, compression, training) replaced by a tripwire, so "caught
before any expensive stage" is checked, not assumed; nothing may be written to ``output_dir`` either.
The README's "Common errors" table is rendered from the rows marked ``readme`` (``python
tests/test_bad_inputs.py`` rewrites it; a test checks that it is current).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "eora_ft" / "assets" / "models" / "nano-llama-5m"
DEMO = ROOT / "recipes" / "configs" / "arc_nano_gptq2_eora.yaml"
BACKSLASH = chr(92)
README_START, README_END = "<!-- common-errors:start -->", "<!-- common-errors:end -->"


@dataclass(frozen=True)
class BadInput:
    """``given``: what the user wrote; ``stage``: where it is caught; ``words``: regexes the message must
    contain; ``trigger(tmp_path)`` does what the user would and must raise."""

    given: str
    stage: str
    words: tuple[str, ...]
    trigger: Callable[[Path], object]
    readme: bool = False
    warns: bool = False  # a UserWarning with ``words`` before any expensive stage (the run may go on)


class ExpensiveStageReached(Exception):
    """Raised by the tripwires: the bad input was not caught before real work started."""


# ---- how each kind of input reaches eora_ft ---------------------------------------------------------

def _flags(tmp: Path, flags: tuple[str, ...]) -> list[str]:
    return ["--config", str(DEMO), "--output_dir", str(tmp / "out"), "--cache_dir", str(tmp / "cache"),
            "--report_to", "none", *flags]


def parse(*flags: str) -> Callable[[Path], object]:
    """The recipe's parser (argparse's own errors, printed then SystemExit, become a ValueError of their text)."""
    def trigger(tmp: Path):
        from eora_ft.config import parse_recipe_args

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                return parse_recipe_args(_flags(tmp, flags))
        except SystemExit:
            raise ValueError(stderr.getvalue()) from None
    return trigger


def run(*flags: str, files: Callable[[Path], dict] | None = None) -> Callable[[Path], object]:
    """The whole recipe with tripwires on its expensive stages; ``files(tmp)`` makes inputs and returns
    ``{placeholder: path}`` substituted into ``flags``."""
    def trigger(tmp: Path):
        from eora_ft.run import pipeline

        made = files(tmp) if files else {}
        args = [made.get(flag, flag) for flag in flags]
        return pipeline.run(*parse(*args)(tmp))
    return trigger


def _tripwire(name: str):
    def reached(*args, **kwargs):
        raise ExpensiveStageReached(name)
    return reached


@pytest.fixture
def tripwires(monkeypatch):
    monkeypatch.setattr("eora_ft.run.pipeline.perplexity", _tripwire("perplexity"))
    monkeypatch.setattr("eora_ft.eval.tasks.Task.evaluate", _tripwire("evaluation"))
    monkeypatch.setattr("eora_ft.run.artifacts.compress_model", _tripwire("compression"))
    monkeypatch.setattr("eora_ft.run.pipeline.train_adapters", _tripwire("training"))


# ---- bad data files -----------------------------------------------------------------------------------

ARC_RECORD = {"id": "q1", "question": {"stem": "What is 1+1?", "choices": [{"text": "2", "label": "A"},
                                                                           {"text": "3", "label": "B"}]},
              "answerKey": "A"}
TEXT_RECORD = {"text": "The quick brown fox jumps over the lazy dog. " * 40}
GOOD_LINE = {"arc": ARC_RECORD, "text": TEXT_RECORD}
# (argument, schema of its records): every argument that names a data file
DATA_ARGUMENTS = [("dataset_name", "arc"), ("eval_dataset_name", "arc"), ("ppl_dataset", "text"),
                  ("calib_dataset", "text"), ("adapter_calib_dataset", "text"), ("calib_task_dataset", "arc")]


def _file_bytes(kind: str, schema: str) -> bytes | None:
    good = json.dumps(GOOD_LINE[schema]).encode() + b"\n"
    return {
        "missing": None,
        "empty": b"",
        "truncated": good + good[: len(good) // 2],
        "non-UTF-8": good + b'{"text": "caf\xe9 au lait"}\n',  # Latin-1, as Windows editors save it
        "malformed": good + b"question,answer\n",
        "missing field": good + json.dumps({"q": "no fields this schema needs"}).encode() + b"\n",
    }[kind]


FILE_FAULTS = {  # kind -> words of the error beyond the argument's name and the file
    "missing": (r"does not exist",),
    "empty": (r"holds no records", r"empty"),
    "truncated": (r"line 2", r"not valid JSON", r"truncated"),
    "non-UTF-8": (r"line 2", r"0xe9", r"not UTF-8", r"save the file as UTF-8"),
    "malformed": (r"line 2", r"not valid JSON", r"JSON Lines"),
    "missing field": (r"line 2", r"lacks field", r"each record needs"),
}


def _bad_file(argument: str, kind: str, schema: str):
    def files(tmp: Path) -> dict:
        path = tmp / f"bad_{argument}.jsonl"
        content = _file_bytes(kind, schema)
        if content is not None:
            path.write_bytes(content)
        return {"FILE": str(path)}
    return files


def _data_file_rows() -> list[BadInput]:
    rows = []
    for argument, schema in DATA_ARGUMENTS:
        for kind, words in FILE_FAULTS.items():
            if kind == "missing field" and argument == "ppl_dataset":
                continue  # same check as calib_dataset's
            article = "an" if kind[0] in "aeiou" else "a"
            rows.append(BadInput(f"{argument}: {article} {kind} JSON Lines file", "run: before loading the model",
                                 (*words, argument, rf"bad_{argument}\.jsonl"),
                                 run(f"--{argument}", "FILE", files=_bad_file(argument, kind, schema)),
                                 readme=argument == "calib_dataset" and kind in ("empty", "malformed", "non-UTF-8")))
    return rows


def _text_file(content: bytes):
    def files(tmp: Path) -> dict:
        (tmp / "notes.txt").write_bytes(content)
        return {"FILE": str(tmp / "notes.txt")}
    return files


# ---- bad models, tokenizers, compressed directories and adapters ---------------------------------------

def _nano_copy(tmp: Path, edit: Callable[[Path], None]) -> dict:
    target = tmp / "model"
    shutil.copytree(NANO, target)
    edit(target)
    return {"MODEL": str(target)}


def _model(edit: Callable[[Path], None]):
    return lambda tmp: _nano_copy(tmp, edit)


def _drop_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def _truncate_weights(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _poison(value: float):
    def edit(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        tensors["model.layers.2.mlp.down_proj.weight"][5, 7] = value
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return edit


def _empty_directory(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.mkdir()


def _no_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()


def _an_adapter(directory: Path) -> None:
    """What `save_pretrained` of a PEFT model writes: no config.json, no model weights."""
    shutil.rmtree(directory)
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(b"")


def _already_compressed(directory: Path) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"quantization_config": {"quant_method": "gptq",
                                                                                         "bits": 4}}))


def _an_existing_file(tmp: Path) -> dict:
    (tmp / "taken").write_text("a file the user already has\n")
    return {"FILE": str(tmp / "taken")}


def _binary_text(tmp: Path) -> dict:
    (tmp / "heldout.parquet").write_bytes(b"PAR1\x00\x15\x04" + bytes(range(256)))
    return {"FILE": str(tmp / "heldout.parquet")}


def _no_special_tokens(directory: Path) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("eos_token", "pad_token", "bos_token"):
        config.pop(key, None)
    path.write_text(json.dumps(config))
    generation = directory / "generation_config.json"
    generation.write_text(json.dumps({k: v for k, v in json.loads(generation.read_text()).items()
                                      if "token_id" not in k}))


def _narrow_model(directory: Path) -> None:
    """The nano tokenizer on a 1-layer Llama whose hidden size (96) no group of 64 divides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=48)
    for path in directory.glob("*.safetensors"):
        path.unlink()
    LlamaForCausalLM(config).save_pretrained(directory)


def _gptq_export_of_odd_shapes(tmp: Path):
    """``eora-ft compress --format gptq`` on a model whose hidden size (80) is not a multiple of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eora_ft.cli import main

    shutil.copytree(NANO, tmp / "model")
    (tmp / "model" / "model.safetensors").unlink()
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=80, intermediate_size=160, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=40)).save_pretrained(tmp / "model")
    return main(["compress", "--model_name_or_path", str(tmp / "model"), "--compress_method", "rtn", "--group_size", "-1",
                 "--format", "gptq", "--calib_num_samples", "1", "--calib_seq_len", "16", "--output_dir", str(tmp / "out")])


def _newer_format(tmp: Path):
    """A real save_compressed directory (RTN on a 1-layer model) whose format_version is one ahead."""
    from transformers import AutoModelForCausalLM

    from eora_ft.compress import make_compressor
    from eora_ft.compress.io import COMPRESSION_CONFIG, FORMAT_VERSION, load_compressed, save_compressed
    from eora_ft.init.sequential import compress_model

    _narrow_model(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    compress_model(model, torch.randint(1, 8192, (1, 16)), make_compressor("rtn", bits=4, group_size=32), [],
                   progress=False)
    directory = save_compressed(model, tmp / "compressed", {"method": "rtn"})
    meta = json.loads((directory / COMPRESSION_CONFIG).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (directory / COMPRESSION_CONFIG).write_text(json.dumps(meta))
    return load_compressed(directory)


def _adapter_for(base_edit: Callable[[torch.nn.Module], None] | None, tensor_edit: Callable[[dict], dict] | None):
    """Save a nano LoRA adapter (r 4), optionally edit its tensors, and load it onto (an edited) nano model."""
    def trigger(tmp: Path):
        from peft import get_peft_model
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        from eora_ft.adapters.peft_bridge import load_adapter, lora_config

        source = AutoModelForCausalLM.from_pretrained(NANO, dtype=torch.float32)
        get_peft_model(source, lora_config(4, 8, 0.0, ["q_proj", "v_proj"])).save_pretrained(tmp / "adapter")
        if tensor_edit is not None:
            path = tmp / "adapter" / "adapter_model.safetensors"
            save_file(tensor_edit(load_file(path)), path)
        if base_edit is None:
            target = AutoModelForCausalLM.from_pretrained(NANO, dtype=torch.float32)
        else:
            _narrow_model(tmp)
            target = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        return load_adapter(target, tmp / "adapter")
    return trigger


def _widen_lora_a(tensors: dict) -> dict:
    key = next(k for k in tensors if "layers.1.self_attn.q_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 300)
    return tensors


def _move_to_layer_9(tensors: dict) -> dict:
    return {key.replace("layers.3.", "layers.9."): value for key, value in tensors.items()}


def _fp16_overflow(tmp: Path):
    from transformers import AutoModelForCausalLM

    from eora_ft.compress import make_compressor
    from eora_ft.init.sequential import compress_model

    model = AutoModelForCausalLM.from_pretrained(NANO, dtype=torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3e4)  # the residual stream leaves fp16's range
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    # GPTQ reads the activations (RTN alone runs no calibration forward: nothing there could overflow)
    return compress_model(model, ids, make_compressor("gptq", bits=4, group_size=64), [], progress=False)


# ---- the table ----------------------------------------------------------------------------------------

CONFIG = "config: at parse time"
RUN = "run: before loading the model"
MODEL = "run: loading the model, before evaluation"
CASES: list[BadInput] = [
    BadInput("an unknown key in the YAML (`lora_rnak: 4`)", CONFIG, ("lora_rnak",), parse("--lora_rnak", "4"),
             readme=True),
    BadInput("`bits: 5`", CONFIG, (r"bits=5 is not supported", r"valid: \[2, 3, 4, 8\]"), parse("--bits", "5"),
             readme=True),
    BadInput("`group_size: 100`", CONFIG, (r"group_size=100 is not supported", r"valid: \[-1, 32"),
             parse("--group_size", "100")),
    BadInput("`compress_method: awq`", CONFIG, (r"compress_method='awq' is unknown", r"valid: \["),
             parse("--compress_method", "awq"), readme=True),
    BadInput("`merge: true` with `merge_format: compressed-tensors` on an asymmetric grid", CONFIG,
             (r"merge_format='compressed-tensors' loads in transformers for symmetric grids only", "sym: true"),
             parse("--merge", "true", "--merge_format", "compressed-tensors"), readme=True),
    BadInput("`merge: true` on the uncompressed ceiling", CONFIG,
             (r"compress_method='none' has none", "merge_and_unload"),
             parse("--merge", "true", "--compress_method", "none")),
    BadInput("`merge_method: smooth`", CONFIG, (r"merge_method='smooth' is unknown", r"recompress"),
             parse("--merge_method", "smooth")),
    BadInput("`init_method: dora`", CONFIG, (r"init_method='dora' is unknown", r"valid: \["),
             parse("--init_method", "dora")),
    BadInput("`sparsity: 3:4`", CONFIG, (r"3:4",), parse("--compress_method", "sparsegpt", "--sparsity", "3:4")),
    BadInput("`task: wikitext`", CONFIG, (r"task='wikitext' is unknown", "valid"), parse("--task", "wikitext")),
    BadInput("`learning_rate: -1`", CONFIG, (r"learning_rate=-1\.0 is out of range", r"\(0, inf\)"),
             parse("--learning_rate", "-1"), readme=True),
    BadInput("`num_train_epochs: 0` (no max_steps)", CONFIG, (r"num_train_epochs=0\.0", "trains nothing"),
             parse("--num_train_epochs", "0", "--max_steps", "-1")),
    BadInput("`per_device_train_batch_size: 0`", CONFIG, (r"per_device_train_batch_size=0", r"\[1, inf\)"),
             parse("--per_device_train_batch_size", "0")),
    BadInput("`lora_r: 0`", CONFIG, (r"lora_r=0 is out of range", r"\[1, inf\)"), parse("--lora_r", "0")),
    BadInput("`lora_alpha: 0`", CONFIG, (r"lora_alpha=0", r"\(0, inf\)"), parse("--lora_alpha", "0")),
    BadInput("`lora_dropout: 1.5`", CONFIG, (r"lora_dropout=1\.5", r"\[0, 1\)"), parse("--lora_dropout", "1.5")),
    BadInput("`dtype: float13`", CONFIG, (r"float13", "float32"), parse("--dtype", "float13")),
    BadInput("`use_dora: true`", CONFIG, (r"use_dora=True is not supported",), parse("--use_dora", "true")),
    BadInput("`damp_percent: 0`", CONFIG, (r"damp_percent=0\.0", r"\(0, 1\)"), parse("--damp_percent", "0")),
    BadInput("`calib_num_samples: 0`", CONFIG, (r"calib_num_samples=0",), parse("--calib_num_samples", "0")),
    BadInput("`calib_seq_len: 1`", CONFIG, (r"calib_seq_len=1",), parse("--calib_seq_len", "1")),
    BadInput("`calib_batch_size: 0`", CONFIG, (r"calib_batch_size=0",), parse("--calib_batch_size", "0")),
    BadInput("`calib_task_fraction: 1.5`", CONFIG, (r"calib_task_fraction=1\.5 must lie in \[0, 1\]",),
             parse("--calib_task_fraction", "1.5")),
    BadInput("`calib_task_format: squad`", CONFIG, (r"calib_task_format='squad' is unknown", "valid"),
             parse("--calib_task_format", "squad")),
    BadInput("`adapter_calib_task_fraction: 1.5`", CONFIG, (r"adapter_calib_task_fraction=1\.5 must lie in",),
             parse("--adapter_calib_task_fraction", "1.5")),
    BadInput("`adapter_calib_num_samples: 0`", CONFIG, (r"adapter_calib_num_samples=0 must be >= 1",),
             parse("--adapter_calib_num_samples", "0")),
    BadInput("`eora_shrink: 2`", CONFIG, (r"eora_shrink=2\.0 must lie in \[0, 1\]",), parse("--eora_shrink", "2")),
    BadInput("`eora_eigen_mode: full`", CONFIG, (r"eora_eigen_mode='full' is unknown", "valid"),
             parse("--eora_eigen_mode", "full")),
    BadInput("`loftq_iters: 0`", CONFIG, (r"loftq_iters=0 must be >= 1",), parse("--loftq_iters", "0")),
    BadInput("`factor_bits: 5`", CONFIG, (r"factor_bits=5 is not supported", "valid"), parse("--factor_bits", "5")),
    BadInput("`capture: original`", CONFIG, (r"capture='original' is unknown",), parse("--capture", "original")),
    BadInput("`ppl_window: 1`", CONFIG, (r"ppl_window=1 must be at least 2",), parse("--ppl_window", "1")),
    BadInput("`eval_limit: 0`", CONFIG, (r"eval_limit=0 is out of range", "or None"), parse("--eval_limit", "0")),
    BadInput("`ppl_max_windows: 0`", CONFIG, (r"ppl_max_windows=0",), parse("--ppl_max_windows", "0")),
    BadInput("`eval_batch_size: 0`", CONFIG, (r"eval_batch_size=0",), parse("--eval_batch_size", "0")),
    BadInput("`divergence_patience: -1`", CONFIG, (r"divergence_patience=-1",), parse("--divergence_patience", "-1")),
    BadInput("`execution_device: tpu`", CONFIG, (r"execution_device='tpu' is not valid", "cuda:N"),
             parse("--execution_device", "tpu")),
    BadInput("`calib_activations_device: gpu`", CONFIG, (r"calib_activations_device='gpu' is unknown",),
             parse("--calib_activations_device", "gpu")),
    BadInput("`grid_search: true` with sparsegpt", CONFIG, (r"grid_search=True", "does not quantize"),
             parse("--compress_method", "sparsegpt", "--grid_search", "true")),
    BadInput("`act_order: true` with rtn", CONFIG, (r"act_order=True is a GPTQ option",),
             parse("--compress_method", "rtn", "--act_order", "true")),
    BadInput("`rank_allocation: budget` with `init_method: qlora`", CONFIG,
             (r"rank_allocation='budget' truncates SVD-ordered factors", "init_method='qlora'", "eora"),
             parse("--rank_allocation", "budget", "--init_method", "qlora")),
    BadInput("`refine_learning_rate: 0`", CONFIG, (r"refine_learning_rate=0\.0 is out of range", r"\(0, inf\)"),
             parse("--refine_learning_rate", "0")),
    BadInput("`refine_micro_batch_size: 0`", CONFIG, (r"refine_micro_batch_size=0 is out of range",),
             parse("--refine_micro_batch_size", "0")),
    BadInput("`refine_target: hidden`", CONFIG, (r"refine_target='hidden' is unknown", r"\['final', 'layers'\]"),
             parse("--refine_target", "hidden")),
    BadInput("`rank_allocation: greedy`", CONFIG, (r"rank_allocation='greedy' is unknown", "budget"),
             parse("--rank_allocation", "greedy")),
    BadInput("`init_from_adapter: ./runs` (not an adapter)", CONFIG,
             (r"init_from_adapter='\./runs' is not a PEFT adapter directory", "adapter_config.json"),
             parse("--init_from_adapter", "./runs")),
    BadInput("`main_process_timeout: 0`", CONFIG, (r"main_process_timeout=0", "positive"),
             parse("--main_process_timeout", "0")),
    BadInput("`learning_rate: nan`", CONFIG, (r"learning_rate=nan",), parse("--learning_rate", "nan"), readme=True),
    BadInput("`learning_rate: inf`", CONFIG, (r"learning_rate=inf is out of range", r"\(0, inf\)"),
             parse("--learning_rate", "inf")),
    BadInput("`lora_dropout: nan`", CONFIG, (r"lora_dropout=nan",), parse("--lora_dropout", "nan")),
    BadInput("`eora_shrink: nan`", CONFIG, (r"eora_shrink=nan",), parse("--eora_shrink", "nan")),
    BadInput("`max_grad_norm: nan`", CONFIG, (r"max_grad_norm=nan is not a number",), parse("--max_grad_norm", "nan")),
    BadInput("`report_to: wandb2`", CONFIG, (r"unknown integration\(s\) \['wandb2'\]", "tensorboard"),
             parse("--report_to", "wandb2")),
    BadInput("a misspelt flag (`--lora_rnak 4`)", CONFIG, (r"unknown argument\(s\) 'lora_rnak'", r"closest: lora_r"),
             parse("--lora_rnak", "4")),
    BadInput("`compress_method: none` with `init_method: eora`", RUN, (r"has no compression error", "qlora"),
             run("--compress_method", "none", "--init_method", "eora")),
    BadInput("task `text` without packing", RUN, (r"packing: true", "packing_strategy: wrapped"),
             run("--task", "text", "--dataset_name", "eora_ft/assets/data/enwiki_train/wiki_00.txt",
                 "--eval_dataset_name", "eora_ft/assets/data/enwiki_heldout/wiki_49.txt")),
    BadInput("`load_best_model_at_end: true` without a validation split", RUN,
             (r"load_best_model_at_end=True would pick the step on the evaluation items", "validation_fraction"),
             run("--eval_strategy", "steps", "--save_strategy", "steps", "--load_best_model_at_end", "true"),
             readme=True),
    BadInput("`validation_fraction: 0.1` with `eval_strategy: no`", RUN, (r"eval_strategy is 'no'", "eval_steps"),
             run("--validation_fraction", "0.1", "--eval_strategy", "no")),
    BadInput("`validation_fraction: 0.5` of one training item", RUN,
             (r"validation_fraction=0.5 of 1 training item", "nothing to train on"),
             run("--validation_fraction", "0.5", "--train_limit", "1", "--eval_strategy", "steps")),
    BadInput("`validation_fraction: 1`", CONFIG, (r"validation_fraction=1.0 is out of range", r"\[0, 1\)"),
             parse("--validation_fraction", "1")),
    BadInput("calibrating on a perplexity text", RUN, (r"adapter_calib_dataset includes", "leak"),
             run("--adapter_calib_dataset", "eora_ft/assets/data/enwiki_heldout/wiki_49.txt"), readme=True),
    BadInput("`model_name_or_path: ./no/such/model`", RUN, (r"model_name_or_path './no/such/model' does not exist",
                                                          "hub id"),
             run("--model_name_or_path", "./no/such/model"), readme=True),
    *_data_file_rows(),
    BadInput("ppl_dataset: an empty .txt file", RUN, ("ppl_dataset", r"notes\.txt", "holds no text"),
             run("--ppl_dataset", "FILE", files=_text_file(b"\n\n"))),
    BadInput("calib_dataset: a .txt file that is not UTF-8", RUN, ("calib_dataset", r"notes\.txt", "line 3",
                                                                   "not UTF-8"),
             run("--calib_dataset", "FILE", files=_text_file(b"one\n\ntwo \xff\xfe\n"))),
    BadInput("a model directory without weights", RUN, (r"has no weights", "model.safetensors"),
             run("--model_name_or_path", "MODEL", files=_model(_drop_weights)), readme=True),
    BadInput("`model_name_or_path`: an empty directory", RUN, (r"has no config\.json", "save_pretrained"),
             run("--model_name_or_path", "MODEL", files=_model(_empty_directory)), readme=True),
    BadInput("`model_name_or_path`: a directory without tokenizer files", RUN,
             (r"has no tokenizer", r"tokenizer\.json", "save_pretrained"),
             run("--model_name_or_path", "MODEL", files=_model(_no_tokenizer))),
    BadInput("`model_name_or_path`: a PEFT adapter directory", RUN,
             (r"is a PEFT adapter, not a model", "init_from_adapter"),
             run("--model_name_or_path", "MODEL", files=_model(_an_adapter)), readme=True),
    BadInput("`model_name_or_path`: an already compressed checkpoint", RUN,
             (r"is already compressed", "gptq", "--compressed_model"),
             run("--model_name_or_path", "MODEL", files=_model(_already_compressed)), readme=True),
    BadInput("`model_name_or_path`: a weights file", RUN, (r"is a file", r"config\.json"),
             run("--model_name_or_path", "eora_ft/assets/models/nano-llama-5m/model.safetensors")),
    BadInput("`output_dir`: an existing file", RUN, (r"output_dir '.*taken' is an existing file", "directory"),
             run("--output_dir", "FILE", files=_an_existing_file), readme=True),
    BadInput("`cache_dir`: an existing file", RUN, (r"cache_dir '.*taken' is an existing file",),
             run("--cache_dir", "FILE", files=_an_existing_file)),
    BadInput("`eval_dataset_name`: the training file", RUN, (r"is \(or holds\) the training data", "memorisation"),
             run("--eval_dataset_name", "eora_ft/assets/data/arc/ARC-Challenge/ARC-Challenge-Train.jsonl"),
             readme=True),
    BadInput("`dataset_name`: a .txt file for ARC", RUN, (r"is not a \.json/\.jsonl file", "needs arc records",
                                                         "dataset_name"),
             run("--dataset_name", "FILE", files=_text_file(b"Question: why?\nAnswer: because\n"))),
    BadInput("`ppl_dataset`: a binary file", RUN, ("ppl_dataset", r"heldout\.parquet", "binary file",
                                                   r"accepted: UTF-8 text"),
             run("--ppl_dataset", "FILE", files=_binary_text)),
    BadInput("`calib_seq_len: 2048` on a model of 1024 positions", RUN,
             (r"calib_seq_len=2048 is longer than the model's 1024 positions", r"calib_seq_len <= 1024"),
             run("--calib_seq_len", "2048"), warns=True, readme=True),
    BadInput("`ppl_window: 4096` on a model of 1024 positions", RUN,
             (r"ppl_window=4096 is longer than the model's 1024 positions",), run("--ppl_window", "4096"), warns=True),
    BadInput("a truncated model.safetensors", MODEL, (r"model\.safetensors is corrupt or truncated",
                                                      "download or save it again"),
             run("--model_name_or_path", "MODEL", files=_model(_truncate_weights)), readme=True),
    BadInput("a NaN in the weights", MODEL, (r"model\.layers\.2\.mlp\.down_proj\.weight", "NaN/Inf"),
             run("--model_name_or_path", "MODEL", files=_model(_poison(float("nan")))), readme=True),
    BadInput("an Inf in the weights", MODEL, (r"model\.layers\.2\.mlp\.down_proj\.weight", "NaN/Inf"),
             run("--model_name_or_path", "MODEL", files=_model(_poison(float("inf"))))),
    BadInput("a tokenizer without eos or pad token", MODEL, (r"has no eos_token", "tokenizer_config.json"),
             run("--model_name_or_path", "MODEL", files=_model(_no_special_tokens)), readme=True),
    BadInput("`lora_r` above a layer's dimensions", MODEL,
             (r"rank=200 is invalid for self_attn\.k_proj \(128x256\)", r"valid: 1\.\.128"),
             run("--lora_r", "200"), readme=True),
    BadInput("`group_size: 64` on a layer of 96 inputs", MODEL,
             (r"group_size=64 does not divide in_features=96", "-1 \\(per channel\\)"),
             run("--model_name_or_path", "MODEL", "--group_size", "64", files=_model(_narrow_model))),
    BadInput("`lora_target_modules: qkv_proj` on Llama", MODEL, (r"match no linear", "q_proj"),
             run("--lora_target_modules", "qkv_proj")),
    BadInput("`eora-ft compress --format gptq` on 80-wide layers", "eora-ft compress: before compressing",
             (r"format=.gptq. needs in_features and out_features that are multiples of 32", "80x80",
              "format=.eora_ft."), _gptq_export_of_odd_shapes),
    BadInput("a compressed directory from a newer eora_ft", "load_compressed / eora-ft eval",
             ("newer than this eora_ft reads", "upgrade eora_ft"), _newer_format, readme=True),
    BadInput("an adapter made for another base (wrong shapes)", "load_adapter / eora-ft eval",
             (r"lora_A\.weight has shape \(4, 300\)", r"256 -> 256 linear", "another base model"),
             _adapter_for(None, _widen_lora_a), readme=True),
    BadInput("an adapter made for another model size", "load_adapter / eora-ft eval",
             (r"has shape \(4, 256\)", r"96 -> 96 linear", "another base model"), _adapter_for(_narrow_model, None)),
    BadInput("an adapter for modules the base lacks", "load_adapter / eora-ft eval",
             (r"adapts 'model\.layers\.9\.self_attn\.[qv]_proj'", "does not have", "another base model"),
             _adapter_for(None, _move_to_layer_9)),
    BadInput("fp16 calibration activations that overflow", "compression: after the first layer that overflows",
             (r"overflow at the output of decoder layer 1", r"float16", "bfloat16 or float32"), _fp16_overflow,
             readme=True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c.given[:60]}" for i, c in enumerate(CASES)])
def test_bad_input_is_caught_early_with_an_actionable_message(case: BadInput, tmp_path, tripwires):
    with pytest.raises(Exception) as caught, warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        case.trigger(tmp_path)
    if case.warns:  # warned, then went on to the first expensive stage
        assert isinstance(caught.value, ExpensiveStageReached), f"{case.given}: {caught.value}"
        message = "\n".join(str(w.message) for w in given if issubclass(w.category, UserWarning))
    else:
        assert not isinstance(caught.value, ExpensiveStageReached), f"{case.given}: reached {caught.value} first"
        message = str(caught.value)
    for word in case.words:
        assert re.search(word, message), f"{case.given}: {word!r} not in the error:\n{message}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "wrote into output_dir"


def render_readme_table() -> str:
    rows = ["| You give | Caught | The error says |", "|---|---|---|"]
    for case in CASES:
        if case.readme:
            words = "; ".join("`" + word.replace(BACKSLASH, "") + "`" for word in case.words[:3])
            rows.append(f"| {case.given} | {case.stage} | {words} |")
    return "\n".join(rows)


def test_readme_common_errors_table_is_rendered_from_the_cases():
    text = (ROOT / "README.md").read_text()
    assert README_START in text and README_END in text
    current = text.split(README_START)[1].split(README_END)[0].strip()
    assert current == render_readme_table(), "README is stale: run python tests/test_bad_inputs.py"


def test_every_data_argument_and_fault_kind_is_covered():
    covered = {re.match(r"(\w+): an? (.+) JSON Lines file", case.given).groups()
               for case in CASES if " JSON Lines file" in case.given}
    for argument, _ in DATA_ARGUMENTS:
        kinds = set(FILE_FAULTS) - ({"missing field"} if argument == "ppl_dataset" else set())
        assert {(argument, kind) for kind in kinds} <= covered


if __name__ == "__main__":  # rewrite the README's table
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(README_START)
    tail = rest.split(README_END)[1]
    readme.write_text(f"{head}{README_START}\n{render_readme_table()}\n{README_END}{tail}")
    print(f"wrote {sum(c.readme for c in CASES)} rows into {readme}", file=sys.stderr)
