"""compressed-tensors ``pack-quantized`` checkpoints: what llm-compressor writes and vLLM and transformers load.

One quantized linear ``prefix`` with ``N`` outputs, ``K`` inputs and ``G`` groups is stored as
``prefix.weight_packed`` int32 (the signed codes ``q = code - 2**(bits-1)`` packed along K by
compressed-tensors' own ``pack_to_int32``), ``prefix.weight_scale`` ``[N, G]`` in the model's dtype,
``prefix.weight_shape`` ``[N, K]``, for an asymmetric grid ``prefix.weight_zero_point`` (``z - 2**(bits-1)``,
packed along N), and for act-order with regrouped inputs ``prefix.weight_g_idx`` int32 ``[K]``.
Dequantization there is ``(q - zp) * scale``, which is ours, ``(code - z) * scale``, term for term: a
layer round-trips bit-exactly. ``config.json`` carries ``quantization_config`` (``quant_method:
compressed-tensors``, ``format: pack-quantized``, one config group per distinct scheme).

The packing and the config schema come from the installed ``compressed-tensors`` (its helpers and its
pydantic models), so what we write is what that version reads.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from eora_ft.utils.atomic import atomic_directory

from .io import CONFIG, WEIGHTS, _build_model, _compressed_layers, _dedupe_shared, _finish, _load_state, _read_tensors, _require, _write_model_files
from .linear import CompressedLinear, set_module

CT_KEYS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_INSTALL = "pip install 'compressed-tensors>=0.12' (the library that writes and reads this format)"


def _helpers():
    """compressed-tensors' ``pack_to_int32`` / ``unpack_from_int32`` (their module moved between versions)."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        try:
            from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
                pack_to_int32,
                unpack_from_int32,
            )
        except ImportError as err:
            raise ImportError(f"the compressed-tensors format needs the compressed-tensors library: {_INSTALL}") from err
    return pack_to_int32, unpack_from_int32


def _scheme(layer: CompressedLinear) -> tuple:
    symmetric = bool((layer.zeros == 2 ** (layer.bits - 1)).all())
    return layer.bits, layer.group_size, symmetric, layer.perm is not None


def ct_tensors(layer: CompressedLinear, symmetric: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized layer's compressed-tensors tensors (keys as :data:`CT_KEYS`, ``bias`` if present)."""
    if layer.bits is None:
        raise ValueError("a pruned-only (unquantized) layer has no pack-quantized form; export it with "
                         "--format eora, or quantize it (compress_method gptq+sparsegpt)")
    pack_to_int32, _ = _helpers()
    offset = 2 ** (layer.bits - 1)
    codes, g_idx = layer.codes_in_original_order()  # [K, N]
    out = {
        "weight_packed": pack_to_int32((codes.t() - offset).to(torch.int8).contiguous(), layer.bits),
        "weight_scale": layer.scales.t().to(dtype).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not symmetric:
        zero_points = (layer.zeros.t().to(torch.int32) - offset).to(torch.int8).contiguous()  # [N, G]
        out["weight_zero_point"] = pack_to_int32(zero_points, layer.bits, packed_dim=0)
    if layer.perm is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype).clone()
    return out


def unrepresentable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be a pack-quantized checkpoint that plain transformers loads, or None if it can:
    every compressed layer integer-quantized on a symmetric grid with static groups, compressed-tensors
    installed (asymmetric zero points do not load through transformers: vllm-project/llm-compressor#1618)."""
    try:
        _helpers()
    except ImportError as err:
        return str(err)
    layers = _compressed_layers(model)
    if not layers:
        return "no compressed layer"
    for path, layer in layers.items():
        if layer.bits is None:
            return f"{path} is pruned only (no integer codes)"
        _, _, symmetric, regrouped = _scheme(layer)
        if not symmetric or regrouped:
            return f"{path} has {'an asymmetric grid' if not symmetric else 'regrouped inputs (g_idx)'}"
    return None


def _quantization_config(schemes: dict[tuple, list[str]], ignore: list[str]) -> dict:
    from compressed_tensors import __version__ as version
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for index, ((bits, group_size, symmetric, regrouped), paths) in enumerate(sorted(schemes.items())):
        try:
            weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                       strategy="channel" if group_size == -1 else "group",
                                       group_size=None if group_size == -1 else group_size,
                                       actorder="group" if regrouped else None, observer="minmax")
        except ValueError as err:  # compressed-tensors 0.20 removed actorder "group" (g_idx)
            raise ValueError(f"{paths[0]} (and {len(paths) - 1} more) regroup their inputs (act-order g_idx, from an "
                             f"imported GPTQ desc_act checkpoint), which this compressed-tensors cannot store "
                             f"({err.__class__.__name__}: actorder='group'); export with --format gptq or eora_ft") from err
        targets = ["Linear"] if len(schemes) == 1 else paths
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=weights)
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                ignore=ignore)
    return {"version": version, "quant_method": "compressed-tensors", **config.model_dump(exclude={"quant_method"})}


def export_compressed_tensors(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (:class:`CompressedLinear` layers, 2/3/4/8-bit, group or per channel, symmetric or not,
    act-order included) as a compressed-tensors ``pack-quantized`` checkpoint; returns the directory.

    ``AutoModelForCausalLM.from_pretrained(directory)`` with compressed-tensors installed gives our
    logits; vLLM serves it (4/8-bit). Linears left uncompressed are listed under ``ignore``."""
    layers = _compressed_layers(model)
    if not layers:
        raise ValueError("the model has no CompressedLinear layer: nothing to export as compressed-tensors")
    _helpers()  # fail before any work without the library
    dtype = next(iter(layers.values())).compute_dtype
    schemes: dict[tuple, list[str]] = {}
    for path, layer in layers.items():
        if layer.bits is None:
            raise ValueError(f"cannot export {path}: a pruned-only (unquantized) layer has no pack-quantized form; "
                             "use --format eora, or compress with gptq+sparsegpt")
        schemes.setdefault(_scheme(layer), []).append(path)
    tensors = {}
    for scheme, paths in schemes.items():
        for path in paths:
            tensors.update({f"{path}.{k}": v for k, v in ct_tensors(layers[path], scheme[2], dtype).items()})
    ignore = sorted(path for path, module in model.named_modules() if isinstance(module, nn.Linear))
    state = {n: t for n, t in model.state_dict().items() if n.rpartition(".")[0] not in layers}
    config = copy.deepcopy(model.config)
    config.quantization_config = _quantization_config(schemes, ignore)
    config.dtype = dtype  # the scales' dtype is the dtype the checkpoint computes in
    with atomic_directory(directory, _is_ct_dir, "compressed-tensors checkpoint (export output)") as tmp:
        _write_model_files(model, tmp, tokenizer, config)
        save_file(_dedupe_shared(state | tensors), str(tmp / WEIGHTS), metadata={"format": "pt"})
    return Path(directory)


def _is_ct_dir(directory: Path) -> bool:
    try:
        quant = json.loads((directory / CONFIG).read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return quant.get("quant_method") == "compressed-tensors"


def _scheme_for(path: str, groups: dict) -> dict:
    for group in groups.values():
        for target in group.get("targets", []):
            if target == path or target == "Linear" or (target.startswith("re:") and re.match(target[3:], path)):
                return group["weights"]
    raise ValueError(f"{path} holds packed weights but no config group targets it")


def _check_weights_args(args: dict, where: str) -> None:
    problems = []
    if args.get("type", "int") != "int":
        problems.append(f"type={args.get('type')!r} (only int)")
    if args.get("strategy") not in ("group", "channel"):
        problems.append(f"strategy={args.get('strategy')!r} (group or channel)")
    if args.get("dynamic"):
        problems.append("dynamic quantization")
    if problems:
        raise ValueError(f"{where}: cannot import {', '.join(problems)}; eora_ft reads integer weight-only "
                         "group or channel quantization (W2/W3/W4/W8 A16)")


def import_compressed_tensors(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a compressed-tensors ``pack-quantized`` checkpoint (llm-compressor's GPTQ/RTN W2-W8 A16, group or
    channel, symmetric or not, act-order ``g_idx``) as a model with :class:`CompressedLinear` layers."""
    directory = Path(directory)
    _require(directory, [CONFIG], "compressed-tensors checkpoint")
    raw = json.loads((directory / CONFIG).read_text())
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "pack-quantized":
        raise ValueError(f"{directory} is not a compressed-tensors pack-quantized checkpoint (quant_method="
                         f"{quant.get('quant_method')!r}, format={quant.get('format')!r})")
    for name in ("input_activations", "output_activations"):
        if any(group.get(name) for group in quant["config_groups"].values()):
            raise ValueError(f"{directory}: {name} are quantized; eora_ft reads weight-only quantization (A16)")
    _, unpack_from_int32 = _helpers()
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config  # rebuilt as a plain model carrying CompressedLinear layers
    tensors = _read_tensors(directory)
    prefixes = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    model = _build_model(config, dtype, module_paths=prefixes)
    state = {}
    for prefix in prefixes:
        args = _scheme_for(prefix, quant["config_groups"])
        _check_weights_args(args, f"{directory}: {prefix}")
        bits, symmetric = int(args["num_bits"]), bool(args.get("symmetric", True))
        group_size = -1 if args["strategy"] == "channel" else int(args["group_size"])
        layer_tensors = {k: tensors.pop(f"{prefix}.{k}") for k in (*CT_KEYS, "bias") if f"{prefix}.{k}" in tensors}
        n, k = (int(v) for v in layer_tensors["weight_shape"])
        scale = layer_tensors["weight_scale"]  # [N, G]
        offset = 2 ** (bits - 1)
        codes = unpack_from_int32(layer_tensors["weight_packed"], bits, torch.Size([n, k])).to(torch.int64) + offset
        if symmetric:
            zeros = torch.full_like(scale, offset, dtype=torch.int64)
        else:
            zeros = unpack_from_int32(layer_tensors["weight_zero_point"], bits, scale.shape, packed_dim=0)
            zeros = zeros.to(torch.int64) + offset
        try:
            layer = CompressedLinear.from_codes(codes.t(), scale.t(), zeros.t(), bits, group_size,
                                                layer_tensors.get("weight_g_idx"), layer_tensors.get("bias"), dtype)
        except ValueError as err:
            raise ValueError(f"{directory}: cannot import {prefix}: {err}") from err
        set_module(model, prefix, layer)
        state.update({f"{prefix}.{key}": value for key, value in layer.state_dict().items()})
    if not prefixes:
        raise ValueError(f"{directory} holds no '*.weight_packed' tensor: not a pack-quantized checkpoint")
    _load_state(model, state | tensors, directory)
    return _finish(model, directory, {"method": "compressed-tensors", "quantization_config": quant})
