"""The one natural path of a recipe: load -> evaluate -> compress + init (cached) -> evaluate -> train
-> evaluate -> report.

Stages evaluated: ``base`` (uncompressed), ``compressed``, ``compensated`` (initial adapter, before
training) and ``finetuned``. Only the main process compresses (into the artifact cache, or finds
the entry there), evaluates and writes; every rank trains from the same cached entry. While the main
process works alone, the other ranks wait on a file (:mod:`eora_ft.train.handoff`), never inside a
collective that NCCL's watchdog would time out. The uncompressed model stays on the CPU; compression
moves one decoder layer at a time to this rank's accelerator. Recipes parse their config and call
:func:`run`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import AutoConfig

from eora_ft.run.artifacts import (
    base_key_parts,
    build_base,
    build_init,
    compressed_base_name,
    export_base,
    init_key_parts,
    load_artifacts,
)
from eora_ft.run.inputs import (check_model_against_config, check_output_dir, load_model, load_run_items, load_tokenizer,
                                validate_sources)
from eora_ft.run.cache import cache_key, default_cache_dir, ensure_entry, read_meta, require_entry
from eora_ft.config import (
    UNCOMPRESSED,
    AdapterInitArguments,
    CompressionArguments,
    EoraModelConfig,
    EoraSFTConfig,
    TaskArguments,
    check_compatible,
    check_validation,
)
from eora_ft.data import mixed_calibration, resolve_path
from eora_ft.data.heldout import heldout_texts
from eora_ft.data.sft import check_sft_options, completion_only, ensure_chat_template, rendered_texts
from eora_ft.data.task_text import task_texts
from eora_ft.train.distributed import (
    all_cores_while_others_wait,
    describe_state,
    full_model_init,
    gather_trainable,
)
from eora_ft.eval.harness import check_lm_eval_tasks, harness_evaluate, harness_table_metrics
from eora_ft.eval.scoring import perplexity
from eora_ft.train.checkpoints import agree_on_resume
from eora_ft.train.handoff import Handoff
from eora_ft.train.launch import refuse_data_parallel
from eora_ft.train.memory_plan import check_run_memory
from eora_ft.utils.model_checks import check_positions
from eora_ft.adapters.peft_bridge import save_adapter
from eora_ft.utils.placement import placed_for_inference, placement, streaming_note
from eora_ft.run.merge_report import BARE, REFERENCE
from eora_ft.run.merge_run import merge_directory
from eora_ft.run.report import init_description, write_model_card, write_results
from eora_ft.run.training_home import training_home, unsharded_copy
from eora_ft.eval.tasks import get_task
from eora_ft.compress.experts import expert_owners
from eora_ft.init.coverage import compression_coverage
from eora_ft.init.expert_calibration import describe_routing
from eora_ft.train.trainer import divergence, release_training_state, train_adapters, training_summary

logger = logging.getLogger("eora_ft")


def run_config(task_args: TaskArguments, compress_args: CompressionArguments, init_args: AdapterInitArguments,
               training_args: EoraSFTConfig, model_args: EoraModelConfig) -> dict:
    """The configuration a run records in ``results.json`` (``config``): each dataclass's fields under its
    class name, the training arguments as ``SFTConfig``."""
    return {cls.__name__: {k: v for k, v in dataclasses.asdict(obj).items() if not k.startswith("_")}
            for cls, obj in zip((TaskArguments, CompressionArguments, AdapterInitArguments, EoraModelConfig),
                                (task_args, compress_args, init_args, model_args))} \
        | {"SFTConfig": training_args.to_dict()}


def run(task_args: TaskArguments, compress_args: CompressionArguments, init_args: AdapterInitArguments,
        training_args: EoraSFTConfig, model_args: EoraModelConfig, scored_bases: dict[str, dict] | None = None) -> dict:
    """Run the whole recipe and return the results dict (also written to ``output_dir``; empty on ranks
    other than the main one). ``scored_bases``: ``{summary's "compressed base": its compressed stage}`` from earlier
    runs with the same evaluation settings (a comparison's): a run on one of those bases reuses that row."""
    refuse_data_parallel(use_cpu=training_args.use_cpu)  # `python recipe.py` on a multi-GPU host: before any work
    state = PartialState()
    main = state.is_main_process
    progress = main and not training_args.disable_tqdm
    logger.info("%s", describe_state(state))
    transformers.set_seed(training_args.seed)
    task = get_task(task_args.task)
    check_compatible(compress_args, init_args)
    check_validation(task_args, training_args)
    if task.packed and not (training_args.packing and training_args.packing_strategy == "wrapped"):
        raise ValueError(f"task={task.name!r} trains a language model on whole documents: set packing: true and "
                         f"packing_strategy: wrapped (got packing={training_args.packing}, packing_strategy="
                         f"{training_args.packing_strategy!r}); without them each document is cut to max_length")
    validate_sources(task_args, compress_args, init_args)
    # lm-eval tasks exist and their data is readable: checked before anything is loaded or compressed
    harness_tasks = check_lm_eval_tasks(task_args.lm_eval_tasks, task_args.lm_eval_include_path, load=False)
    cache_root = Path(compress_args.cache_dir) if compress_args.cache_dir else default_cache_dir()
    check_output_dir(training_args.output_dir, "output_dir")
    check_output_dir(cache_root, "cache_dir")
    handoff = Handoff.start(state, cache_root, training_args.main_process_timeout)
    # an output_dir some nodes cannot see is refused here, before compression (the Trainer decides again)
    agree_on_resume(state, training_args.output_dir, training_args.save_on_each_node,
                    saves_checkpoints=training_args.save_strategy != "no")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    # before the model loads: data whose columns fit no layout is refused here
    items = load_run_items(task, task_args)
    train_items, eval_items = items.train, items.evaluation
    tokenizer = load_tokenizer(model_args)
    if task.tokenize:  # TRL's chat_template_path: a template to train conversations with (else the tokenizer's)
        check_sft_options(training_args)
        ensure_chat_template(tokenizer, training_args.chat_template_path)
    tokenizing = {"num_proc": training_args.dataset_num_proc, "truncation_mode": training_args.truncation_mode}
    def as_trained(part):  # items formatted, and for a task that tokenizes itself masked, as the training data
        return task.training_dataset(part, tokenizer, training_args.max_length, completion_only(
            part, training_args.completion_only_loss, training_args.assistant_only_loss) if task.tokenize else True,
            **tokenizing)

    train_dataset = as_trained(train_items)
    # what is scored: the evaluation items, tokenized as trained for a task that tokenizes itself
    scored_items = (task.training_dataset(eval_items, tokenizer, training_args.max_length, **tokenizing)
                    if task.tokenize else eval_items)
    if main:
        check_positions(AutoConfig.from_pretrained(resolve_path(model_args.model_name_or_path),
                                                   revision=model_args.model_revision),
                        {"calib_seq_len": None if compress_args.compress_method == UNCOMPRESSED
                         else compress_args.calib_seq_len,
                         "ppl_window": task_args.ppl_window if task_args.ppl_dataset else None,
                         "max_length": training_args.max_length})
    ppl_texts = [(text, text.read()) for text in heldout_texts(task_args.ppl_dataset)] if main else []

    @all_cores_while_others_wait(state)
    def evaluate(stage_model, with_perplexity: bool = True) -> dict:
        with placed_for_inference(stage_model, state.device):  # a model at home on the CPU evaluates on the GPU
            return _evaluate(stage_model, with_perplexity)

    def _evaluate(stage_model, with_perplexity: bool) -> dict:
        metrics = task.evaluate(stage_model, tokenizer, scored_items, train_items, batch_size=task_args.eval_batch_size,
                                progress=progress, max_new_tokens=task_args.max_new_tokens,
                                num_fewshot=task_args.num_fewshot)
        if harness_tasks:  # lm-evaluation-harness itself, on this stage's in-memory model
            metrics |= harness_evaluate(stage_model, tokenizer, harness_tasks, num_fewshot=task_args.lm_eval_num_fewshot,
                                        limit=task_args.lm_eval_limit, batch_size=task_args.eval_batch_size,
                                        include_path=task_args.lm_eval_include_path, progress=progress)
        for text, content in ppl_texts if with_perplexity else []:
            metrics[text.metric[0]] = perplexity(stage_model, tokenizer, content, window=task_args.ppl_window,
                                                 max_windows=task_args.ppl_max_windows, progress=progress,
                                                 desc=text.name)["ppl"]
        return metrics

    stages: dict[str, dict] = {}
    if main:
        with handoff.main_work("loading, evaluating and compressing the model"):
            # the harness tasks' data (a download on a cold cache) before anything is compressed
            check_lm_eval_tasks(task_args.lm_eval_tasks, task_args.lm_eval_include_path)
            entry, built, dtype = _compress_on_main(state, task_args, compress_args, init_args, training_args,
                                                    model_args, train_dataset, cache_root, evaluate, stages, lap,
                                                    progress)
        handoff.post("entry", key=entry.name, dtype=str(dtype))
    else:
        posted = handoff.wait("entry", "build the compressed model and its initial adapter")
        entry = require_entry(cache_root, posted["key"])
        require_entry(cache_root, read_meta(entry)["base_entry"])
        built, dtype = {}, getattr(torch, posted["dtype"].removeprefix("torch."))
    meta = read_meta(entry)
    base_name = compressed_base_name(entry, model_args.model_name_or_path)
    home = training_home(state, entry)
    with full_model_init():
        peft_model = load_artifacts(entry, dtype, home, attn_implementation=model_args.attn_implementation)
    lap("compress_and_init")

    output_dir = Path(training_args.output_dir)
    adapter_base = ("", "")
    if main:
        with handoff.main_work("evaluating the compressed model"):
            scored = (scored_bases or {}).get(base_name)
            if scored is not None:
                logger.info("compressed model: scored by an earlier run on the same base (%s)", base_name)
                stages["compressed"] = dict(scored)
            else:
                with peft_model.disable_adapter():
                    stages["compressed"] = evaluate(peft_model)
            lap("eval_compressed")
            with full_model_init():  # the adapters name a base the user owns, not a cache entry
                adapter_base = built.get("adapter_base") or export_base(entry, output_dir / "base", tokenizer,
                                                                        dtype=dtype)
            save_adapter(peft_model, output_dir / ("adapter_init" if init_args.init_from_adapter
                                                   else f"{init_args.init_method}_init"), adapter_base[0],
                         revision=built.get("adapter_revision"))
            stages["compensated"] = evaluate(peft_model)
            lap("eval_compensated")
        handoff.post("ready")
    else:
        handoff.wait("ready", "evaluate the compressed model before training")

    # The eval loss curve (when eval_strategy is set): on the validation split when there is one (the step and
    # rate are chosen on it), else on the evaluation items in the training format (a curve to look at).
    eval_dataset = None if training_args.eval_strategy == "no" else as_trained(items.validation) \
        if items.validation is not None else scored_items if task.tokenize \
        else task.training_dataset(eval_items, tokenizer, None)
    check_run_memory(peft_model, training_args, state.num_processes, state.device, model_args.lora_r)
    trainer = train_adapters(peft_model, tokenizer, train_dataset, _trainer_args(training_args, task), eval_dataset)
    trained = gather_trainable(peft_model)  # a collective: every rank is here straight from training
    lap("train")
    if not main:  # the main process evaluates and writes alone, for longer than a collective may wait
        # this rank's model, shards and optimizer state go first: the main process may spread its evaluation
        # over this GPU (a 70B base on 24-48 GB cards), and a comparison's next run loads its own
        release_training_state(trainer)
        del peft_model, trainer, trained
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        handoff.wait("done", "evaluate the fine-tuned model and write the results")
        handoff.finish(state)
        return {}

    with handoff.main_work("evaluating the fine-tuned model and writing the results"):
        training = training_summary(trainer)
        if trained is not None:  # ZeRO-3 or FSDP2 sharded the model: evaluate and save an unsharded copy
            release_training_state(trainer)
            del peft_model, trainer  # the last references to the engine's module and its replicated packed base
            peft_model = unsharded_copy(entry, dtype, home, trained, model_args.attn_implementation)
        stages["finetuned"] = evaluate(peft_model, with_perplexity=task_args.ppl_after_finetune)
        lap("eval_finetuned")

        init_label = init_description(init_args.init_from_adapter, init_args.init_method, model_args.lora_r,
                                      model_args.lora_alpha, meta)
        results = {
            "title": f"{task.name}: {built.get('compression', compress_args.describe())} + "
                     + (f"adapter r{meta['lora']['r']}" if init_args.init_from_adapter
                        else f"{init_args.init_method} r{model_args.lora_r}")
                     + f" on {model_args.model_name_or_path}",
            "task": task.name,
            "metrics": [list(m) for m in task.metrics]
                       + [list(row) for row in harness_table_metrics(stages.get("finetuned", {}))]
                       + [list(t.metric) for t in heldout_texts(task_args.ppl_dataset)],
            "stages": stages,
            "summary": {
                "model": model_args.model_name_or_path,
                "compression": built.get("compression", compress_args.describe()),
                "decoder weights compressed": built.get("decoder weights compressed", "–"),
                **({"compressor calibration, experts": built["expert tokens"]} if built.get("expert tokens") else {}),
                "init": init_label,
                "calibration tokens": built.get("calib_tokens", "–"),
                "adapter calibration tokens": meta["adapter_calib_tokens"],
                "artifact cache": f"base: {built.get('base', '–')}, init: {built.get('init', '–')}",
                "init entry": str(entry),
                "compressed base": base_name,
                "adapter base": f"{adapter_base[0]} ({adapter_base[1]})",
                "train items": len(train_items), "eval items": len(eval_items), "eval data": items.origin,
                "eval loss on": (f"validation: {len(items.validation)} training items held out (seed "
                                 f"{task_args.eval_split_seed})" if items.validation is not None
                                 else "the evaluation items"),
                "train steps": training["train steps"], "reported adapter": training["reported adapter"],
                "trainable parameters": training["trainable parameters"],
                "world size": state.num_processes,
                "training backend": training["training backend"],
            },
            "timings": timings,
            "train_loss": training["train_loss"],
            "divergence": divergence(training["train_loss"], task_args.divergence_patience),
            "eval_loss": training["eval_loss"],
            "best": training["best"],
            "layers": meta["layers"],
            "config": run_config(task_args, compress_args, init_args, training_args, model_args),
        }
        # conversations: the chat template trained with (eora_ft's default where the tokenizer had none) goes along
        save_adapter(peft_model, output_dir / "adapter", adapter_base[0], tokenizer=tokenizer if task.tokenize else None,
                     revision=built.get("adapter_revision"))
        write_results(output_dir, results)
        write_model_card(output_dir, results)
        if compress_args.merge:  # the serving checkpoint: after the results, so a failed merge loses no run
            with full_model_init():
                merge_directory(output_dir, output_dir / "merged", compress_args, progress=progress,
                                scored={BARE: stages["compressed"], REFERENCE: stages["finetuned"]}
                                if task_args.ppl_after_finetune else None)
            logger.info("merged the adapter into %s (merge_report.md there)", output_dir / "merged")
    handoff.post("done")
    handoff.finish(state)
    return results


def _trainer_args(training_args: EoraSFTConfig, task) -> EoraSFTConfig:
    """``training_args`` for the Trainer: a task that tokenizes itself put its loss mask in ``completion_mask``
    already (by ``completion_only_loss`` / ``assistant_only_loss``), which TRL applies with ``completion_only_loss``.
    A copy: the caller's are the run's recorded config."""
    if task.tokenize is None:
        return training_args
    args = copy.copy(training_args)
    args.completion_only_loss, args.assistant_only_loss = True, False
    return args


def _compress_on_main(state, task_args: TaskArguments, compress_args: CompressionArguments,
                      init_args: AdapterInitArguments, training_args: EoraSFTConfig, model_args: EoraModelConfig,
                      train_dataset, cache_root: Path, evaluate, stages: dict, lap, progress: bool):
    """Main process: load the uncompressed model on the CPU, evaluate it, build (or find) the cache entry.

    Two cache entries: the compressed base (keyed by the compressor's inputs) and the initial adapter
    (keyed by its base, the initializer and the adapter calibration). Returns ``(init entry, what was built
    or found, dtype)``; fills ``stages["base"]``. With ``compressed_model_name_or_path`` the base is that
    checkpoint, checked against the original before anything loads and imported instead of compressed
    (:mod:`eora_ft.run.precompressed`; no compressor calibration); ``built["adapter_base"]`` then names it."""
    from eora_ft.run.precompressed import check_same_weights, ensure_imported_base, prepare_import

    imported = base_entry = None
    if model_args.compressed_model_name_or_path:  # compress_args become the checkpoint's own grid
        imported, compress_args = prepare_import(model_args, compress_args, init_args)
        # before the original loads: the imported packed model is never in host memory beside it
        with all_cores_while_others_wait(state), full_model_init():
            base_entry, base_built = ensure_imported_base(cache_root, imported, model_args, state.device,
                                                          load_tokenizer(model_args))
    with full_model_init():
        tokenizer, model = load_model(model_args, state.device)
    check_model_against_config(model, model_args.lora_target_modules, compress_args, model_args.lora_r)
    coverage = compression_coverage(model, model_args.lora_target_modules)
    if compress_args.compress_method != UNCOMPRESSED and coverage.warning():  # said before any compression
        logger.warning("%s", coverage.warning())
    if imported:  # the same shapes do not make the same model (a base vs its instruction tune)
        check_same_weights(model, imported)
    lap("load")
    if task_args.eval_base and placement(model, state.device)[0] == "streamed":
        # every forward would copy the whole model over PCIe: a 70B GSM8K evaluation outlasts main_process_timeout
        logger.warning("not evaluating the uncompressed model (eval_base): %s. Evaluate it on its own with "
                       "`eora-ft eval --model_name_or_path %s` on a node whose GPUs hold it, or set eval_base: false",
                       streaming_note(model, state.device), model_args.model_name_or_path)
    elif task_args.eval_base:
        with placed_for_inference(model, state.device):
            stages["base"] = evaluate(model)
    lap("eval_base")
    dtype = next(model.parameters()).dtype
    execution, activations = compress_args.placement(state.device)
    uncompressed = compress_args.compress_method == UNCOMPRESSED
    calib = adapter_calib = None
    if not uncompressed:
        if compress_args.calib_task_dataset:
            calib_task = task_texts(compress_args.calib_task_format, resolve_path(compress_args.calib_task_dataset))
        else:
            columns = train_dataset.column_names  # the task's training text, formatted as it is trained
            calib_task = (rendered_texts(train_dataset, tokenizer) if "input_ids" in columns else
                          list(train_dataset["text"]) if "text" in columns else
                          [p + c for p, c in zip(train_dataset["prompt"], train_dataset["completion"])])
        calib = None if imported else mixed_calibration(
            tokenizer, compress_args.calib_dataset, calib_task, compress_args.calib_num_samples,
            compress_args.calib_seq_len, task_fraction=compress_args.calib_task_fraction, seed=compress_args.calib_seed)
        adapter_calib = None if init_args.init_from_adapter else mixed_calibration(
            tokenizer, init_args.adapter_calib_dataset or compress_args.calib_dataset, calib_task,
            init_args.adapter_calib_num_samples or compress_args.calib_num_samples, compress_args.calib_seq_len,
            task_fraction=init_args.adapter_calib_task_fraction, seed=compress_args.calib_seed)
    base_key = base_entry.name if imported else cache_key(
        base_key_parts(model, model_args, compress_args, calib, resolve_path(model_args.model_name_or_path)))
    init_key = cache_key(init_key_parts(base_key, model_args, init_args, adapter_calib, training_args.seed,
                                        compress_args.expert_min_share if expert_owners(model) else None))
    consumed = False  # building the base compresses the loaded model in place

    def original():
        nonlocal model
        if consumed:
            # the compressed copy goes before the dense model is read again: a 4-bit 70B would hold both (176 GB)
            model = None
            gc.collect()
            with full_model_init():
                model = load_model(model_args, state.device)[1]
        return model

    def compress(tmp: Path) -> dict:
        nonlocal consumed
        consumed = not uncompressed
        return build_base(tmp, model, tokenizer, calib, model_args, compress_args, progress,
                          execution_device=execution, activations_device=activations)

    # full_model_init: building the init entry loads the compressed base, which ZeRO-3's zero.Init would
    # otherwise partition into empty shards as it is constructed (a cold cache under ZeRO-3)
    with all_cores_while_others_wait(state), full_model_init():
        if base_entry is None:  # an imported base was made before the original loaded
            base_entry, base_built = ensure_entry(cache_root, base_key, compress)
        entry, init_built = ensure_entry(cache_root, init_key, lambda tmp: build_init(
            tmp, base_entry, original, tokenizer, adapter_calib, model_args, compress_args, init_args,
            training_args.seed, progress, execution_device=execution, activations_device=activations,
            entry=cache_root / init_key))
    built = {"base": "built" if base_built else "hit", "init": "built" if init_built else "hit",
             "decoder weights compressed": "0.0%" if uncompressed else coverage.summary(),
             "calib_tokens": read_meta(base_entry)["calib_tokens"], "compression": read_meta(base_entry)["compression"],
             "expert tokens": describe_routing(read_meta(base_entry).get("expert_routing"))}
    if imported:  # what the adapters name as their base: the user's checkpoint, nothing exported
        built["adapter_base"] = (imported.name, imported.format)
        built["adapter_revision"] = imported.commit  # a hub checkpoint: the commit it was trained on
    return entry, built, dtype
