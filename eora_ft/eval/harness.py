"""Any lm-evaluation-harness task, run by the harness itself on the model already in memory.

Our own fast path (:mod:`eora_ft.eval.tasks`: ARC, MathQA, GSM8K, equal to lm-eval on the same items) covers
the EoRA paper's benchmarks. For every other one (``lm_eval_tasks: mmlu,hellaswag`` in a recipe, or a name
``eora-ft eval --tasks`` does not know) lm-eval does the work: its task registry, prompts, few-shot
sampling, metrics and aggregation. Its ``HFLM`` wraps the model object each stage evaluates (a transformers
model, a model of our ``CompressedLinear`` layers, either under a PEFT adapter) where it already sits:
nothing is reloaded or copied. lm-eval is the optional extra ``pip install -e ".[eval]"``, imported only here
and only when a harness task is asked for.

:func:`harness_evaluate` returns flat keys, which join a stage's metrics in results.json::

    lm_eval/<task>/<metric>             a task (or group) asked for: a column of the results table
    lm_eval/<task>/<metric>_stderr      its standard error as lm-eval reports it (results.json only)
    lm_eval/<task>/n                    documents scored (a group: those of its tasks)
    lm_eval/<task>/<member>/<metric>    a task inside a group (mmlu's subjects, its categories), same suffixes

``<metric>`` is lm-eval's metric name without its filter when the filter is ``none`` (``acc``,
``acc_norm``), else ``<metric>_<filter>`` (GSM8K's ``exact_match_strict-match``). Values are lm-eval's own:
accuracies as fractions, as our tasks store them (the tables print them in %).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import random
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from eora_ft.eval.scoring import _device as input_device

PREFIX = "lm_eval"
INSTALL = 'pip install -e ".[eval]"'
MIN_VERSION = "0.4.10"  # older releases import transformers.AutoModelForVision2Seq, which transformers 5 removed
# fractions shown in % (our "pct" kind); lower-is-better numbers get our "ppl" kind (lower is better in comparisons);
# every other metric (bleu, rouge, mcc, ...) is shown as lm-eval reports it with kind "num"
PCT_METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "brier_score", "ter")
# what HFLM logs for every model object passed in: expected here, and its advice about accelerate does not apply
# (only the main process evaluates)
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

_TASK_MANAGERS: dict[str | None, object] = {}  # include_path -> lm_eval TaskManager (indexing takes ~15 s)


def _lm_eval():
    """The ``lm_eval`` module, or an error saying how to install a working one."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (lm-eval < 0.4.10 fails here under transformers 5)
        import lm_eval.tasks  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] != "lm_eval":
            raise ImportError(f"lm-eval is installed but cannot import {error.name!r}: reinstall it with {INSTALL}") from error
        raise ImportError(f"lm-evaluation-harness tasks need lm-eval, which is not installed: {INSTALL}") from error
    except Exception as error:  # e.g. AttributeError: module transformers has no attribute AutoModelForVision2Seq
        from importlib.metadata import version

        raise ImportError(f"lm-eval {version('lm_eval')} does not import here ({type(error).__name__}: {error}); "
                          f"lm-eval >= {MIN_VERSION} works with transformers 5: {INSTALL}") from error
    return lm_eval


def _task_manager(include_path: str | None):
    """lm-eval's task registry with ``include_path``'s YAMLs added, built once per process and path."""
    key = str(Path(include_path).resolve()) if include_path else None
    if key not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(include_path=key)
    return _TASK_MANAGERS[key]


def _closest(name: str, known: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.6)
    extending = [k for k in known if k.startswith(name) and k not in close]  # squad -> squadv2, squad_completion
    return (close + sorted(extending, key=len))[:n]


def check_lm_eval_tasks(tasks: str | None, include_path: str | None, *, load: bool = True,
                        what: str = "lm_eval_tasks") -> list[str]:
    """The harness task names of ``tasks`` (comma-separated; None or blank: none), checked before any expensive
    work: lm-eval importable, ``include_path`` an existing directory, every name a task, group or tag of
    lm-eval's registry with ``include_path``'s YAMLs added (``TaskManager(include_path=...).all_tasks``).

    ``load`` (default): also build the tasks as :func:`harness_evaluate` will, reading their datasets, so that
    what only lm-eval can tell (a dataset a machine without the hub lacks, a group asked for with one of its
    own tasks) fails here rather than after compression; False when the evaluation follows at once.

    Raises ImportError naming ``pip install -e ".[eval]"`` when lm-eval is missing (or too old to import),
    ValueError for a missing ``include_path``, for unknown names (each with the closest valid names) or for
    tasks lm-eval cannot build. ``what`` names the setting in the messages. The registry is built once per
    process (about 15 s) and reused by :func:`harness_evaluate`."""
    names = list(dict.fromkeys(t.strip() for t in (tasks or "").split(",") if t.strip()))
    if not names:
        return []
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"lm_eval_include_path={include_path!r} is not a directory (it holds task YAMLs for {what})")
    _lm_eval()
    known = _task_manager(include_path).all_tasks
    known_set = set(known)
    unknown = [n for n in names if n not in known_set]
    if unknown:
        hints = "; ".join(f"{n!r}: closest {', '.join(_closest(n, known)) or 'none'}" for n in unknown)
        raise ValueError(f"{what}: unknown {unknown}, not in lm-eval's {len(known)} tasks"
                         + (f" nor in {include_path}" if include_path else "") + f" ({hints}). A task of your own "
                         "(or a local copy of one, for offline use): its YAML in lm_eval_include_path")
    if load:
        _build_tasks(names, include_path, what)
    return names


def _build_tasks(names: list[str], include_path: str | None, what: str) -> None:
    manager = _task_manager(include_path)
    try:
        if hasattr(manager, "load"):  # lm-eval >= 0.4.11
            manager.load(names)
        else:
            from lm_eval.tasks import get_task_dict

            get_task_dict(names, manager)
    except Exception as error:
        raise ValueError(f"{what}: lm-eval cannot build {names}: {type(error).__name__}: {error}") from error


class _ExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_WARNINGS)


@contextlib.contextmanager
def _left_as_found(model: torch.nn.Module) -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's generators (for its own reproducibility) and puts the model in
    eval mode: a stage evaluated before training must change neither the training's random draws nor its mode."""
    modes = [(module, module.training) for module in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    quiet = _ExpectedWarnings()
    loggers = [logging.getLogger(name) for name in ("lm_eval.models.huggingface", "lm-eval")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for module, training in modes:
            module.training = training


def _in_memory_lm(model: torch.nn.Module, tokenizer, batch_size: int, progress: bool):
    """lm-eval's ``HFLM`` around the model object itself, inputs on the device its weights (or, streamed, its
    offload hooks) take them, progress bars on or off."""
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    # HFLM reads model.device and model.config, both of which a PeftModel forwards to the model it wraps; a model
    # streamed through accelerate's offload hooks has its parameters on "meta": its inputs go to the CPU and the
    # hooks move them (as our own scoring does)
    lm = InMemoryHFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), backend="causal")
    lm._device = input_device(model)
    return lm


def _metric_name(raw: str) -> str | None:
    """``"acc,none"`` -> ``acc``, ``"exact_match_stderr,strict-match"`` -> ``exact_match_strict-match_stderr``;
    None for lm-eval's non-metric fields (``alias``, ``sample_len``)."""
    metric, comma, filter_name = raw.partition(",")
    if not comma:
        return None
    stderr = metric.endswith("_stderr")
    base = metric[: -len("_stderr")] if stderr else metric
    name = base if filter_name == "none" else f"{base}_{filter_name}"
    return name + "_stderr" if stderr else name


def _entry_metrics(entry: Mapping) -> dict[str, float]:
    out = {}
    for raw, value in entry.items():
        name = _metric_name(raw)
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)  # a stderr lm-eval could not compute is the string "N/A": left out
    return out


def flatten_results(raw: Mapping, tasks: list[str]) -> dict[str, float]:
    """lm-eval's ``simple_evaluate`` output -> the flat keys of :func:`harness_evaluate` (see the module doc).

    Shown (``lm_eval/<task>/...``): the names asked for and every result no group holds; a group without a
    score of its own (a plain collection of tasks) shows its members instead. Members of a shown group go
    under it (``lm_eval/mmlu/mmlu_anatomy/acc``)."""
    results, members = raw.get("results", {}), raw.get("group_subtasks", {}) or {}
    samples = raw.get("n-samples", {}) or {}
    held = {m for group in members.values() for m in group}

    def descendants(name: str) -> list[str]:
        found: dict[str, None] = {}
        stack = list(reversed(members.get(name, [])))
        while stack:
            member = stack.pop()
            if member not in found:
                found[member] = None
                stack.extend(reversed(members.get(member, [])))
        return list(found)

    def count(name: str) -> int | None:
        leaves = [n for n in [name, *descendants(name)] if n in samples]
        return sum(int(samples[n].get("effective", 0)) for n in leaves) if leaves else None

    def put(out: dict, prefix: str, name: str) -> None:
        out.update({f"{prefix}/{metric}": value for metric, value in _entry_metrics(results.get(name, {})).items()})
        n = count(name)
        if n is not None:
            out[f"{prefix}/n"] = n

    out: dict[str, float] = {}
    order = {name: i for i, name in enumerate(tasks)}
    roots = sorted((n for n in results if n in order or n not in held), key=lambda n: order.get(n, len(order)))
    while roots:
        name = roots.pop(0)
        if not _entry_metrics(results.get(name, {})) and members.get(name):
            roots = [m for m in members[name] if m in results] + roots  # no score of its own: show its members
            continue
        put(out, f"{PREFIX}/{name}", name)
        for member in descendants(name):
            if member in results:
                put(out, f"{PREFIX}/{name}/{member}", member)
    return out


def harness_evaluate(model: torch.nn.Module, tokenizer, tasks: list[str], *, num_fewshot: int | None = None,
                     limit: int | None = None, batch_size: int = 32, include_path: str | None = None,
                     progress: bool = True) -> dict[str, float]:
    """Run lm-eval's ``simple_evaluate`` on the in-memory ``model`` (a transformers causal LM, a model of
    ``CompressedLinear`` layers, either under a PEFT adapter; on the device it sits on) for ``tasks`` (names
    from :func:`check_lm_eval_tasks`), with ``tokenizer`` as it is.

    ``num_fewshot``: None keeps each task's own default; ``limit``: the first N documents of each task (None:
    all); ``batch_size``: sequences per forward; ``include_path``: a directory of extra task YAMLs. Returns
    the flat ``lm_eval/...`` keys of the module doc (an empty dict for no tasks). The model's train/eval
    modes and the global random generators are left as they were found."""
    if not tasks:
        return {}
    lm_eval = _lm_eval()
    manager = _task_manager(include_path)
    with _left_as_found(model):
        lm = _in_memory_lm(model, tokenizer, batch_size, progress)
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False)
    return flatten_results(raw, list(tasks))


def _kind(metric: str) -> str:
    def named(names: tuple[str, ...]) -> bool:  # the metric itself or it with a filter: exact_match_strict-match
        return any(metric == n or metric.startswith(n + "_") for n in names)

    if named(LOWER_IS_BETTER):
        return "ppl"
    return "pct" if named(PCT_METRICS) else "num"


def harness_table_metrics(metrics: Mapping[str, float]) -> list[tuple[str, str, str]]:
    """``(key, label, kind)`` rows for the results table, one per ``lm_eval/<task>/<metric>`` key of ``metrics``
    (shown tasks only: no group members, stderrs or counts), in their order. ``kind``: "pct" for fractions
    (acc, acc_norm, exact_match, f1: printed in %), "ppl" for lower-is-better numbers (perplexities, bits per
    byte), "num" for the rest (printed as they are)."""
    rows = []
    for key in metrics:
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != PREFIX or parts[2] == "n" or parts[2].endswith("_stderr"):
            continue
        _, task, metric = parts
        rows.append((key, f"{task} {metric}", _kind(metric)))
    return rows
