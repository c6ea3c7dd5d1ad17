"""What a run reads, checked before any work: local paths or hub ids, output directories, data files, the
model and its tokenizer (loaded on the CPU in the dtype resolved for where it computes), and the model
against the compression and LoRA settings. Shared by the recipes and ``eora-ft compress/init/eval``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eora_ft.compress import USES_BITS
from eora_ft.compress.experts import unfuse_experts
from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig, TaskArguments
from eora_ft.data import resolve_path
from eora_ft.data.file_checks import check_data_file
from eora_ft.data.heldout import heldout_texts
from eora_ft.data.sources import _looks_like_hub_id, local_files
from eora_ft.data.validation import carve_validation
from eora_ft.eval.tasks import Task, get_task
from eora_ft.init import check_rank
from eora_ft.init.sequential import find_decoder_layers, no_linears_error, target_linears
from eora_ft.utils.dtypes import model_dtype
from eora_ft.utils.model_checks import check_finite_weights, check_model_directory, check_tokenizer
from eora_ft.utils.placement import default_device


def require_source(path_or_id: str | None, what: str, hub_ok: bool = True) -> str | None:
    """Resolve a local path (cwd, then repo root) or accept a hub id; raise naming ``what`` otherwise."""
    if path_or_id is None:
        return None
    resolved = resolve_path(path_or_id)
    if os.path.exists(resolved) or (hub_ok and _looks_like_hub_id(path_or_id)):
        return resolved
    raise FileNotFoundError(
        f"{what} {path_or_id!r} does not exist (looked relative to {os.getcwd()!r} and the eora_ft checkout); "
        f"give an existing local path{' or a Hugging Face hub id (org/name)' if hub_ok else ''}"
    )


def check_output_dir(path: str | os.PathLike | None, what: str) -> None:
    """Fail before any work when ``path`` cannot become a directory this process writes: an existing file, a
    file where a parent directory should be, or a read-only parent. Nothing is created here."""
    if path is None:
        return
    target = Path(os.path.expanduser(path))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{what} {os.fspath(path)!r} is an existing file; give a directory path (created if "
                                 "missing)")
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{what} {os.fspath(path)!r} lies under {os.fspath(ancestor)!r}, which is a file; "
                                 "give a directory path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {os.fspath(path)!r}: {os.fspath(ancestor)!r} is not writable by this user; "
                              "give a directory you can write")


def load_tokenizer(model_args: EoraModelConfig):
    """The model's tokenizer (hub id or local dir), with EOS as padding when it has no pad token."""
    path = require_source(model_args.model_name_or_path, "model_name_or_path")
    if os.path.exists(path):  # the files a local checkpoint needs, before a tokenizer fails on their absence
        check_model_directory(path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    check_tokenizer(tokenizer, model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: EoraModelConfig, device: torch.device | str | None = None):
    """Tokenizer and causal LM via ``from_pretrained`` (hub id, or local dir; works with HF_HUB_OFFLINE=1), on the
    CPU, in ``model_args.dtype`` resolved for ``device``, where it will compute (default: this process's
    accelerator, else the CPU; :func:`eora_ft.utils.dtypes.model_dtype`).

    Checked before anything runs on them: a local directory's files (config, weights, intact safetensors),
    the tokenizer's EOS, and every weight finite."""
    tokenizer = load_tokenizer(model_args)  # checks a local directory's files first
    path = require_source(model_args.model_name_or_path, "model_name_or_path")
    dtype = model_dtype(model_args.dtype, path, default_device() if device is None else device,
                        revision=model_args.model_revision)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation,
    )
    check_finite_weights(model)
    unfuse_experts(model, model_args.lora_target_modules)  # mixture-of-experts: one linear per expert matrix
    return tokenizer, model


def check_model_against_config(model: torch.nn.Module, targets: list[str] | None, compress_args: CompressionArguments,
                               rank: int | None = None) -> None:
    """Fail before any work if the targets, the rank or the group size cannot fit the model's linears."""
    _, layers = find_decoder_layers(model)
    linears = target_linears(layers[0], targets)
    if not linears:
        raise no_linears_error(layers[0], targets, f"{type(model).__name__}'s decoder layers")
    for name, linear in linears.items():
        if rank is not None:
            check_rank(rank, linear.in_features, linear.out_features, name)
        if compress_args.compress_method in USES_BITS and compress_args.group_size != -1 and linear.in_features % compress_args.group_size:
            raise ValueError(f"group_size={compress_args.group_size} does not divide in_features={linear.in_features} of {name}; "
                             "use a divisor or -1 (per channel)")


def check_sources(sources: list[tuple[str | None, str, str | None]]) -> None:
    """``[(path or hub id, the argument it came from, record schema)]``: each local file must exist and pass
    :func:`eora_ft.data.file_checks.check_data_file` (named by argument, file and line); None is skipped."""
    for source, what, schema in sources:
        if source and source.strip():
            for file in local_files(require_source(source.strip(), what)):
                if not (schema is None and file.endswith(".parquet")):  # the sft task's binary tables: `datasets` reads them
                    check_data_file(file, what, schema)


def validate_sources(task_args: TaskArguments, compress_args: CompressionArguments,
                     init_args: AdapterInitArguments | None = None) -> None:
    """Fail before any work on a data path that is missing, empty, not UTF-8 or not well-formed JSON Lines
    (naming the argument, the file and the line), or on calibrating with a perplexity text."""
    calib = [("calib_dataset", part.strip()) for part in compress_args.calib_dataset.split(",") if part.strip()]
    if init_args is not None and init_args.adapter_calib_dataset:
        calib += [("adapter_calib_dataset", part.strip()) for part in init_args.adapter_calib_dataset.split(",")
                  if part.strip()]
    texts = heldout_texts(task_args.ppl_dataset)
    task_schema = get_task(task_args.task).schema
    sources = [(task_args.dataset_name, "dataset_name", task_schema),
               (task_args.eval_dataset_name, "eval_dataset_name", task_schema),
               *[(text.path, "ppl_dataset", "text") for text in texts],
               (compress_args.calib_task_dataset, "calib_task_dataset", compress_args.calib_task_format),
               *[(path, what, "text") for what, path in calib]]
    check_sources(sources)
    # every text a run fits to: the compressor's and the initializer's calibration, and the training data
    fitted = calib + [("dataset_name", part.strip()) for part in (task_args.dataset_name or "").split(",")
                      if part.strip()]
    for text in texts:
        for what, part in fitted:
            if resolve_path(part) == resolve_path(text.path):
                raise ValueError(f"{what} includes {text.path!r}, a perplexity text: fitting to the evaluation "
                                 "text would leak it into the metric; use another file or split (the bundled C4 "
                                 "calibration and held-out files are disjoint)")
    train_files = {os.path.realpath(f) for f in local_files(task_args.dataset_name or "")}
    eval_files = {os.path.realpath(f) for f in local_files(task_args.eval_dataset_name or "")}
    if train_files & eval_files:
        raise ValueError(f"eval_dataset_name {task_args.eval_dataset_name!r} is (or holds) the training data "
                         f"dataset_name {task_args.dataset_name!r}: its scores would measure memorisation; give a "
                         "held-out file (for ARC: the -Dev or -Test file)")


@dataclass(frozen=True)
class RunItems:
    """A run's items: ``train`` (what it trains on; GSM8K's few-shot pool too), ``validation`` (carved from the
    training items by ``validation_fraction``, None without it), ``evaluation`` (what the results report) and
    ``origin`` (where the evaluation items came from)."""

    train: Sequence
    validation: Sequence | None
    evaluation: Sequence
    origin: str


def load_run_items(task: Task, task_args: TaskArguments) -> RunItems:
    """The task's items as ``task_args`` selects them (limits, held-out shares, the validation split)."""
    train, evaluation, origin = task.load_items(
        task_args.dataset_name, task_args.eval_dataset_name, dataset_config=task_args.dataset_config,
        train_split=task_args.dataset_train_split, test_split=task_args.dataset_test_split,
        train_limit=task_args.train_limit, eval_limit=task_args.eval_limit,
        eval_split_fraction=task_args.eval_split_fraction, eval_split_seed=task_args.eval_split_seed)
    train, validation = carve_validation(train, task_args.validation_fraction, task_args.eval_split_seed)
    return RunItems(train, validation, evaluation, origin)
