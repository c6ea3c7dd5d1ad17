"""Write the grid of recipe configs: task x compression x initializer, for the nano model and Llama-3-8B.

    python recipes/configs/make_configs.py

tests/test_config.py checks that the committed YAML files equal what this script writes (edit here,
rerun, commit both). The hand-written demo configs (arc_nano_gptq2_*.yaml) are not generated.
"""

from __future__ import annotations

from pathlib import Path

from eora_ft.config import LLAMA_LINEARS
from eora_ft.data.heldout import DEFAULT_PPL_DATASETS

HERE = Path(__file__).resolve().parent
ASSETS = "eora_ft/assets/data"

COMPRESSIONS = {
    "gptq3": ("GPTQ 3-bit g128", {"compress_method": "gptq", "bits": 3, "group_size": 128}),
    "sparsegpt24": ("SparseGPT 2:4", {"compress_method": "sparsegpt", "sparsity": "2:4"}),
    "gptq4sparsegpt24": ("GPTQ 4-bit g128 + SparseGPT 2:4 (joint)",
                         {"compress_method": "gptq+sparsegpt", "bits": 4, "group_size": 128, "sparsity": "2:4"}),
}
INITS = {
    "qlora": "QLoRA initialisation (Kaiming A, B = 0: the adapter starts as a no-op)",
    "loftq": "LoftQ initialisation (5 alternations with this run's compressor; the base becomes LoftQ's own)",
    "eora": "EoRA initialisation (compression error in the eigenspace of the input activations)",
}
TASKS = {
    "arc": {
        "what": "fine-tuned on ARC-Challenge train, evaluated on ARC-Challenge dev + WikiText-2",
        "keys": {"task": "arc_challenge",
                 "dataset_name": f"{ASSETS}/arc/ARC-Challenge/ARC-Challenge-Train.jsonl",
                 "eval_dataset_name": f"{ASSETS}/arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"},
        "train": {"num_train_epochs": 2, "max_length": 256},
        "hub": {"task": "arc_challenge", "dataset_name": "allenai/ai2_arc", "dataset_config": "ARC-Challenge",
                "eval_dataset_name": None, "dataset_test_split": "test"},
    },
    "mathqa": {
        "what": ("fine-tuned on the first 1000 MathQA dev problems (no train split exists offline), evaluated on "
                 "the first 500 test problems + WikiText-2"),
        "keys": {"task": "mathqa", "dataset_name": f"{ASSETS}/mathqa/dev_head1000.json",
                 "eval_dataset_name": f"{ASSETS}/mathqa/test_head500.json"},
        "train": {"num_train_epochs": 1, "max_length": 256},
        "hub": {"task": "mathqa", "dataset_name": "regisss/math_qa", "eval_dataset_name": None,
                "dataset_test_split": "test"},
    },
    "gsm8k": {
        "what": ("fine-tuned on the first 1000 GSM8K train problems (full solutions), evaluated 5-shot greedy on "
                 "the first 100 test problems + WikiText-2"),
        "keys": {"task": "gsm8k", "dataset_name": f"{ASSETS}/gsm8k/train_head1000.jsonl",
                 "eval_dataset_name": f"{ASSETS}/gsm8k/test_head500.jsonl", "eval_limit": 100,
                 "eval_batch_size": 32, "max_new_tokens": 256},
        "train": {"num_train_epochs": 1, "max_length": 512},
        "hub": {"task": "gsm8k", "dataset_name": "openai/gsm8k", "dataset_config": "main", "eval_dataset_name": None,
                "dataset_test_split": "test"},
    },
}


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    if isinstance(value, float):
        return f"{value:.1e}" if value < 1e-3 else str(value)  # YAML 1.1 reads "1e-05" as a string
    if isinstance(value, str) and (":" in value or value in ("none",)):
        return f'"{value}"'
    return str(value)


def _section(title: str, keys: dict) -> list[str]:
    return [f"# {title}", *[f"{k}: {_value(v)}" for k, v in keys.items()], ""]


def _model_section(path: str, dtype: str, rank: int) -> list[str]:
    return _section("model (TRL ModelConfig)", {
        "model_name_or_path": path, "dtype": dtype, "lora_r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "lora_target_modules": LLAMA_LINEARS})


def nano_config(task: str, compression: str, init: str) -> str:
    spec, (comp_label, comp_keys) = TASKS[task], COMPRESSIONS[compression]
    name = f"{task}_nano_{compression}_{init}"
    lines = [f"# accelerate launch --config_file accelerate_configs/cpu.yaml recipes/{task}.py --config "
             f"recipes/configs/{name}.yaml",
             f"# {comp_label} on the bundled nano Llama, {INITS[init]}, rank 16,",
             f"# {spec['what']}. CPU-sized: runs offline from a fresh clone.", ""]
    lines += _model_section("eora_ft/assets/models/nano-llama-5m", "float32", 16)
    lines += _section("compression", {**comp_keys, "calib_dataset": f"{ASSETS}/c4/c4_en_train_calib900.jsonl",
                                      "calib_num_samples": 64, "calib_seq_len": 512})
    lines += _section("adapter initialisation", {"init_method": init, **({"loftq_iters": 5} if init == "loftq" else {}),
                                                 "adapter_calib_task_fraction": 0.5})
    lines += _section("task and evaluation", {**spec["keys"], "ppl_dataset": DEFAULT_PPL_DATASETS,
                                              "ppl_window": 512, "ppl_max_windows": 40})
    lines += _section("training (TRL SFTConfig)", {
        "output_dir": f"runs/{name}", **{"num_train_epochs": spec["train"]["num_train_epochs"]},
        "per_device_train_batch_size": 8, "learning_rate": 2.0e-4, "lr_scheduler_type": "cosine",
        "warmup_steps": 5, "logging_steps": 5, "save_strategy": "steps", "save_steps": 50, "save_total_limit": 2,
        "bf16": False, "gradient_checkpointing": False, "max_length": spec["train"]["max_length"],
        "report_to": "tensorboard", "seed": 0})
    return "\n".join(lines).rstrip() + "\n"


def llama3_config(task: str, compression: str, init: str) -> str:
    spec, (comp_label, comp_keys) = TASKS[task], COMPRESSIONS[compression]
    name = f"{task}_llama3_8b_{compression}_{init}"
    lines = [f"# accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/{task}.py --config "
             f"recipes/configs/{name}.yaml",
             f"# {comp_label} on Llama-3-8B (hub id, needs network or a populated HF cache), {INITS[init]}, rank 128,",
             "# compressor calibrated on C4, adapter calibrated on half C4, half task text, bf16 wherever the GPU has it (bf16 unset = auto). Rank, learning rate and epochs are our starting",
             "# point, not tuned and not run here (no GPU in these sessions); every key is one flag away.",
             ""]
    lines += _model_section("meta-llama/Meta-Llama-3-8B", "bfloat16", 128)
    lines += _section("compression", {**comp_keys, "calib_dataset": f"{ASSETS}/c4/c4_en_train_calib900.jsonl",
                                      "calib_num_samples": 128,
                                      "calib_seq_len": 2048})
    lines += _section("adapter initialisation", {"init_method": init, **({"loftq_iters": 5} if init == "loftq" else {}),
                                                 "adapter_calib_task_fraction": 0.5})
    lines += _section("task and evaluation", {**spec["hub"], "ppl_dataset": None})
    lines += _section("training (TRL SFTConfig)", {
        "output_dir": f"runs/{name}", "num_train_epochs": 3, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4, "learning_rate": 2.0e-5,
        "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "logging_steps": 10, "save_strategy": "steps",
        "save_steps": 200, "save_total_limit": 2, "gradient_checkpointing": True,
        "max_length": spec["train"]["max_length"] * 4, "report_to": "tensorboard", "seed": 0})
    return "\n".join(lines).rstrip() + "\n"


def grid() -> dict[str, str]:
    """``{file name: YAML text}`` of every generated config."""
    files = {}
    for task in TASKS:
        for compression in COMPRESSIONS:
            for init in INITS:
                files[f"{task}_nano_{compression}_{init}.yaml"] = nano_config(task, compression, init)
                files[f"{task}_llama3_8b_{compression}_{init}.yaml"] = llama3_config(task, compression, init)
    return files


if __name__ == "__main__":
    for name, text in grid().items():
        (HERE / name).write_text(text)
    print(f"wrote {len(grid())} configs to {HERE}")
