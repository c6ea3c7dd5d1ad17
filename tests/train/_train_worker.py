"""One rank of a small training run through :func:`eora_ft.train.trainer.train_adapters` (run as a subprocess).

    python tests/train/_train_worker.py SPEC.json

SPEC: ``output_dir`` (``{rank}`` is replaced by this rank's index: per-node directories), ``max_steps``,
``save_on_each_node``, ``report`` (a JSON file per rank, ``{rank}`` replaced). The launcher sets the
usual RANK/WORLD_SIZE/MASTER_* variables (and ACCELERATE_USE_DEEPSPEED for DeepSpeed). The model is
the bundled nano Llama with every decoder linear RTN-compressed to 4 bits and rank-2 PEFT adapters;
the report holds the checkpoint it resumed from, the logged losses, the DDP wrapper's
``find_unused_parameters``, the packed base's and the adapters' bytes (and the packed bytes this rank still
holds after training: its shards under FSDP2), the training backend, the gathered adapters of a sharded
run, or the error that stopped the rank.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_compressed_peft_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
    from eora_ft.compress import make_compressor
    from eora_ft.init.sequential import compress_model

    path = ROOT / "eora_ft" / "assets" / "models" / "nano-llama-5m"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    compress_model(model, ids, make_compressor("rtn", bits=4, group_size=128), [], target_modules=LINEARS,
                   batch_size=2, progress=False)
    torch.manual_seed(0)  # PEFT's Kaiming init of A: the same adapters on every rank and in every run
    return build_lora_model(model, None, lora_config(2, 2, 0.0, LINEARS)), tokenizer


def dataset():
    import datasets

    words = ["red", "green", "blue", "small", "large", "quick", "slow", "warm"]
    rows = [{"prompt": f"Question: which word comes after {words[i % 8]}?\nAnswer:",
             "completion": f" {words[(i + 1) % 8]}"} for i in range(32)]
    return datasets.Dataset.from_list(rows)


def packed_bytes(model) -> int:
    from eora_ft.compress import CompressedLinear

    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, CompressedLinear)
               for b in m.buffers())


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    report = Path(spec["report"].format(rank=rank))
    outcome = {"rank": rank}
    try:
        from eora_ft.config import EoraSFTConfig
        from eora_ft.train import trainer as trainer_module
        from eora_ft.train.distributed import full_model_init, gather_trainable
        from eora_ft.train.sharding import packed_bytes_here
        from eora_ft.train.trainer import training_backend

        decided = []
        agree = trainer_module.agree_on_resume
        trainer_module.agree_on_resume = lambda *a, **kw: decided.append(agree(*a, **kw)) or decided[-1]
        args = EoraSFTConfig(
            output_dir=spec["output_dir"].format(rank=rank), max_steps=spec["max_steps"], save_strategy="steps",
            save_steps=2, save_on_each_node=spec.get("save_on_each_node", False), logging_steps=1,
            per_device_train_batch_size=2, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
            report_to="none", seed=0, data_seed=0, max_length=32, disable_tqdm=True, ddp_timeout=120)
        with full_model_init():  # as the recipes build it: whole, and ZeRO-3 shards it in the Trainer
            model, tokenizer = tiny_compressed_peft_model()
        outcome["packed_bytes"] = packed_bytes(model)
        outcome["trainable_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        trainer = trainer_module.train_adapters(model, tokenizer, dataset(), args)
        outcome["resumed_from"] = decided[0]
        outcome["losses"] = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        outcome["find_unused_parameters"] = getattr(trainer.model_wrapped, "find_unused_parameters", None)
        outcome["args_untouched"] = args.ddp_find_unused_parameters is None
        outcome["packed_bytes_here"] = packed_bytes_here(trainer.model)
        outcome["training_backend"] = training_backend(trainer)
        outcome["trained"] = {name: tensor.tolist() for name, tensor in (gather_trainable(trainer.model) or {}).items()}
    except Exception as err:  # the test asserts on the message each rank stopped with
        outcome["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    report.write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1])
