"""Every knob of a run, as dataclasses parsed by TRL's ``TrlParser`` from flat YAML + CLI flags.

The YAML keys equal the field names; a key that no dataclass has is an error. TRL's own
``ModelConfig`` (model id, dtype, ``lora_r``/``lora_alpha``/``lora_dropout``/``lora_target_modules``)
and ``SFTConfig`` (the training loop) are used as they are; what is ours lives below.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from datetime import timedelta

import torch
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from eora_ft.compress import COMPRESSORS, USES_BITS, USES_SPARSITY, PruneSpec
from eora_ft.compress.nf4 import NF4_NEEDS, nf4_available
from eora_ft.compress.quantizer import QuantSpec
from eora_ft.compress.recompress import RECOMPRESS_METHODS as MERGE_METHODS
from eora_ft.init.expert_calibration import DEFAULT_MIN_SHARE
from eora_ft.init.sequential import CAPTURE_MODES
from eora_ft.data.heldout import DEFAULT_PPL_DATASETS, heldout_texts
from eora_ft.data.task_text import TASK_TEXT_FORMATS
from eora_ft.train.distributed import configure_cpu_process_state
from eora_ft.utils.dtypes import MODEL_DTYPES
from eora_ft.init import INITIALIZERS
from eora_ft.init.eora import EIGEN_MODES
from eora_ft.init.rank_budget import NORMALISATIONS, SVD_ORDERED
from eora_ft.init.refine import REFINE_TARGETS, check_refine_target

RANK_ALLOCATIONS = ("uniform", "budget")

_ASSETS = "eora_ft/assets"
DEFAULT_MODEL = f"{_ASSETS}/models/nano-llama-5m"
_ARC_TRAIN = f"{_ASSETS}/data/arc/ARC-Challenge/ARC-Challenge-Train.jsonl"
_ARC_DEV = f"{_ASSETS}/data/arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ACTIVATION_PLACES = ("execution", "cpu")
UNCOMPRESSED = "none"  # compress_method of the ceiling: LoRA on the uncompressed model
MERGE_FORMATS = ("auto", "eora_ft", "gptq", "compressed-tensors")  # auto: the base's own (compress.formats.WRITERS)


def check_range(owner, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name``, its value and the valid interval unless ``low <= value <= high``
    (``low_open``/``high_open``: strict); ``optional`` lets None through (the field's "off" value)."""
    value = getattr(owner, name)
    if value is None and optional:
        return
    below = low is not None and (value is None or value < low or (low_open and value == low))
    above = high is not None and (value is None or value > high or (high_open and value == high))
    if below or above or (isinstance(value, float) and not math.isfinite(value)):  # nan and inf compare as inside
        interval = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
                    + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]"))
        raise ValueError(f"{name}={value!r} is out of range; valid: a number in {interval}"
                         + (" or None" if optional else ""))


def check_numbers(owner) -> None:
    """Raise ``ValueError`` naming the first float field of dataclass ``owner`` that is NaN (``--learning_rate nan``
    parses as a float, and every comparison with it is false, so range checks alone let it through)."""
    for item in dataclasses.fields(owner):
        value = getattr(owner, item.name, None)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{item.name}=nan is not a number; give a finite value (`--help` shows its meaning)")


def check_choice(owner, name: str, valid) -> None:
    """Raise ``ValueError`` naming ``name``, its value and the valid values unless the value is one of ``valid``."""
    value = getattr(owner, name)
    if value not in valid:
        listed = sorted(valid, key=str) if isinstance(valid, (set, frozenset, dict)) else list(valid)
        raise ValueError(f"{name}={value!r} is unknown; valid: {listed}")


@dataclass
class TaskArguments(ScriptArguments):
    """What to train on and evaluate. ``dataset_name`` is a hub id or a local .json/.jsonl file/dir."""

    task: str = field(default="arc_challenge",
                      metadata={"help": "Task: arc_challenge, arc_easy, mathqa, gsm8k, text (language modeling on "
                                        "plain text, judged by held-out perplexity) or sft (your own data in TRL's "
                                        "dataset types, judged by the held-out loss on its completions)."})
    dataset_name: str | None = field(
        default=_ARC_TRAIN,
        metadata={"help": "Training data: hub id (e.g. allenai/ai2_arc) or local .json/.jsonl path (task sft: also "
                          ".parquet/.csv, or a directory of them)."},
    )
    eval_dataset_name: str | None = field(
        default=_ARC_DEV,
        metadata={"help": "Evaluation data (hub id or local path); None = dataset_name with dataset_test_split."},
    )
    dataset_test_split: str = field(default="validation", metadata={"help": "Split evaluated when loading from the hub."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training items."})
    eval_limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    ppl_dataset: str | None = field(
        default=DEFAULT_PPL_DATASETS,
        metadata={"help": "Texts for perplexity, comma-separated (.txt or JSON Lines with 'text'); each metric is named "
                          "after its text (enwiki_heldout/ppl, c4_heldout/ppl, wikitext2/ppl). Default: the held-out "
                          "Wikipedia file (the nano model's own kind of text), held-out C4, WikiText-2 test. None skips."},
    )
    ppl_window: int = field(default=512, metadata={"help": "Perplexity window length in tokens."})
    ppl_max_windows: int | None = field(default=40, metadata={"help": "Use only the first N windows (None = all)."})
    ppl_after_finetune: bool = field(default=True, metadata={"help": "Also measure perplexity after fine-tuning."})
    eval_batch_size: int = field(default=32, metadata={"help": "Sequences per evaluation forward pass."})
    num_fewshot: int = field(default=5, metadata={"help": "GSM8K: solved examples before each question (lm-eval: 5)."})
    max_new_tokens: int = field(default=256, metadata={"help": "GSM8K: generation budget per answer (lm-eval: 256)."})
    eval_base: bool = field(default=True, metadata={"help": "Evaluate the uncompressed model too (the 'base' stage)."})
    eval_split_fraction: float = field(
        default=0.1, metadata={"help": "Task sft: when the data has no test split (local files, or a hub dataset without "
                                       "dataset_test_split) and no eval_dataset_name, this share of the training examples "
                                       "is held out for evaluation (never trained on)."})
    eval_split_seed: int = field(default=0, metadata={"help": "Seed of that held-out draw and of validation_fraction's "
                                                              "(the same for every training seed)."})
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Share of the training items held out as a validation split (never trained on, "
                                       "never among the reported evaluation items): the Trainer's eval loss "
                                       "(eval_strategy) is measured on it, so load_best_model_at_end picks the step and "
                                       "compare's learning_rates pick each init's rate on it. 0 = the eval loss is "
                                       "measured on the evaluation items: a curve to look at, not to choose by."})
    lm_eval_tasks: str | None = field(
        default=None, metadata={"help": "lm-evaluation-harness tasks run on each stage's in-memory model, comma-separated "
                                        "(mmlu,hellaswag,...; pip install -e '.[eval]'); their metrics join the table."})
    lm_eval_num_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples for lm_eval_tasks (None: each task's own default)."})
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "lm_eval_tasks: score only the first N documents of each task (None = all)."})
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "A directory of extra lm-eval task YAMLs (your own tasks, or local copies of "
                                        "hub tasks for offline use), added to the harness's registry."})
    divergence_patience: int = field(
        default=3, metadata={"help": "Report a run as diverged when this many consecutive logged training losses "
                                     "stay above the first one (a NaN always counts); 0 = only NaN/inf."})

    def __post_init__(self) -> None:
        check_numbers(self)
        from eora_ft.eval.tasks import TASKS  # the registry imports evaluation code: keep config import light

        check_choice(self, "task", TASKS)
        if self.task == "sft":  # the ARC defaults are no data of yours: `--task sft --dataset_name X` holds out a share
            if self.dataset_name == _ARC_TRAIN:
                self.dataset_name = f"{_ASSETS}/data/{TASKS['sft'].bundled_train}"
            if self.eval_dataset_name == _ARC_DEV:
                self.eval_dataset_name = None
        if self.num_fewshot < 0 or self.max_new_tokens < 1:
            raise ValueError(f"num_fewshot={self.num_fewshot} must be >= 0 and max_new_tokens={self.max_new_tokens} >= 1")
        if self.ppl_window < 2:
            raise ValueError(f"ppl_window={self.ppl_window} must be at least 2")
        check_range(self, "eval_batch_size", 1)
        check_range(self, "divergence_patience", 0)
        for name in ("train_limit", "eval_limit", "ppl_max_windows", "lm_eval_limit"):
            check_range(self, name, 1, optional=True)
        check_range(self, "eval_split_fraction", 0, 1, low_open=True, high_open=True)
        check_range(self, "validation_fraction", 0, 1, high_open=True)
        check_range(self, "lm_eval_num_fewshot", 0, optional=True)
        heldout_texts(self.ppl_dataset)  # two texts with one metric name


@dataclass
class CompressionArguments:
    """How the base model is compressed and which calibration data feeds the statistics."""

    compress_method: str = field(default="gptq", metadata={"help": f"One of {sorted(COMPRESSORS)}, or {UNCOMPRESSED!r} "
                                                                   "(no compression: the plain-LoRA ceiling)."})
    bits: int = field(default=2, metadata={"help": "Bits per weight: 2, 3, 4 or 8."})
    group_size: int = field(default=128, metadata={"help": "Group length along in_features; -1 = per channel."})
    sym: bool = field(default=False, metadata={"help": "Symmetric grid (zero point in the middle)."})
    grid_search: bool = field(default=False, metadata={"help": "Shrink each group's min-max grid to the least |error|^2.4 "
                                                                "(IST-DASLab/gptq's mse option)."})
    damp_percent: float = field(default=0.01, metadata={"help": "GPTQ damping, relative to mean(diag(H))."})
    act_order: bool | None = field(
        default=None,
        metadata={"help": "GPTQ: visit columns by decreasing Hessian diagonal (static groups, so no reordering at "
                          "inference). None = the method's default: on for gptq (chosen by measurement, BENCHMARKS.md), "
                          "unused by the others."},
    )
    true_sequential: bool = field(default=False, metadata={
        "help": "Compress q/k/v, then o, then gate/up, then down, re-collecting statistics from the partly compressed "
                "layer (GPTQModel's default); false: every linear's statistics from one pass (llm-compressor's "
                "scheme, a quarter faster, no worse on held-out text: BENCHMARKS.md)."})
    expert_min_share: float = field(default=DEFAULT_MIN_SHARE, metadata={
        "help": "Mixture-of-experts models: an expert routed fewer calibration tokens than this share of its uniform "
                "share (routed tokens / experts) is calibrated on every token reaching its block (llm-compressor's "
                "calibrate_all_experts, for that expert only); 0 = only experts routed no token. Logged per layer."})
    sparsity: str = field(default="2:4", metadata={"help": "sparsegpt / wanda / gptq+sparsegpt: 2:4, 4:8 or a ratio such as 0.5."})
    calib_dataset: str = field(
        default=f"{_ASSETS}/data/c4/c4_en_train_calib900.jsonl",
        metadata={"help": "Calibration text: local .jsonl (text field) / .txt or hub id; several, comma-separated, share the rows."},
    )
    calib_num_samples: int = field(default=64, metadata={"help": "Calibration sequences."})
    calib_task_dataset: str | None = field(default=None, metadata={"help": "Task data for the calibration mix (default: the recipe's training data)."})
    calib_task_format: str = field(default="arc", metadata={"help": "Schema of calib_task_dataset: arc, gsm8k or mathqa."})
    calib_task_fraction: float = field(default=0.0, metadata={"help": "Share of calibration sequences made of the task's training text (the EoRA paper: about 0.5)."})
    calib_seq_len: int = field(default=512, metadata={"help": "Tokens per calibration sequence."})
    calib_seed: int = field(default=0, metadata={"help": "Seed for drawing calibration windows."})
    calib_batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass while compressing."})
    execution_device: str = field(
        default="auto",
        metadata={"help": "Where each decoder layer is compressed and initialised, one layer at a time: auto (this "
                          "rank's accelerator, else cpu), cpu, cuda or cuda:N. The model stays where it was loaded "
                          "(the CPU), so a 70B model compresses on one GPU."},
    )
    calib_activations_device: str = field(
        default="execution",
        metadata={"help": "Where the calibration activations live between layers: execution (on the execution "
                          "device, fastest) or cpu (for long calibration sets on a small accelerator)."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Artifact cache (compressed base + initial adapter, keyed by content); "
                          "None = $EORA_FT_CACHE or ~/.cache/eora_ft."},
    )
    merge: bool = field(default=False, metadata={
        "help": "After training, fold the adapter into the compressed base (eora-ft merge) into output_dir/merged."})
    merge_method: str = field(default="recompress", metadata={
        "help": "recompress: W_c + s B A re-quantized by GPTQ onto the base's own grid on the adapted model's "
                "activations (2:4 masks kept); regrid: the same with fresh grids; round: the naive merge onto the "
                "base's grid, no data (for comparison)."})
    merge_residual_rank: int = field(default=0, metadata={
        "help": "k > 0: also an EoRA adapter of rank k for what the merge lost, W' - Q(W'), beside the merged base."})
    merge_format: str = field(default="auto", metadata={
        "help": "Format of the merged base: auto (the base's own), eora_ft, gptq or compressed-tensors."})

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.compress_method not in COMPRESSORS and self.compress_method != UNCOMPRESSED:
            raise ValueError(f"compress_method={self.compress_method!r} is unknown; valid: "
                             f"{sorted(COMPRESSORS) + [UNCOMPRESSED]}")
        if self.compress_method == "nf4" and not nf4_available():
            raise ValueError(f"compress_method='nf4': {NF4_NEEDS}")
        if self.compress_method == UNCOMPRESSED:  # the ceiling: compression options have nothing to act on
            self.act_order = self.grid_search = False
        if self.compress_method in USES_BITS:
            QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym)  # validates bits / group size
        elif self.grid_search:
            raise ValueError(f"grid_search=True chooses quantization grids; compress_method={self.compress_method!r} "
                             "does not quantize")
        if self.compress_method in USES_SPARSITY:
            PruneSpec.parse(self.sparsity)
        if not 0.0 <= self.expert_min_share <= 1.0:
            raise ValueError(f"expert_min_share={self.expert_min_share} must lie in [0, 1] (a share of an expert's "
                             "uniform share of the routed calibration tokens; 0 = only experts routed none)")
        if self.act_order is None:
            self.act_order = self.compress_method == "gptq"
        if self.act_order and self.compress_method != "gptq":
            raise ValueError(f"act_order=True is a GPTQ option; compress_method={self.compress_method!r} does not use it")
        check_choice(self, "calib_task_format", TASK_TEXT_FORMATS)
        check_choice(self, "merge_method", MERGE_METHODS)
        check_choice(self, "merge_format", MERGE_FORMATS)
        check_range(self, "merge_residual_rank", 0)
        if self.merge and self.compress_method in (UNCOMPRESSED, "nf4"):
            raise ValueError(f"merge=True folds the adapter into integer or 2:4 storage; compress_method="
                             f"{self.compress_method!r} has none (an adapter over an uncompressed or NF4 base merges "
                             "with PEFT's merge_and_unload())")
        if self.merge and self.merge_format in ("gptq", "compressed-tensors") and self.compress_method not in USES_BITS:
            raise ValueError(f"merge_format={self.merge_format!r} holds integer codes; compress_method="
                             f"{self.compress_method!r} prunes without quantizing: use merge_format eora_ft or auto")
        if self.merge and self.merge_format == "compressed-tensors" and not self.sym:
            raise ValueError("merge_format='compressed-tensors' loads in transformers for symmetric grids only: set "
                             "sym: true, or use merge_format gptq or eora_ft")
        if not 0.0 <= self.calib_task_fraction <= 1.0:
            raise ValueError(f"calib_task_fraction={self.calib_task_fraction} must lie in [0, 1]")
        check_choice(self, "calib_activations_device", ACTIVATION_PLACES)
        if self.execution_device != "auto":
            try:
                kind = torch.device(self.execution_device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"execution_device={self.execution_device!r} is not valid; valid: auto, cpu, cuda, cuda:N")
        check_range(self, "damp_percent", 0, 1, low_open=True, high_open=True)  # GPTQModel's bounds
        check_range(self, "calib_batch_size", 1)
        if self.calib_num_samples < 1 or self.calib_seq_len < 2:
            raise ValueError(
                f"calib_num_samples={self.calib_num_samples} and calib_seq_len={self.calib_seq_len} must be >= 1 and >= 2"
            )

    @property
    def calib_tokens(self) -> int:
        return self.calib_num_samples * self.calib_seq_len

    def placement(self, accelerator: torch.device) -> tuple[torch.device, torch.device]:
        """``(execution device, activations device)`` for :func:`eora_ft.init.sequential.compress_model`;
        ``accelerator`` is this rank's device (what ``auto`` means)."""
        execution = torch.device(accelerator if self.execution_device == "auto" else self.execution_device)
        return execution, (execution if self.calib_activations_device == "execution" else torch.device("cpu"))

    def compressor_options(self) -> dict:
        """Keyword options for :func:`eora_ft.compress.make_compressor` (each method reads its own)."""
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "grid_search": self.grid_search,
                "damp_percent": self.damp_percent,
                "act_order": self.act_order, "sparsity": self.sparsity}

    def describe(self) -> str:
        """Short human label, e.g. ``gptq 2-bit g128`` or ``sparsegpt 2:4``."""
        if self.compress_method == UNCOMPRESSED:
            return "none (uncompressed)"
        parts = [self.compress_method]
        if self.compress_method in USES_BITS:
            parts.append(f"{self.bits}-bit g{self.group_size}" + (" act-order" if self.act_order else ""))
        if self.compress_method in USES_SPARSITY:
            parts.append(self.sparsity)
        return " ".join(parts)


@dataclass
class AdapterInitArguments:
    """How the LoRA factors start (rank and alpha come from TRL's ``ModelConfig.lora_r``/``lora_alpha``)."""

    init_method: str = field(default="eora", metadata={"help": f"One of {sorted(INITIALIZERS)}."})
    eora_eigen_mode: str = field(default="inverse_free", metadata={"help": f"EoRA eigenvalue handling: {list(EIGEN_MODES)}."})
    eora_shrink: float = field(default=0.0, metadata={"help": "Covariance shrinkage to a scaled identity: 0 = EoRA, 1 = SVD."})
    loftq_iters: int = field(default=5, metadata={"help": "LoftQ alternations (1 = svd on the plain compression error)."})
    eora_alt_iters: int = field(
        default=2, metadata={"help": "eora_alt: alternations of compress(W - B A) and EoRA after plain EoRA (0 = eora); "
                                     "the best iterate by calibration objective is kept, with its base."})
    factor_bits: int | None = field(default=None, metadata={"help": "Round A and B to 4 or 3 bits (None = fp32)."})
    capture: str = field(default="compressed", metadata={"help": "Statistics from the compressed prefix, or 'compensated'."})
    trim_rank: bool = field(default=False, metadata={"help": "Give layers with vanishing singular values their effective rank (rank_pattern)."})
    adapter_calib_dataset: str | None = field(
        default=None,
        metadata={"help": "Generic text of the initializer's calibration (the compressor's is calib_dataset); "
                          "None = calib_dataset. Comma-separated sources share the rows."})
    adapter_calib_num_samples: int | None = field(
        default=None, metadata={"help": "Sequences of the initializer's calibration (None = calib_num_samples)."})
    rank_allocation: str = field(
        default="uniform",
        metadata={"help": "uniform: every linear gets lora_r; budget: per-linear ranks spending the same adapter "
                          "parameters (or rank_budget) where the output error drops most (eora, act_diag, svd)."})
    rank_budget: int | None = field(
        default=None, metadata={"help": "Adapter parameters for rank_allocation: budget (None = what lora_r on "
                                        "every linear uses)."})
    rank_max_factor: int = field(
        default=4, metadata={"help": "rank_allocation: budget gives a linear at most this many times lora_r."})
    rank_normalisation: str = field(
        default="relative",
        metadata={"help": "rank_allocation: budget compares relative output errors (||E X^T||^2 / ||W X^T||^2 per "
                          "linear) or absolute ones."})
    refine_steps: int = field(
        default=0,
        metadata={"help": "After initialising: AdamW steps training only A and B so the compressed model's hidden "
                          "states (refine_target) match the uncompressed model's on the adapter calibration text "
                          "(RILQ); 0 = off. Cached with the init."})
    refine_target: str = field(
        default="final",
        metadata={"help": f"What refine_steps matches, one of {list(REFINE_TARGETS)}: the decoder's final hidden states, "
                          "or every decoder layer's output (num_layers times the teacher memory)."})
    refine_learning_rate: float = field(
        default=1e-3, metadata={"help": "Learning rate of refine_steps (1e-3 beat 1e-4 on the nano model: BENCHMARKS.md)."})
    refine_micro_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per refinement forward/backward (None: the whole calib_batch_size batch; "
                                        "halved automatically when a step runs out of memory). The step's gradient is "
                                        "the whole batch's either way."})
    init_from_adapter: str | None = field(
        default=None,
        metadata={"help": "Start from this existing PEFT LoRA adapter directory (e.g. a GPTQModel EoRA adapter made "
                          "for this compressed base) instead of computing one: its rank, alpha and factors are kept, "
                          "init_method and lora_r/lora_alpha are not used."})
    adapter_calib_task_fraction: float = field(
        default=0.5,
        metadata={"help": "Share of the initializer's calibration made of the task's training text (the EoRA paper "
                          "and GPTQModel's adapter_calibration_dataset: about half task data, half generic text)."})

    def __post_init__(self) -> None:
        check_numbers(self)
        check_choice(self, "init_method", INITIALIZERS)
        check_choice(self, "eora_eigen_mode", EIGEN_MODES)
        if not 0.0 <= self.eora_shrink <= 1.0:
            raise ValueError(f"eora_shrink={self.eora_shrink} must lie in [0, 1]")
        check_range(self, "eora_alt_iters", 0)
        check_range(self, "refine_steps", 0)
        check_range(self, "refine_learning_rate", 0, low_open=True)
        check_range(self, "refine_micro_batch_size", 1, optional=True)
        check_refine_target(self.refine_target)
        if self.loftq_iters < 1:
            raise ValueError(f"loftq_iters={self.loftq_iters} must be >= 1")
        if self.factor_bits not in (None, 3, 4, 8):
            raise ValueError(f"factor_bits={self.factor_bits} is not supported; valid: None, 3, 4, 8")
        check_choice(self, "capture", CAPTURE_MODES)
        if not 0.0 <= self.adapter_calib_task_fraction <= 1.0:
            raise ValueError(f"adapter_calib_task_fraction={self.adapter_calib_task_fraction} must lie in [0, 1]")
        check_choice(self, "rank_allocation", RANK_ALLOCATIONS)
        if self.rank_allocation == "budget" and self.init_method not in SVD_ORDERED:
            raise ValueError(f"rank_allocation='budget' truncates SVD-ordered factors; init_method="
                             f"{self.init_method!r} is not one: use one of {sorted(SVD_ORDERED)}")
        check_choice(self, "rank_normalisation", NORMALISATIONS)
        check_range(self, "rank_budget", 1, optional=True)
        check_range(self, "rank_max_factor", 1)
        if self.init_from_adapter is not None:
            directory = Path(os.path.expanduser(self.init_from_adapter))
            missing = [name for name in ("adapter_config.json", "adapter_model.safetensors")
                       if not (directory / name).is_file()]
            if missing:
                raise FileNotFoundError(f"init_from_adapter={self.init_from_adapter!r} is not a PEFT adapter directory: "
                                        f"missing {missing} (save_pretrained writes both)")
        if self.adapter_calib_num_samples is not None and self.adapter_calib_num_samples < 1:
            raise ValueError(f"adapter_calib_num_samples={self.adapter_calib_num_samples} must be >= 1 (or None: "
                             "calib_num_samples)")

    def options(self) -> dict[str, dict]:
        """Per-initializer keyword options for :func:`eora_ft.init.sequential.compress_model`."""
        eora = {"eigen_mode": self.eora_eigen_mode, "shrink": self.eora_shrink}
        return {"eora": eora, "eora_alt": eora | {"iters": self.eora_alt_iters}, "loftq": {"iters": self.loftq_iters}}


def report_integrations(value) -> str | list[str]:
    """``report_to`` as users write it (``none``, ``None``, ``tensorboard``, ``"tensorboard,wandb"``, a list, ``all``)
    as every transformers release in our range takes it: ``"none"``, ``"all"`` or a list of integration names.
    Unknown or uninstalled integrations are refused here, before any work (the Trainer would refuse them only
    after compression)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    given = [value] if value is None or isinstance(value, str) else list(value)
    parts = [part.strip().lower() for item in given if item is not None for part in str(item).split(",")]
    names = [part for part in parts if part]
    if not names or names == ["none"]:
        return "none"
    if names == ["all"]:
        return "all"
    if len(names) > 1 and {"none", "all"} & set(names):
        raise ValueError(f"report_to={value!r}: 'none' and 'all' stand alone; give one of them, or a list of "
                         f"integrations from {sorted(INTEGRATION_TO_CALLBACK)}")
    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ValueError(f"report_to={value!r}: unknown integration(s) {unknown}; valid: none, all, or any of "
                         f"{sorted(INTEGRATION_TO_CALLBACK)}")
    missing = [name for name in names if name not in get_available_reporting_integrations()]
    if missing:
        raise ValueError(f"report_to={value!r}: {missing} not installed (pip install {' '.join(missing)}), or use "
                         f"report_to: none")
    return list(dict.fromkeys(names))


@dataclass
class EoraSFTConfig(SFTConfig):
    """TRL's SFTConfig with defaults that work on any machine: bf16 only where the GPU supports it."""

    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None = on iff a bf16-capable GPU."})
    # a list default (not a string): HfArgumentParser gives a list field only a default_factory's value, and the
    # None it used instead became [None] in transformers 5.24's TrainingArguments
    report_to: str | list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Logging integrations: tensorboard (default), wandb, mlflow, ... (several: a list or "
                          "comma-separated), all (every installed one) or none."})
    ddp_broadcast_buffers: bool | None = field(
        default=False, metadata={"help": "The packed base lives in frozen buffers: no need to re-broadcast them every step."})
    main_process_timeout: int = field(
        default=48 * 3600,
        metadata={"help": "Seconds the other ranks wait (polling a file, not in a collective) while the main process "
                          "loads, evaluates and compresses; ddp_timeout only bounds collectives (each training step)."},
    )

    def __post_init__(self) -> None:
        check_numbers(self)
        # Checked here, not by the optimizer after compression and two evaluations have run.
        check_range(self, "learning_rate", 0, low_open=True)
        check_range(self, "weight_decay", 0)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_range(self, name, 1)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs} with max_steps={self.max_steps} trains "
                             "nothing; valid: num_train_epochs > 0, or max_steps >= 1")
        check_range(self, "max_length", 2, optional=True)
        self.report_to = report_integrations(self.report_to)
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.main_process_timeout <= 0 or self.ddp_timeout <= 0:
            raise ValueError(f"main_process_timeout={self.main_process_timeout} and ddp_timeout={self.ddp_timeout} "
                             "must be positive numbers of seconds")
        if configure_cpu_process_state(timeout=timedelta(seconds=self.ddp_timeout)) is not None:
            # Without CUDA the Trainer's own state would be "rank 0 of 1" on every rank (distributed.py).
            accel = self.accelerator_config
            accel = json.loads(accel) if isinstance(accel, str) else dict(accel or {})
            self.accelerator_config = accel | {"use_configured_state": True}
        super().__post_init__()


@dataclass
class EoraModelConfig(ModelConfig):
    """TRL's ModelConfig defaulting to the bundled nano model and the Llama projection names."""

    model_name_or_path: str | None = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local directory."})
    compressed_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A model someone already compressed (local directory or hub id: a GPTQ checkpoint from GPTQModel or "
                "AutoGPTQ, v1 or v2, or llm-compressor's compressed-tensors pack-quantized), of model_name_or_path: "
                "compression is skipped and the initialization is computed from the pair."})
    # declared here, not inherited: TRL's default is "float32" (282 GB of host memory for a 70B model)
    dtype: str = field(default="auto", metadata={
        "help": f"dtype the model is loaded in: one of {list(MODEL_DTYPES)} (auto: the checkpoint's own on an "
                "accelerator, float32 on a CPU)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: list(LLAMA_LINEARS),
        metadata={"help": "Linear names to compress and adapt, or all-linear (every linear of the decoder layers)."}
    )

    def __post_init__(self) -> None:
        check_numbers(self)
        super().__post_init__()
        if isinstance(self.lora_target_modules, str):
            # TRL unwraps a one-name list into a string (PEFT reads a string as a regex); names are matched
            # exactly here, and "v_proj" in "qkv_proj" must not be a match
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_target_modules == ["all-linear"]:
            self.lora_target_modules = None  # PEFT's and TRL's spelling of "every linear of the decoder layers"
        check_range(self, "lora_r", 1)  # the upper bound depends on the layers: checked once the model is loaded
        check_range(self, "lora_alpha", 0, low_open=True)
        check_range(self, "lora_dropout", 0, 1, high_open=True)
        check_choice(self, "dtype", MODEL_DTYPES)
        unsupported = [name for name in ("use_dora", "load_in_4bit", "load_in_8bit") if getattr(self, name)]
        if unsupported:
            raise ValueError(f"{unsupported[0]}=True is not supported by eora_ft (the base is compressed by "
                             "compress_method, nf4 among them, and the adapters are plain LoRA); set it to False")


RECIPE_DATACLASSES = (TaskArguments, CompressionArguments, AdapterInitArguments, EoraSFTConfig, EoraModelConfig)


def make_parser(extra: tuple = ()) -> TrlParser:
    """The parser every recipe uses: ``--config file.yaml`` plus flag overrides (``extra``: more dataclasses)."""
    return TrlParser(RECIPE_DATACLASSES + tuple(extra))


def parse_strictly(parser: TrlParser, args: list[str] | None, prog: str) -> tuple:
    """``parser.parse_args_and_config(args)`` (default ``sys.argv[1:]``) that refuses flags and config keys no
    dataclass has with one message naming each and the closest valid names (argparse's own says neither)."""
    *parsed, unknown = parser.parse_args_and_config(args=args, return_remaining_strings=True)
    if unknown:
        valid = sorted({option.lstrip("-").replace("-", "_") for action in parser._actions
                        for option in action.option_strings if option.startswith("--")} | {"config"})
        names = [token.split("=", 1)[0].lstrip("-") for token in unknown if token.startswith("-")] or unknown
        described = []
        for name in names:
            close = difflib.get_close_matches(name.replace("-", "_"), valid, n=3, cutoff=0.6)
            described.append(f"{name!r}" + (f" (closest: {', '.join(close)})" if close else ""))
        raise ValueError(f"{prog}: unknown argument(s) {'; '.join(described)}: no flag or config key has that name "
                         "(--help lists the valid ones)")
    return tuple(parsed)


def parse_recipe_args(args: list[str] | None = None, extra: tuple = ()):
    """Parse ``args`` (default ``sys.argv[1:]``) into the five recipe dataclasses (then ``extra``); unknown keys raise."""
    return parse_strictly(make_parser(extra), args, "recipe")


def check_validation(task_args: TaskArguments, training_args: EoraSFTConfig) -> None:
    """Fail where the evaluation items would choose what the table reports, or a validation split would go unused.

    ``load_best_model_at_end`` keeps the step with the best eval loss; that loss must come from
    ``validation_fraction``'s split, not from the evaluation items the results report (choosing on the test)."""
    evaluates = str(training_args.eval_strategy).split(".")[-1].lower() != "no"
    if task_args.validation_fraction > 0 and not evaluates:
        raise ValueError(f"validation_fraction={task_args.validation_fraction:g} holds out training items for the "
                         "Trainer's eval loss, but eval_strategy is 'no': set eval_strategy: steps (with eval_steps), "
                         "or validation_fraction: 0")
    if training_args.load_best_model_at_end and task_args.validation_fraction == 0:
        raise ValueError("load_best_model_at_end=True would pick the step on the evaluation items the results report "
                         "(choosing on the test set): set validation_fraction (e.g. 0.1) to choose on a split of the "
                         "training data, or load_best_model_at_end: false")
    metric = training_args.metric_for_best_model
    if training_args.load_best_model_at_end and metric not in (None, "loss", "eval_loss"):
        raise ValueError(f"metric_for_best_model={metric!r}: the Trainer's evaluation here computes only the loss on "
                         "the validation split; valid: eval_loss (or unset)")


def check_compatible(compress_args: CompressionArguments, init_args: AdapterInitArguments) -> None:
    """Fail on settings that are valid alone but not together (before any work)."""
    if compress_args.compress_method == UNCOMPRESSED and init_args.init_from_adapter:
        raise ValueError("init_from_adapter starts from an adapter made for a compressed base; compress_method="
                         f"{UNCOMPRESSED!r} has none: set compress_method, or drop init_from_adapter")
    if compress_args.compress_method == UNCOMPRESSED and init_args.init_method != "qlora":
        raise ValueError(f"compress_method={UNCOMPRESSED!r} has no compression error to initialise from; "
                         f"init_method={init_args.init_method!r} needs one: use init_method='qlora' (plain LoRA, B = 0)")
