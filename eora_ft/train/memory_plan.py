"""Per-GPU memory of fine-tuning the adapters, by process layout, from the model's own sizes.

The packed base is replicated on every GPU under DDP and DeepSpeed: its codes are buffers, which DDP copies and
DeepSpeed does not partition (ZeRO-3 shards parameters only). FSDP2 shards it (:mod:`eora_ft.train.sharding`):
each GPU keeps ``1/N`` of it plus what is gathered at once, three decoder layers' worth (the one computing,
the next one prefetched, and its flat all-gather buffer) and the LM head (Accelerate keeps it gathered from
the end of the forward to the start of the backward). Every layout also holds one dequantized weight at a
time (the largest, ``hidden x intermediate`` in the compute dtype: the shared scratch buffer). These are
estimates: allocator fragmentation and the CUDA context come on top (the warning leaves 10% for them). The layouts also change the adapters' state: DDP keeps fp32 weights, gradients and AdamW's
two moments on every GPU (16 bytes per trainable parameter); ZeRO-2 shards gradients and moments over the
GPUs; ZeRO-3 and FSDP2 the weights too. Activations: with gradient
checkpointing each decoder layer keeps its input (``tokens x hidden``) and one layer is recomputed at a time;
the fp32 logits of the whole batch (``tokens x vocab x 4``) come on top.

Used before training (:func:`check_training_memory`: a warning naming what fits instead) and by
``benchmarks/scale_bench.py --plan``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

LAYOUTS = ("ddp", "zero2", "zero3", "fsdp2")
SHARDED_WEIGHTS = ("zero3", "fsdp2")  # layouts that shard the adapters' fp32 weights
# FSDP2: the decoder layer computing, the next one being prefetched, and that one's flat all-gather buffer (it
# exists beside the per-parameter copies while they are copied out)
GATHERED_LAYERS = 3
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter
GB = 1e9
USABLE_SHARE = 0.9  # of a GPU's memory: the rest goes to the CUDA context, cuBLAS workspaces and fragmentation


@dataclass(frozen=True)
class ModelSizes:
    """What the plan needs of a model: bytes of its packed base (codes, scales, embeddings, norms), trainable
    (LoRA) parameters, decoder layers, hidden and MLP widths, vocabulary, and its activation dtype's bytes."""

    base_bytes: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2


def llama_sizes(hidden: int, kv_dim: int, intermediate: int, layers: int, vocab: int, bits: int, group_size: int,
                rank: int, dtype_bytes: int = 2) -> ModelSizes:
    """:class:`ModelSizes` of a Llama-shaped model whose seven decoder linears are packed at ``bits`` (codes, an
    fp16 scale and a uint8 zero point per ``group_size`` inputs) with a rank-``rank`` LoRA on each; untied
    embedding and LM head in the model dtype."""
    shapes = [(hidden, hidden), (hidden, kv_dim), (hidden, kv_dim), (hidden, hidden),  # (K, N) of q, k, v, o
              (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]  # gate, up, down
    per_layer = sum(k * n * bits / 8 + (k // group_size) * n * 3 for k, n in shapes) + 4 * hidden * dtype_bytes
    base = layers * per_layer + 2 * vocab * hidden * dtype_bytes
    trainable = layers * rank * sum(k + n for k, n in shapes)
    return ModelSizes(int(base), trainable, layers, hidden, intermediate, vocab, dtype_bytes)


def activation_bytes(sizes: ModelSizes, tokens: int, checkpointing: bool) -> int:
    """Bytes of activations kept for the backward of one micro-batch of ``tokens`` (batch x sequence) tokens.

    One layer's saved tensors: about ``10 x hidden + 4 x intermediate`` values per token (norms, q/k/v/o inputs
    and outputs, the MLP's gate, up, activation and product); with checkpointing only the layer inputs stay,
    plus one layer recomputed. The fp32 logits and their gradient for the loss come on top."""
    per_layer = tokens * (10 * sizes.hidden + 4 * sizes.intermediate) * sizes.dtype_bytes
    kept = sizes.layers * tokens * sizes.hidden * sizes.dtype_bytes + per_layer if checkpointing else \
        sizes.layers * per_layer
    return kept + 2 * tokens * sizes.vocab * 4


def training_memory(sizes: ModelSizes, layout: str, world_size: int, tokens: int,
                    checkpointing: bool = True) -> dict[str, float]:
    """GB per GPU: ``base``, ``adapter`` (fp32 weights), ``gradients``, ``optimizer``, ``activations``,
    ``dequantized`` (the one dense weight in flight), ``total``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; valid: {list(LAYOUTS)}")
    shards = max(1, world_size)
    weights = 4 * sizes.trainable / (shards if layout in SHARDED_WEIGHTS else 1)
    gradients = 4 * sizes.trainable / (1 if layout == "ddp" else shards)
    optimizer = ADAM_STATE_BYTES * sizes.trainable / (1 if layout == "ddp" else shards)
    plan = {"base": base_per_gpu(sizes, layout, shards) / GB, "adapter": weights / GB, "gradients": gradients / GB,
            "optimizer": optimizer / GB, "activations": activation_bytes(sizes, tokens, checkpointing) / GB,
            "dequantized": sizes.hidden * sizes.intermediate * sizes.dtype_bytes / GB}
    return plan | {"total": sum(plan.values())}


def base_per_gpu(sizes: ModelSizes, layout: str, world_size: int) -> float:
    """Bytes of the frozen base on one GPU: all of it, or under FSDP2 its ``1/world_size`` shard plus the layers and
    LM head gathered at once (the embedding and LM head counted as ``2 x vocab x hidden`` model-dtype values)."""
    if layout != "fsdp2":
        return sizes.base_bytes
    head = sizes.vocab * sizes.hidden * sizes.dtype_bytes
    layer = max(0, sizes.base_bytes - 2 * head) / max(1, sizes.layers)
    return sizes.base_bytes / max(1, world_size) + min(GATHERED_LAYERS, sizes.layers) * layer + head


def sizes_of(model: nn.Module, dtype_bytes: int) -> ModelSizes:
    """:class:`ModelSizes` of a loaded (PEFT) model: every buffer and frozen parameter is base, the rest trains."""
    from eora_ft.utils.placement import model_bytes

    config = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = model_bytes(model) - 4 * trainable
    return ModelSizes(base, trainable, config.num_hidden_layers, config.hidden_size,
                      getattr(config, "intermediate_size", 4 * config.hidden_size), config.vocab_size, dtype_bytes)


def check_training_memory(sizes: ModelSizes, layout: str, world_size: int, tokens: int, checkpointing: bool,
                          device_bytes: int, lora_r: int) -> dict[str, float]:
    """Log the plan; warn, naming the layouts and ranks that would fit, when it exceeds :data:`USABLE_SHARE` of
    ``device_bytes`` (one GPU's total memory). Returns the plan."""
    plan = training_memory(sizes, layout, world_size, tokens, checkpointing)
    logger.info("training memory per GPU (plan, %s, %d processes): %s", layout, world_size,
                ", ".join(f"{k} {v:.1f} GB" for k, v in plan.items()))
    limit = USABLE_SHARE * device_bytes / GB
    if plan["total"] <= limit:
        return plan
    fits = [f"{other} ({training_memory(sizes, other, world_size, tokens, checkpointing)['total']:.1f} GB)"
            for other in LAYOUTS if other != layout
            and training_memory(sizes, other, world_size, tokens, checkpointing)["total"] <= limit]
    lower = next((r for r in (lora_r // 2, lora_r // 4, lora_r // 8) if r >= 1 and training_memory(
        ModelSizes(**{**sizes.__dict__, "trainable": sizes.trainable * r // lora_r}), layout, world_size, tokens,
        checkpointing)["total"] <= limit), None)
    advice = [f"a layout that fits: {', '.join(fits)}" if fits else "no other layout fits",
              f"lora_r {lower} fits under {layout}" if lower else "no rank down to lora_r/8 fits"]
    if not checkpointing:
        advice.append("gradient_checkpointing: true would keep one layer's activations instead of all")
    logger.warning("fine-tuning needs about %.1f GB per GPU under %s with %d processes (base %.1f, adapters and "
                   "optimizer %.1f, activations %.1f), more than the %.1f GB usable on a GPU: %s", plan["total"], layout,
                   world_size, plan["base"], plan["adapter"] + plan["gradients"] + plan["optimizer"],
                   plan["activations"], limit, "; ".join(advice))
    return plan


def layout_of(training_args) -> str:
    """The run's process layout: DeepSpeed's ZeRO stage from ``training_args.deepspeed`` or from ``accelerate
    launch``'s DeepSpeed plugin (its environment), FSDP2 from its FSDP plugin, else DDP (one process counts as
    DDP with one GPU)."""
    import os

    from eora_ft.train.distributed import fsdp2_requested

    if fsdp2_requested():
        return "fsdp2"
    stage = None
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is not None:
        stage = config.config.get("zero_optimization", {}).get("stage")
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        return "ddp"
    return "zero3" if int(stage) == 3 else "zero2" if int(stage) >= 1 else "ddp"


def check_run_memory(model: nn.Module, training_args, world_size: int, device, lora_r: int) -> dict | None:
    """:func:`check_training_memory` for a run about to train ``model`` on the CUDA ``device``; None elsewhere."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    dtype_bytes = 2 if (training_args.bf16 or training_args.fp16) else 4
    tokens = training_args.per_device_train_batch_size * (training_args.max_length or 1024)
    return check_training_memory(sizes_of(model, dtype_bytes), layout_of(training_args), world_size, tokens,
                                 bool(training_args.gradient_checkpointing),
                                 torch.cuda.get_device_properties(device).total_memory, lora_r)
