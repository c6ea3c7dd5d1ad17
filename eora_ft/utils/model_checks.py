"""Checks on a model, its tokenizer and an adapter, run before any expensive stage.

Each raises with the file or tensor at fault and what would be valid, where the libraries underneath
would fail later (a NaN weight poisons every Hessian of its layer and surfaces as a failed Cholesky an
hour into compression) or with a message that names neither (``SafetensorError: HeaderTooLarge``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_FINITE_CHUNK = 1 << 24  # elements per reduction: bounded temporaries whatever the tensor's size


def check_model_directory(directory: str | os.PathLike) -> None:
    """A local checkpoint of an *uncompressed* model: ``config.json``, weights, a tokenizer, and safetensors files
    whose header and length agree (a truncated download or a file overwritten by something else fails here,
    by name). A PEFT adapter directory or an already compressed checkpoint is refused with what to pass instead."""
    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(f"model directory {directory} is a file; give the directory that holds config.json, "
                                 "the weights and the tokenizer files (or a hub id)")
    if not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():
            raise ValueError(f"model directory {directory} is a PEFT adapter, not a model: give its base model here "
                             "and the adapter as init_from_adapter (recipes) or --adapter (eora-ft eval)")
        raise FileNotFoundError(f"model directory {directory} has no config.json: give a directory written by "
                                "save_pretrained (config.json + weights + tokenizer files) or a hub id")
    compressed = _compression_of(directory)
    if compressed:
        raise ValueError(f"model directory {directory} is already compressed ({compressed}): give the uncompressed "
                         "model it was made from as model_name_or_path, and this one as compressed_model_name_or_path "
                         "(recipes) or --compressed_model (eora-ft init / eval)")
    weights = sorted(p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern))
    if not weights:
        raise FileNotFoundError(f"model directory {directory} has no weights: expected model.safetensors (or "
                                "sharded model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES) and not any(directory.glob("*.tiktoken")):
        raise FileNotFoundError(f"model directory {directory} has no tokenizer: expected one of "
                                f"{list(TOKENIZER_FILES)} next to config.json (tokenizer.save_pretrained(directory) "
                                "writes them)")
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors_file(path)


def _compression_of(directory: Path) -> str | None:
    """What compressed the checkpoint in ``directory`` (eora_ft, GPTQ, compressed-tensors...), or None."""
    if (directory / "compression_config.json").is_file():
        return "eora_ft's compression_config.json"
    try:
        quant = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # from_pretrained reports an unreadable config.json with its own words
    if isinstance(quant, dict):
        return f"quantization_config with quant_method {quant.get('quant_method', '?')!r}"
    return None


def check_positions(config, lengths: dict[str, int | None]) -> list[str]:
    """Warn (``UserWarning``) for each ``{knob: tokens}`` longer than the model's position range
    (``max_position_embeddings`` or its older names): RoPE models degrade past it, models with learned
    positions index out of range. Returns the warnings given."""
    import warnings

    limit = next((getattr(config, name) for name in POSITION_LIMITS if isinstance(getattr(config, name, None), int)),
                 None)
    given = []
    for knob, tokens in lengths.items():
        if limit is not None and tokens is not None and tokens > limit:
            given.append(f"{knob}={tokens} is longer than the model's {limit} positions (max_position_embeddings): "
                         f"its statistics or losses come from positions it was not trained on; use {knob} <= {limit}")
            warnings.warn(given[-1], UserWarning, stacklevel=2)
    return given


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Read only the header of a safetensors file and check it against the file's length; raise naming it."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    if size < 8:
        problem = f"{size} bytes, shorter than the 8-byte header length"
    else:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len > size - 8:
                problem = f"its header claims {header_len} bytes but the file has {size}"
            else:
                try:
                    header = json.loads(handle.read(header_len))
                    end = max((t["data_offsets"][1] for n, t in header.items() if n != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError) as err:
                    problem = f"its header is not valid safetensors JSON ({err})"
                else:
                    if 8 + header_len + end != size:
                        problem = f"the header's tensors end at byte {8 + header_len + end}, the file has {size} bytes"
    if problem:
        raise ValueError(f"safetensors file {path} is corrupt or truncated: {problem}; download or save it again")


def check_finite_weights(model: nn.Module) -> None:
    """Raise naming the first parameter or buffer holding NaN or Inf (scanned in chunks, on its own device)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            chunk = flat[start:start + _FINITE_CHUNK]
            low, high = torch.aminmax(chunk)  # NaN and Inf propagate: 50x faster than isfinite().all() on a CPU
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                bad = int((~torch.isfinite(chunk)).sum())
                raise ValueError(f"weight {name} {tuple(tensor.shape)} holds {bad}+ NaN/Inf values (first chunk at "
                                 f"element {start}): the checkpoint is damaged or was saved after a diverged run; "
                                 "compressing it would spread them to every statistic of its layer")


def check_tokenizer(tokenizer, source: str) -> None:
    """EOS is required (TRL ends completions with it, packing and calibration separate documents with it);
    padding falls back to it when the tokenizer has none."""
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {source} has no eos_token (pad_token={tokenizer.pad_token!r}): set one "
                         "in its tokenizer_config.json (\"eos_token\": \"...\", a token of its vocabulary) or "
                         "pass a model whose tokenizer defines it")


def check_adapter_fits(model: nn.Module, directory: str | os.PathLike) -> None:
    """Every ``lora_A``/``lora_B`` of the adapter in ``directory`` must match a linear of ``model`` in shape.

    ``lora_A.weight`` is ``[r, in_features]`` and ``lora_B.weight`` ``[out_features, r]``; an adapter made
    for another base (or another model size) fails here naming the tensor, where PEFT would report a
    ``size mismatch`` deep in ``load_state_dict`` or silently skip the layers it cannot find."""
    from safetensors import safe_open

    directory = Path(directory)
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"adapter directory {directory} has no adapter_model.safetensors (a PEFT adapter "
                                "saved with save_pretrained holds it next to adapter_config.json)")
    check_safetensors_file(weights)
    shapes = {}
    for name, module in model.named_modules():
        in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(in_features, int) and isinstance(out_features, int):
            shapes[name.removeprefix("base_model.model.")] = (in_features, out_features)
    with safe_open(str(weights), "pt") as handle:
        for key in handle.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_path = key.removeprefix("base_model.model.").split(".lora_")[0]
            shape = tuple(handle.get_slice(key).get_shape())
            if module_path not in shapes:
                raise ValueError(f"adapter tensor {key} {shape} in {directory} adapts {module_path!r}, which this "
                                 f"model does not have (it has e.g. {sorted(shapes)[:3]}): the adapter was made for "
                                 "another base model")
            in_features, out_features = shapes[module_path]
            expected_dim, axis = (in_features, 1) if ".lora_A." in key else (out_features, 0)
            if len(shape) != 2 or shape[axis] != expected_dim:
                raise ValueError(f"adapter tensor {key} has shape {shape} but {module_path} is a {in_features} -> "
                                 f"{out_features} linear (lora_A must be [r, {in_features}], lora_B [{out_features}, r]): "
                                 "the adapter was made for another base model")
