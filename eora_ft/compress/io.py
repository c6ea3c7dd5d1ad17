"""Saving and loading compressed models: our own packed format, and GPTQ checkpoints for other tools.

Our format (:func:`save_compressed` / :func:`load_compressed`), one directory:

- ``config.json`` (+ ``generation_config.json``, tokenizer files): the base model's, unchanged;
- ``model.safetensors``: the whole state dict, every :class:`CompressedLinear` as its buffers
  (``qweight`` int32 ``[K*bits/32, N]``, ``scales`` ``[G, N]``, ``zeros`` uint8 ``[G, N]``, ``perm`` int64
  ``[K]``; or, pruned only, ``values`` ``[kept]`` and ``keep_bits`` uint8 ``[N, ceil(K/8)]``); tied
  duplicates dropped;
- ``compression_config.json``: the caller's settings plus ``format_version`` and ``modules``, the shape
  of every compressed layer. Version 1 (before 2026-11-30) stored a dense bool mask ``[N, K]`` per
  pruned layer, and a dense weight when pruned only; it still loads (converted on the way in).

Loading builds the architecture with its parameters on the meta device and assigns the saved tensors
(already on the target device): no dense copy of the model is ever made.

GPTQ checkpoints (:func:`export_gptq` / :func:`import_gptq`) use the layout in :mod:`.gptq_format`.
Quantized layers carry fp16 scales (what GPTQ kernels read); biases and every other tensor keep the
model's dtype (not the usual fp16), so an fp32 model round-trips exactly up to its fp16-rounded scales.
No pickle anywhere: safetensors and JSON only. Every writer is atomic (see :func:`eora_ft.utils.atomic.atomic_directory`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from eora_ft.utils.atomic import atomic_directory

from .experts import is_expert_linear_path, unfuse_experts
from .gptq_format import ZERO_OFFSET, gptq_tensors, gptq_writer, layer_from_gptq
from eora_ft.kernels.packing import pack_mask

from .linear import CompressedLinear, set_module

CONFIG, WEIGHTS, WEIGHTS_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
COMPRESSION_CONFIG, QUANTIZE_CONFIG = "compression_config.json", "quantize_config.json"
# the keys of CompressionArguments.compressor_options(), as a compressed directory records them
COMPRESSOR_OPTIONS = ("bits", "group_size", "sym", "grid_search", "damp_percent", "act_order", "sparsity")
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx", "bias")
DEFAULT_DAMP_PERCENT = 0.01  # our GPTQ default; written when the model does not record its own
FORMAT_VERSION = 2  # 2: pruned-only layers as kept values + packed keep-mask, no dense masks




def _compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, CompressedLinear)}


def _nf4_layers(model: nn.Module) -> dict[str, nn.Module]:
    """bitsandbytes 4-bit layers: their state dict carries the packed codes and the quant state."""
    return {path: m for path, m in model.named_modules() if hasattr(getattr(m, "weight", None), "quant_state")}


def _nf4_shell(spec: dict, state: dict[str, torch.Tensor], path: str, dtype: torch.dtype,
               device: torch.device) -> nn.Module:
    """Rebuild an NF4 layer from its saved codes + quant state (popped from ``state``)."""
    from .nf4 import import_bitsandbytes, nf4_linear_class

    bnb, _ = import_bitsandbytes()

    layer = nf4_linear_class()(spec["in_features"], spec["out_features"], bias=spec["bias"], compute_dtype=dtype,
                               quant_type="nf4", device="meta")
    prefix = f"{path}.weight."
    stats = {name[len(prefix):]: state.pop(name) for name in [n for n in state if n.startswith(prefix)]}
    layer.weight = bnb.nn.Params4bit.from_prequantized(data=state.pop(f"{path}.weight"), quantized_stats=stats,
                                                       requires_grad=False, device=device, module=layer)
    if spec["bias"]:
        layer.bias = nn.Parameter(state.pop(f"{path}.bias").to(dtype), requires_grad=False)
    return layer


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with tied duplicates dropped (first name kept, as transformers keeps the
    embedding over ``lm_head``): safetensors refuses two names on one storage."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor.contiguous()
    return out


def _write_model_files(model: nn.Module, tmp: Path, tokenizer, config=None) -> None:
    (config or model.config).save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def save_compressed(model: nn.Module, directory: str | os.PathLike, compression_config: dict, tokenizer=None) -> Path:
    """Write ``model`` (with its :class:`CompressedLinear` layers) to ``directory``; returns its Path.

    ``compression_config`` (JSON-serializable) is stored with ``"format_version"`` and ``"modules": {path:
    {"bits", "group_size", "kept", "bias", "in_features", "out_features", "act_order"}}`` added for every
    compressed layer (``kept``: stored weights of a pruned-only layer, else None).
    """
    layers = _compressed_layers(model)
    meta = dict(compression_config, format_version=FORMAT_VERSION)
    meta["modules"] = {
        path: {"bits": m.bits, "group_size": m.group_size, "kept": m.kept, "bias": m.bias is not None,
               "in_features": m.in_features, "out_features": m.out_features, "act_order": m.perm is not None}
        for path, m in layers.items()
    }
    meta["modules"].update({
        path: {"kind": "nf4", "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
        for path, m in _nf4_layers(model).items()
    })
    meta_text = json.dumps(meta, indent=2)  # fails on non-JSON values before anything is written
    with atomic_directory(directory, lambda d: (d / COMPRESSION_CONFIG).exists(), "compressed-model directory") as tmp:
        _write_model_files(model, tmp, tokenizer)
        save_file(_dedupe_shared(model.state_dict()), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / COMPRESSION_CONFIG).write_text(meta_text + "\n")
    return Path(directory)


def _require(directory: Path, names: list[str], what: str) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (expected a {what})")
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a {what}: missing {', '.join(missing)}")


def _build_model(config, dtype: torch.dtype, attn_implementation: str | None = None, module_paths=()) -> nn.Module:
    """An architecture-only model: parameters on the meta device (no memory, no init), buffers that are
    not saved (rotary frequencies) computed on the CPU; every parameter is assigned by :func:`_load_state`.
    When ``module_paths`` (the compressed modules a checkpoint lists) hold per-expert linears, the model's fused
    mixture-of-experts experts are unfused to match (:func:`.experts.unfuse_experts`)."""
    from accelerate import init_empty_weights

    with torch.device("cpu"), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()
    if any(is_expert_linear_path(path) for path in module_paths):
        unfuse_experts(model)
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path, base: dict | None = None,
                skip: list[str] = ()) -> None:
    """Assign ``state`` to ``model`` (``load_state_dict(strict=True, assign=True)``) after filling tied names
    (and, if given, gaps from ``base``); float tensors take the dtype the model was built with.

    Modules under a ``skip`` path were already loaded (NF4) and are left out of the strict check."""
    expected = {n: t for n, t in model.state_dict(keep_vars=True).items()
                if not any(n.startswith(f"{p}.") for p in skip)}
    tied: dict[int, list[str]] = {}  # the built model ties lm_head to the embedding: one Parameter, two names
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for names in tied.values():
        present = [n for n in names if n in state]
        for name in names:
            if name not in state and present:
                state[name] = state[present[0]]
    for name in expected.keys() - state.keys():
        if base is not None and name in base:
            state[name] = base[name]
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and want.is_floating_point() and tensor.is_floating_point() and tensor.dtype != want.dtype:
            state[name] = tensor.to(want.dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [n for n in missing if not any(n.startswith(f"{p}.") for p in skip)]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    except RuntimeError as err:
        raise ValueError(f"the tensors in {source} do not fit the model built from its config: {err}") from err
    model.tie_weights()
    meta_left = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if meta_left:
        raise ValueError(f"{source} leaves {meta_left[:3]} without a value")


def _upgrade_v1_layer(path: str, spec: dict, state: dict[str, torch.Tensor]) -> dict:
    """Format 1 kept a dense bool mask ``[N, K]`` beside pruned layers (and a dense weight when pruned only):
    rewrite this layer's tensors in place to format 2 and return its format-2 spec."""
    spec = dict(spec)
    mask = state.pop(f"{path}.mask", None) if spec.pop("masked", False) else None
    spec["kept"] = None
    if spec["bits"] is None:  # pruned only: keep the values the mask keeps
        weight = state.pop(f"{path}.weight")
        mask = mask if mask is not None else torch.ones_like(weight, dtype=torch.bool)
        state[f"{path}.values"], state[f"{path}.keep_bits"] = weight[mask], pack_mask(mask)
        spec["kept"] = int(mask.sum())
    # a quantized pruned layer's pruned codes already hold the zero point: the mask was redundant
    return spec


def compressed_shell(spec: dict, dtype: torch.dtype) -> CompressedLinear:
    """A :class:`CompressedLinear` of a ``modules`` entry (format 2) with its buffers on the meta device, for
    ``load_state_dict(assign=True)``."""
    shell = CompressedLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                             bias=spec["bias"], kept=spec["kept"], dtype=dtype, device="meta")
    if spec.get("act_order"):
        shell.perm = torch.zeros(spec["in_features"], dtype=torch.int64, device="meta")
    return shell


def read_compression_config(directory: Path) -> tuple[dict, int]:
    """``(compression_config.json, its format version)`` of a :func:`save_compressed` directory, checked."""
    _require(directory, [CONFIG, WEIGHTS, COMPRESSION_CONFIG], "compressed-model directory (save_compressed output)")
    meta = json.loads((directory / COMPRESSION_CONFIG).read_text())
    modules = meta.get("modules") if isinstance(meta, dict) else None
    if not isinstance(modules, dict):
        raise ValueError(f"{directory / COMPRESSION_CONFIG} has no 'modules' table: not written by save_compressed")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{directory} has format_version {version!r}, newer than this eora_ft reads "
                         f"(up to {FORMAT_VERSION}): upgrade eora_ft")
    return meta, version


def _finish(model: nn.Module, directory: Path, meta: dict) -> nn.Module:
    if (directory / "generation_config.json").exists() and getattr(model, "can_generate", lambda: False)():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.compression_config = meta  # read back by export_gptq (sym, damp_percent) and by callers
    return model.eval()


def recorded_options(compression_config: dict) -> dict:
    """The compressor options a compressed directory recorded: under ``options`` (``eora-ft compress``) or at
    the top level (a recipe's cache entry), as :func:`eora_ft.compress.make_compressor` takes them."""
    source = compression_config.get("options", compression_config)
    return {key: source[key] for key in COMPRESSOR_OPTIONS if key in source}


def load_compressed(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", attn_implementation: str | None = None) -> nn.Module:
    """Load a directory written by :func:`save_compressed`: the model in eval mode on ``device``, compressed
    layers as :class:`CompressedLinear`, float tensors in ``dtype``; ``model.compression_config`` holds the
    metadata. The tensors are read straight onto ``device``; nothing dense is built on the way.
    ``attn_implementation`` (``sdpa``, ``flash_attention_2``, ...; None = transformers' default) as in
    ``from_pretrained``. ``device="meta"``: nothing is read; parameters and saved buffers stay on the meta
    device, the buffers that are not saved (rotary frequencies) are computed on the CPU."""
    directory = Path(directory)
    meta, version = read_compression_config(directory)
    modules = meta["modules"]
    device = torch.device(device)
    model = _build_model(AutoConfig.from_pretrained(directory), dtype, attn_implementation, modules)
    if device.type == "meta" and version >= 2 and not any(spec.get("kind") == "nf4" for spec in modules.values()):
        # the architecture only (FSDP2's CPU-RAM-efficient loading: the main process broadcasts the weights)
        for path, spec in modules.items():
            set_module(model, path, compressed_shell(spec, dtype))
        return _finish(model, directory, meta)
    # safetensors names devices "cpu" or "cuda:N" ("cpu:0", as accelerate reports it, is refused)
    state = load_file(str(directory / WEIGHTS), device="cpu" if device.type == "cpu" else str(device))
    for path, spec in modules.items():
        try:
            model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"{directory / COMPRESSION_CONFIG} lists module {path!r}, "
                             f"which the model in {CONFIG} lacks") from err
        if spec.get("kind") == "nf4":  # loaded directly: bitsandbytes rebuilds its quant state itself
            set_module(model, path, _nf4_shell(spec, state, path, dtype, device))
            continue
        if version == 1:
            spec = _upgrade_v1_layer(path, spec, state)
        set_module(model, path, compressed_shell(spec, dtype))
    nf4_paths = [path for path, spec in modules.items() if spec.get("kind") == "nf4"]
    _load_state(model, state, directory / WEIGHTS, skip=nf4_paths)
    return _finish(model.to(device), directory, meta)


def _is_gptq_dir(directory: Path) -> bool:
    return (directory / QUANTIZE_CONFIG).exists()


def export_gptq(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                checkpoint_format: str | None = None) -> Path:
    """Write a GPTQ checkpoint that GPTQ-aware loaders read (``config.json`` with ``quantization_config``,
    also as ``quantize_config.json``; ``model.safetensors``). Returns the directory.

    Every :class:`CompressedLinear` must be quantized (2:4-pruned ones included) and share one bit width and group size.
    ``checkpoint_format``: ``"gptq"`` (v1, zero points stored minus 1), ``"gptq_v2"`` (zero points as they
    are), or None: v1 for a symmetric grid (every loader reads it), v2 for an asymmetric one. GPTQModel
    refuses an asymmetric v1 checkpoint it did not write (``models/loader.py``: sym=False with format gptq
    needs ``meta.quantizer`` naming gptqmodel >= 0.9.0, whose v1 bytes carry a word-level borrow no other
    writer reproduces) and loads v2 natively; vLLM's ``gptq`` method reads ``checkpoint_format: gptq_v2``
    (vllm-project/vllm#26092; older versions add the v1 offset regardless). Scales are fp16 and so is the
    config's dtype: vLLM's GPTQ kernels take fp16 activations only. Loaders expect every decoder linear
    quantized: export a model compressed with all of them targeted.
    """
    layers = _compressed_layers(model)
    if not layers:
        raise ValueError("the model has no CompressedLinear layer: nothing to export as GPTQ")
    specs = {(m.bits, m.group_size) for m in layers.values() if m.bits is not None}
    meta = getattr(model, "compression_config", None) or {}
    options = recorded_options(meta)
    true_sequential = bool(meta.get("true_sequential", False))
    sym = options.get("sym")
    if sym is None:  # a symmetric grid has its zero point in the middle of the code range
        sym = all(m.bits is not None and bool((m.zeros == 2 ** (m.bits - 1)).all()) for m in layers.values())
    checkpoint_format = checkpoint_format or ("gptq" if sym else "gptq_v2")
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not supported; valid: {sorted(ZERO_OFFSET)}")
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():  # per-layer problems (pruned-only, ranges) first: the most specific error
        try:
            tensors.update({f"{path}.{k}": v for k, v in gptq_tensors(layer, checkpoint_format).items()})
        except ValueError as err:
            raise ValueError(f"cannot export {path} as GPTQ: {err}") from err
    if len(specs) > 1:
        raise ValueError(f"the GPTQ layout holds one bit width and group size per model, found {sorted(specs)}")
    state = {n: t for n, t in model.state_dict().items() if n.rpartition(".")[0] not in layers}
    bits, group_size = specs.pop()
    damp = float(options.get("damp_percent") or DEFAULT_DAMP_PERCENT)
    quant = {  # the fields GPTQModel writes (gptqmodel/quantization/config.py), which transformers and vLLM read
        "quant_method": "gptq", "method": "gptq", "bits": bits, "group_size": group_size,
        "desc_act": any(m.perm is not None for m in layers.values()), "sym": bool(sym), "lm_head": False,
        "format": checkpoint_format, "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
        "static_groups": False, "true_sequential": true_sequential, "damp_percent": damp,
        "meta": {"quantizer": [f"eora_ft:{_version()}"], "uri": "https://github.com/eora-ft/eora_ft",
                 "damp_percent": damp, "static_groups": False, "true_sequential": true_sequential},
    }
    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    config.dtype = torch.float16
    with atomic_directory(directory, _is_gptq_dir, "GPTQ checkpoint (export_gptq output)") as tmp:
        _write_model_files(model, tmp, tokenizer, config)
        save_file(_dedupe_shared(state | tensors), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / QUANTIZE_CONFIG).write_text(json.dumps(quant, indent=2) + "\n")
    return Path(directory)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eora_ft")
    except PackageNotFoundError:
        return "0+unknown"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's tensors: ``model.safetensors``, the shards its index names
    (transformers' sharded layout), or the one ``*.safetensors`` file of the directory (AutoGPTQ's
    ``gptq_model-4bit-128g.safetensors``, named by ``model_file_base_name``)."""
    if (directory / WEIGHTS).exists():
        return [directory / WEIGHTS]
    if (directory / WEIGHTS_INDEX).exists():  # sharded checkpoints, as transformers writes large ones
        return [directory / shard for shard in
                sorted(set(json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"].values()))]
    base_name = None
    if (directory / QUANTIZE_CONFIG).exists():
        base_name = json.loads((directory / QUANTIZE_CONFIG).read_text()).get("model_file_base_name")
    if base_name and (directory / f"{base_name}.safetensors").exists():
        return [directory / f"{base_name}.safetensors"]
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FileNotFoundError(f"{directory} holds no checkpoint weights eora_ft reads: expected {WEIGHTS}, "
                            f"{WEIGHTS_INDEX} or a single *.safetensors file (found {[p.name for p in found]}; "
                            "pickled .bin weights are not read)")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in weight_files(directory) for k, v in load_file(str(path)).items()}


def gptq_module_spec(quant: dict, prefix: str) -> tuple[int, int]:
    """``(bits, group_size)`` of the module ``prefix`` in a GPTQ ``quantization_config``: the global values, or
    those of the first GPTQModel ``dynamic`` rule whose regex matches (``+:`` or no sign; ``-:`` rules mark
    modules left unquantized, which hold no ``qweight``)."""
    import re

    bits, group_size = int(quant["bits"]), int(quant.get("group_size", -1))
    for pattern, overrides in (quant.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        if re.match(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern, prefix):
            if negative or not isinstance(overrides, dict):
                break
            return int(overrides.get("bits", bits)), int(overrides.get("group_size", group_size))
    return bits, group_size


def import_gptq(directory: str | os.PathLike, base_model: nn.Module | str | os.PathLike | None = None,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a GPTQ checkpoint (v1 ``"gptq"`` or ``"gptq_v2"``) as a model with :class:`CompressedLinear` layers.

    The architecture comes from the checkpoint's ``config.json``. Tensors the checkpoint lacks (e.g. it
    holds only the quantized layers) are taken from ``base_model`` (a model, or a path for
    ``from_pretrained``). Act-order ``g_idx`` is supported (see :func:`.gptq_format.layer_from_gptq`), so are
    GPTQModel's per-module ``dynamic`` bits and group sizes (:func:`gptq_module_spec`) and AutoGPTQ's
    ``quantize_config.json`` with a ``gptq_model-*.safetensors`` file. v1 zero points are read as the writer
    named in ``meta.quantizer`` wrote them (:func:`.gptq_format.zero_points`: GPTQModel's word-level offset).
    """
    directory = Path(directory)
    _require(directory, [CONFIG], "GPTQ checkpoint")
    config = AutoConfig.from_pretrained(directory)
    quant = getattr(config, "quantization_config", None)
    if quant is None and (directory / QUANTIZE_CONFIG).exists():  # AutoGPTQ-era checkpoints
        quant = json.loads((directory / QUANTIZE_CONFIG).read_text())
    quant = quant if isinstance(quant, dict) or quant is None else quant.to_dict()
    if not quant or str(quant.get("quant_method", "gptq")).lower() != "gptq":
        raise ValueError(f"{directory} is not a GPTQ checkpoint: no quantization_config with quant_method 'gptq' "
                         f"in {CONFIG} or {QUANTIZE_CONFIG} (found {quant and quant.get('quant_method')!r})")
    fmt = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
    if fmt not in ZERO_OFFSET:
        raise ValueError(f"{directory}: checkpoint_format {fmt!r} is not supported; valid: {sorted(ZERO_OFFSET)}")
    pack_dtype = str(quant.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise ValueError(f"{directory}: pack_dtype {pack_dtype!r} is not supported; eora_ft reads GPTQ words of int32 "
                         "(GPTQModel's and AutoGPTQ's default)")
    writer = gptq_writer(quant)  # how v1 zero points were written (gptq_format.zero_points)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the rebuilt model is a plain one carrying CompressedLinear layers
    tensors = _read_tensors(directory)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise ValueError(f"{directory} holds no '*.qweight' tensor: not a GPTQ checkpoint")
    model = _build_model(config, dtype, module_paths=prefixes)
    state = {}
    for prefix in prefixes:
        layer_tensors = {k: tensors.pop(f"{prefix}.{k}") for k in GPTQ_KEYS if f"{prefix}.{k}" in tensors}
        try:
            layer = layer_from_gptq(layer_tensors, *gptq_module_spec(quant, prefix), fmt, dtype, writer=writer)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{directory}: cannot import {prefix}: {err!r}") from err
        set_module(model, prefix, layer)
        state.update({f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
    if isinstance(base_model, (str, os.PathLike)):
        base_model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    base = base_model.state_dict() if base_model is not None else None
    _load_state(model, state | tensors, directory, base)
    return _finish(model, directory, dict(quant, checkpoint_format=fmt))


__all__ = ["export_gptq", "import_gptq", "load_compressed", "save_compressed"]
