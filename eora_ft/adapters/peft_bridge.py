"""PEFT LoRA over a compressed model: the adapter layer for CompressedLinear, factor loading, checks.

The adapters are ordinary PEFT LoRA modules (``lora_A`` / ``lora_B``), so ``save_pretrained``
writes the standard adapter files that plain PEFT reloads over the dequantized base.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from eora_ft.utils.atomic import atomic_directory
from eora_ft.compress.experts import expert_owners, unfuse_experts
from eora_ft.compress.linear import CompressedLinear
from eora_ft.init import LowRankFactors, check_rank
from eora_ft.kernels.lora_matmul import Packed, packed_lora_linear
from eora_ft.utils.model_checks import check_adapter_fits

ALL_LINEAR = "all-linear"  # PEFT's and TRL's name for every linear of the decoder layers


class CompressedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` with a :class:`CompressedLinear` base (frozen packed weights).

    With one plain active adapter its forward/backward is :class:`~eora_ft.kernels.lora_matmul.PackedLoraMatmul`
    (``W_c`` recomputed in backward instead of kept, ``dY`` read once for ``dB`` and ``dY B``); anything
    else (several adapters, dropout while training, variants) takes PEFT's own forward."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT probes `weight`/`qweight`; a pruned-only layer has neither, and its adapters would stay on the
        # CPU under a CUDA base. Every CompressedLinear knows both.
        return base_layer.device, base_layer.compute_dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise RuntimeError(
            "refusing to merge a LoRA adapter into packed quantized/sparse weights: it would re-quantize the "
            "correction away. Call eora_ft.compress.linear.dequantize_model() first and merge into the dense copy."
        )

    def _fused_adapter(self, kwargs: dict) -> str | None:
        """The single plain adapter the fused path can run, or None (then PEFT's own forward runs)."""
        if self.disable_adapters or self.merged or kwargs or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        if hasattr(self.lora_A[adapter].weight, "ds_id"):
            return None  # ZeRO-3 shards the factors: only calling the submodules lets DeepSpeed gather them
        dropout = self.lora_dropout[adapter]
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return None  # the LoRA branch sees a different x than the base: keep PEFT's two-branch forward
        return adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args else self._fused_adapter(kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        packed = None
        if base.bits is not None and base.perm is None:
            packed = Packed(base.qweight, base.scales, base.zeros, base.bits, base.group_size, base.in_features)
        # the bound method holds the module only (a closure over x would keep every layer's input alive in
        # the autograd graph, defeating activation checkpointing); on a GPU it dequantizes into scratch
        return packed_lora_linear(x, base.transient_weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                  self.scaling[adapter], base.bias, packed)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` ``[N, K]`` for ``adapter``."""
        return self.scaling[adapter] * (self.lora_B[adapter].weight @ self.lora_A[adapter].weight)


def lora_config(r: int, lora_alpha: float, lora_dropout: float, target_modules: list[str] | None,
                task_type: str | None = "CAUSAL_LM") -> LoraConfig:
    """A LoraConfig (causal LM by default) that also knows how to wrap :class:`CompressedLinear`."""
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type=task_type,
        target_modules=target_modules or ALL_LINEAR,
    )
    config._register_custom_module({CompressedLinear: CompressedLoraLinear})
    return config


def build_lora_model(
    model: nn.Module,
    factors: dict[str, LowRankFactors] | None,
    config: LoraConfig,
    adapter_name: str = "default",
    trim_to_effective_rank: bool = False,
) -> PeftModel:
    """Wrap ``model`` in PEFT LoRA and, if given, load ``factors`` (``{module_path: LowRankFactors}``).

    ``lora_alpha != r`` is handled by dividing PEFT's scaling out of the factors, so the model's
    correction is exactly ``B @ A`` of the initializer. With ``trim_to_effective_rank``, a layer whose
    factors have fewer live directions than ``r`` gets that smaller rank (``rank_pattern``, with an
    ``alpha_pattern`` entry keeping ``alpha / r`` unchanged) instead of dead zero directions.
    """
    for path, module in model.named_modules():
        if isinstance(module, (CompressedLinear, nn.Linear)) and factors and path in factors:
            check_rank(config.r, module.in_features, module.out_features, path)
    ranks = {path: f.rank for path, f in factors.items() if f.rank != config.r} if factors else {}
    if factors and trim_to_effective_rank:
        ranks |= {path: max(f.effective_rank, 1) for path, f in factors.items() if max(f.effective_rank, 1) < f.rank}
        factors = {path: f.truncate(ranks[path]) if path in ranks else f for path, f in factors.items()}
    if ranks:  # per-linear ranks (a rank budget, trimmed dead directions), at the scaling alpha / r of the rest
        config.rank_pattern = {re.escape(path): rank for path, rank in ranks.items()}
        config.alpha_pattern = {re.escape(path): config.lora_alpha * rank / config.r for path, rank in ranks.items()}
    if config.target_modules == ALL_LINEAR:
        config.target_modules = decoder_linear_names(model)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if factors:
        load_factors(peft_model, factors, adapter_name)
    return peft_model


def decoder_linear_names(model: nn.Module) -> set[str]:
    """The leaf names of every linear inside the decoder layers, compressed or not: what PEFT's and TRL's
    ``"all-linear"`` means (the output head excluded). PEFT's own expansion finds only ``nn.Linear``
    and would leave every :class:`CompressedLinear` without an adapter."""
    from eora_ft.init.sequential import find_decoder_layers

    _, layers = find_decoder_layers(model)
    return {name.split(".")[-1] for layer in layers for name, module in layer.named_modules()
            if isinstance(module, (nn.Linear, CompressedLinear)) or hasattr(module, "dequantize")}


@torch.no_grad()
def load_factors(peft_model: PeftModel, factors: dict[str, LowRankFactors], adapter_name: str = "default") -> None:
    """Copy ``A`` ``[r, K]`` and ``B`` ``[N, r]`` into each target's ``lora_A`` / ``lora_B`` (scaling divided out)."""
    base = peft_model.base_model.model
    missing = [path for path in factors if not hasattr(base.get_submodule(path), "lora_A")]
    if missing:
        raise ValueError(f"no LoRA adapter on {missing[:3]}...: target_modules must cover every layer with factors")
    for path, factor in factors.items():
        module = base.get_submodule(path)
        scaled = factor.scaled_for_peft(module.scaling[adapter_name])
        if not (torch.isfinite(scaled.a).all() and torch.isfinite(scaled.b).all()):
            raise FloatingPointError(f"non-finite initial factors for {path}")
        lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        if tuple(lora_a.shape) != tuple(scaled.a.shape) or tuple(lora_b.shape) != tuple(scaled.b.shape):
            raise ValueError(f"{path}: factor shapes {tuple(scaled.a.shape)}/{tuple(scaled.b.shape)} do not match "
                             f"the adapter's {tuple(lora_a.shape)}/{tuple(lora_b.shape)}")
        lora_a.copy_(scaled.a.to(lora_a.dtype))
        lora_b.copy_(scaled.b.to(lora_b.dtype))


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Count trainable and total parameters; raise if anything but LoRA adapters would train."""
    # ds_numel: the full size of a parameter that DeepSpeed ZeRO-3 has sharded (numel() is then 0)
    trainable = {name: getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters() if p.requires_grad}
    stray = [name for name in trainable if "lora_" not in name]
    if stray:
        raise RuntimeError(f"only LoRA adapters may train, but these are trainable too: {stray[:5]}")
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return {"trainable": sum(trainable.values()), "total": total}


def save_adapter(peft_model: PeftModel, directory: str | Path, base_model_name_or_path: str,
                 move_in: dict[str, Path] | None = None, tokenizer=None, revision: str | None = None) -> Path:
    """``save_pretrained`` into a sibling temp dir, then swap it in whole. An existing ``directory`` is
    replaced only if it is empty or an adapter directory (holds ``adapter_config.json``).

    ``base_model_name_or_path`` (required): the model the adapter was computed for, written into
    ``adapter_config.json`` in place of the model PEFT wrapped. For a compressed base that is the compressed
    checkpoint, never the uncompressed model PEFT saw: a correction for ``W - W_c`` applied on top of ``W``
    would be silently wrong. ``move_in``: ``{name: directory}`` moved into the adapter directory before it is
    swapped in (a rewritten base that the adapter names as ``<directory>/<name>``). ``tokenizer``: saved beside the
    adapter (a run on conversations: the chat template it was trained with travels with it). ``revision``: the
    hub commit of a base named by hub id (PEFT's ``revision``), so a later push to that repo is not taken for it."""
    with atomic_directory(directory, lambda d: (d / "adapter_config.json").exists(), "PEFT adapter directory") as tmp:
        peft_model.save_pretrained(tmp)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(base_model_name_or_path)
        if revision:
            config["revision"] = revision
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, source in (move_in or {}).items():
            os.replace(source, tmp / name)
    return Path(directory)


def load_pretrained(adapter_directory: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    is_trainable: bool = False) -> PeftModel:
    """An adapter with the base its ``adapter_config.json`` names: a compressed checkpoint in any format eora_ft
    reads (eora_ft, GPTQ, compressed-tensors; detected), or a plain model (hub id or directory)."""
    from eora_ft.compress.formats import detect_format, import_model

    config = json.loads((Path(adapter_directory) / "adapter_config.json").read_text())
    base, revision = config["base_model_name_or_path"], config.get("revision")
    base = _compressed_snapshot(base, revision) or base
    try:  # only the format probe decides the branch: a broken compressed checkpoint must raise its own error
        detect_format(base)
    except (ValueError, FileNotFoundError, OSError):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=dtype,
                                                     device_map={"": str(torch.device(device))})
    else:
        model = import_model(base, dtype=dtype, device=device)
    return load_adapter(model, adapter_directory, is_trainable=is_trainable)


def _compressed_snapshot(base: str, revision: str | None = None) -> str | None:
    """The local snapshot of hub id ``base`` when its config says it is compressed (GPTQ, compressed-tensors: read
    by eora_ft's importer, as the run that trained the adapter read it), else None (a local path, or a plain model
    that ``from_pretrained`` loads itself). With ``HF_HUB_OFFLINE=1`` the local cache answers."""
    if os.path.exists(base) or base.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = json.loads(Path(hf_hub_download(base, "config.json", revision=revision)).read_text())
    except Exception:  # not on the hub, or not cached offline: from_pretrained gives the error users know
        return None
    if not config.get("quantization_config"):
        return None
    return snapshot_download(base, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


def load_adapter(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` over a model holding :class:`CompressedLinear` layers.

    A saved adapter is plain PEFT, but PEFT does not know our layer type: the custom-module mapping
    is registered on the loaded config here (a dequantized base needs none of this).
    """
    config = LoraConfig.from_pretrained(str(directory))
    targets = config.target_modules
    unfuse_experts(model, sorted(targets) if isinstance(targets, (set, list, tuple)) else None)  # MoE: per-expert LoRA
    check_adapter_fits(model, directory)
    config._register_custom_module({CompressedLinear: CompressedLoraLinear})
    return PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=is_trainable)


def _install_expert_aware_conversions() -> None:
    """PEFT under transformers 5 rewrites the per-expert targets of Mixtral / Qwen-MoE adapters (``gate_proj``,
    ``up_proj``, ``down_proj``, ``w1``...) into ``target_parameters`` on the fused 3-D expert tensors, and fuses such
    adapters' weights on load, so that adapters trained on transformers 4's per-expert linears load on
    transformers 5's fused experts. A model whose experts eora_ft unfused (:func:`eora_ft.compress.experts.unfuse_experts`)
    has exactly the per-expert layout those adapters were made for: for such a model the conversion is skipped, on
    every path that loads or wraps (``get_peft_model``, ``PeftModel.from_pretrained``, the Trainer's
    ``load_adapter`` when it resumes or restores the best checkpoint); for any other model nothing changes. Installed
    once, when this module is imported."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without the conversion converts nothing
        return
    config_fn = getattr(conversion, "convert_peft_config_for_transformers", None)
    if config_fn is not None and not hasattr(config_fn, "_eora_ft_expert_aware"):
        @functools.wraps(config_fn)
        def convert_config(peft_config, model=None, *args, **kwargs):
            if model is not None and expert_owners(model):
                return None
            return config_fn(peft_config, model, *args, **kwargs)

        convert_config._eora_ft_expert_aware = True
        conversion.convert_peft_config_for_transformers = convert_config
    state_fn = getattr(conversion, "convert_peft_adapter_state_dict_for_transformers", None)
    if state_fn is not None and not hasattr(state_fn, "_eora_ft_expert_aware"):
        @functools.wraps(state_fn)
        def convert_state(model, peft_config, adapter_state_dict, *args, **kwargs):
            if expert_owners(model):
                return adapter_state_dict
            return state_fn(model, peft_config, adapter_state_dict, *args, **kwargs)

        convert_state._eora_ft_expert_aware = True
        conversion.convert_peft_adapter_state_dict_for_transformers = convert_state


_install_expert_aware_conversions()
