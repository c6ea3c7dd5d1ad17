"""Merge a trained adapter into its compressed base, so one compressed checkpoint serves with no LoRA path.

For every adapted linear the target is ``W' = W_c + s B A`` (``s = lora_alpha / r``, PEFT's scaling). Rounding
``W'`` onto the base's grid (``round``, the naive merge) loses most of the correction: a grid step is larger than
most entries of ``s B A``. ``recompress`` instead re-compresses ``W'`` with the base's own compressor (GPTQ, or
the OBS sweep over the base's fixed keep-mask for a pruned base) on the statistics of the adapted model's own
activations: the same layer-by-layer driver as compression (:func:`eora_ft.init.sequential.compress_model`),
one decoder layer at a time on ``execution_device``, each layer fed the already merged prefix (GPTQ's
sequential scheme). With ``residual_rank`` k, the driver also factors what the re-compression lost,
``W' - Q(W')``, with EoRA on those statistics: a small adapter served beside the merged base.

The merged linears keep the storage of the layers they replace (bits, group size, grid symmetry, 2:4 mask), so
a merged base is written by the same writers and read by the same loaders as any compressed base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from eora_ft.compress.linear import CompressedLinear, set_module
from eora_ft.compress.recompress import RECOMPRESS_METHODS, recompressor_for
from eora_ft.init import LowRankFactors, check_rank
from eora_ft.init.sequential import compress_model, find_decoder_layers


@dataclass
class LoraDelta:
    """One adapted linear's correction ``scaling * B @ A``: ``a`` ``[r, K]``, ``b`` ``[N, r]``, on the adapter's
    device and dtype."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def dense(self, device: torch.device) -> torch.Tensor:
        """``scaling * B @ A`` ``[N, K]`` fp32 on ``device``."""
        a, b = self.a.to(device=device, dtype=torch.float32), self.b.to(device=device, dtype=torch.float32)
        return self.scaling * (b @ a)


def adapter_deltas(peft_model: PeftModel) -> tuple[nn.Module, dict[str, LoraDelta]]:
    """``(the base model with the LoRA layers removed, {module path in it: LoraDelta})`` for the single active
    adapter of ``peft_model``. Refuses what a merge cannot express: several adapters, DoRA and other variants,
    LoRA biases, an adapted linear that is not compressed."""
    active = list(peft_model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"merge needs exactly one active adapter, found {active}")
    adapter = active[0]
    deltas = {}
    for path, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.lora_variant.get(adapter) is not None or getattr(module, "lora_bias", {}).get(adapter):
            raise ValueError(f"{path}: adapter {adapter!r} is a LoRA variant (DoRA, LoRA bias): its correction is not "
                             "scaling * B @ A, which is what a merge folds in")
        if not isinstance(module.get_base_layer(), CompressedLinear):
            raise ValueError(f"{path} adapts a {type(module.get_base_layer()).__name__}, not a compressed linear: "
                             "merge folds adapters into compressed bases (eora_ft, GPTQ or compressed-tensors)")
        deltas[path] = LoraDelta(module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                                 float(module.scaling[adapter]))
    if not deltas:
        raise ValueError("the adapter adapts no linear of the model: nothing to merge")
    return peft_model.unload(), deltas


class _Merger:
    """The driver's compressor for a merge: before each decoder layer is compressed, its adapted linears become
    dense ``nn.Linear(W')`` in fp32 (one layer at a time: never a dense copy of the model), each with the
    compressor that stores it as its base layer was stored (:func:`~eora_ft.compress.recompress.recompressor_for`)."""

    def __init__(self, prefix: str, deltas: dict[str, LoraDelta], how: str, recorded: dict) -> None:
        self.prefix, self.deltas, self.how, self.recorded = prefix, dict(deltas), how, recorded
        self.needs_stats = how != "round"  # the naive merge reads no data
        self.compressors: dict = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def before_layer(self, index: int, layer: nn.Module) -> None:
        start = f"{self.prefix}.{index}."
        for path in [p for p in self.deltas if p.startswith(start)]:
            name = path[len(start):]
            base = layer.get_submodule(name)
            target = base.dequantize(torch.float32) + self.deltas.pop(path).dense(base.device)
            self.compressors[path] = recompressor_for(base, target, self.how, self.recorded)
            self.dtypes[path] = base.compute_dtype
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=torch.float32,
                              device=base.device)
            dense.weight.data.copy_(target)
            if base.bias is not None:
                dense.bias.data.copy_(base.bias.detach().to(torch.float32))
            dense.requires_grad_(False)
            set_module(layer, name, dense)

    def for_linear(self, path: str):
        return self.compressors.pop(path)


@dataclass
class MergeResult:
    """The merged model (``CompressedLinear`` layers, in place of the PEFT model's base), the residual factors
    ``{path: LowRankFactors}`` (empty without ``residual_rank``), the driver's per-linear rows and seconds."""

    model: nn.Module
    residual: dict[str, LowRankFactors] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    merged: list[str] = field(default_factory=list)


def merge_adapter(peft_model: PeftModel, calib_ids: torch.Tensor, how: str = "recompress", residual_rank: int = 0,
                  recorded: dict | None = None, batch_size: int = 8, progress: bool = True,
                  execution_device: torch.device | str | None = None,
                  activations_device: torch.device | str | None = None) -> MergeResult:
    """Fold ``peft_model``'s adapter into its compressed base, layer by layer (consumes ``peft_model``).

    Args:
        calib_ids: int64 ``[samples, seq_len]`` calibration tokens, any device (unused by ``round`` without a
            residual: that merge reads no data).
        how: ``recompress`` (re-compress ``W'`` on the adapted model's activations) or ``round`` (naive).
        residual_rank: k > 0 also factors ``W' - Q(W')`` with EoRA at rank k (:attr:`MergeResult.residual`).
        recorded: the base's ``compression_config`` (method and options; None or empty for another tool's base).
        execution_device / activations_device: as for :func:`~eora_ft.init.sequential.compress_model`.
    """
    if how not in RECOMPRESS_METHODS:
        raise ValueError(f"merge_method={how!r} is not valid; choose one of {list(RECOMPRESS_METHODS)}")
    if residual_rank < 0:
        raise ValueError(f"merge_residual_rank={residual_rank} must be >= 0 (0: no residual adapter)")
    model, deltas = adapter_deltas(peft_model)
    prefix, layers = find_decoder_layers(model)
    outside = sorted(path for path in deltas if not path.startswith(f"{prefix}."))
    if outside:
        raise ValueError(f"the adapter adapts linears outside the decoder layers ({outside[:3]}): merge folds "
                         "adapters into the compressed decoder linears only")
    bare = sorted(set(range(len(layers))) - {int(path[len(prefix) + 1:].split(".", 1)[0]) for path in deltas})
    if bare:  # the driver compresses every decoder layer it walks through (PEFT's layers_to_transform)
        raise ValueError(f"the adapter adapts no linear of decoder layers {bare[:8]}: merge needs an adapted linear "
                         "in every decoder layer")
    if residual_rank:
        for path in deltas:
            linear = model.get_submodule(path)
            check_rank(residual_rank, linear.in_features, linear.out_features, path)
    merger = _Merger(prefix, deltas, how, recorded or {})
    start = time.perf_counter()
    result = compress_model(model, calib_ids, merger, init_methods=["eora"] if residual_rank else [],
                            rank=residual_rank or 1, target_modules=sorted({p.rsplit(".", 1)[-1] for p in deltas}),
                            batch_size=batch_size, progress=progress, execution_device=execution_device,
                            activations_device=activations_device, before_layer=merger.before_layer)
    for path, dtype in merger.dtypes.items():  # the merged layer stores its grid in the base's dtype again
        model.get_submodule(path).to(dtype)
    residual = {path: factors["eora"] for path, factors in result.factors.items()} if residual_rank else {}
    return MergeResult(model, residual, result.layers, time.perf_counter() - start, sorted(merger.dtypes))
