"""A model someone already compressed, brought in as a recipe's base entry.

``compressed_model_name_or_path`` names a checkpoint that another tool wrote (GPTQModel or AutoGPTQ GPTQ, v1
or v2; llm-compressor's compressed-tensors ``pack-quantized``; or an ``eora-ft compress`` directory), next to
``model_name_or_path``, the model it was compressed from. The recipe then skips compression: this module
resolves the checkpoint (a local directory, or a hub id read through the local Hugging Face cache), checks
that the two belong together before anything expensive runs (:func:`check_pair`), and writes the base entry
(:func:`build_imported_base`): the checkpoint imported by :func:`eora_ft.compress.formats.import_model` and
saved in eora_ft's format, so the rest of the run (the adapter's calibration pass on ``W - W_c``, training,
evaluation) reads it like a base it compressed itself. The adapters name the user's checkpoint
(:func:`imported_adapter_base`), and nothing is exported.

The cache key (:func:`imported_base_key_parts`) covers the checkpoint's files, the original model's files (the
initial adapter corrects ``W - W_c``, and the init entry's key only covers the base entry's), the target
linears and the dtype.

**Initializers that re-compress (``loftq``, ``eora_alt``) are refused.** Both replace the base with their own
compression (LoftQ's ``Q_T``; eora_alt's best iterate), so the adapter would no longer belong to the
checkpoint the user brought, which is the point of bringing one; and eora_ft cannot redo another tool's
compression anyway (GPTQModel's or llm-compressor's GPTQ variant, damping and grid choices, mixed
precision). :func:`implied_compression` reads the grid the checkpoint uses, which the refusal names as the
settings of a run that compresses ``model_name_or_path`` itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from eora_ft.compress.experts import unfuse_experts
from eora_ft.compress.formats import detect_format, import_model
from eora_ft.compress.io import (
    COMPRESSOR_OPTIONS,
    CONFIG,
    QUANTIZE_CONFIG,
    gptq_module_spec,
    read_compression_config,
    recorded_options,
    save_compressed,
    weight_files,
)
from eora_ft.config import UNCOMPRESSED, AdapterInitArguments, CompressionArguments, EoraModelConfig
from eora_ft.data import resolve_path
from eora_ft.data.sources import _looks_like_hub_id
from eora_ft.init import INITIALIZERS, REBASING_INITS
from eora_ft.init.sequential import find_decoder_layers, target_linears
from eora_ft.run.artifacts import BASE_DIR
from eora_ft.run.cache import cache_key, ensure_entry, model_fingerprint
from eora_ft.utils.dtypes import model_dtype

logger = logging.getLogger(__name__)

# bump when importing a checkpoint gives other tensors than before (how a format is read): stale entries rebuild
IMPORT_VERSION = 1
# config fields that fix the shape of some tensor (those a config lacks are not compared)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "ffn_dim", "word_embed_proj_dim", "moe_intermediate_size",
                "shared_expert_intermediate_size", "num_local_experts", "num_experts", "n_routed_experts",
                "n_shared_experts")
# what a hub snapshot needs: configs, weights, tokenizer files, llm-compressor's recipe (never pickled .bin)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.yaml", "*.md"]
_FIELD = "compressed_model_name_or_path"


@dataclass(frozen=True)
class Checkpoint:
    """A resolved compressed checkpoint: ``directory`` holds its files (a hub snapshot in the local cache, or the
    user's directory), ``name`` is what an adapter names as its base (the absolute local path, or the hub id),
    ``commit`` the hub commit (None for a local directory), ``format`` its reader
    (:data:`eora_ft.compress.formats.READERS`: ``gptq``, ``compressed-tensors`` or ``eora_ft``)."""

    directory: Path
    name: str
    commit: str | None
    format: str


def resolve_checkpoint(name_or_path: str, what: str = _FIELD, revision: str | None = None) -> Checkpoint:
    """A local directory (relative to the cwd, then the eora_ft checkout) or a hub id, resolved to local files.

    A hub id goes through ``huggingface_hub.snapshot_download`` (configs, safetensors, tokenizer files): with
    ``HF_HUB_OFFLINE=1`` it is read from the local cache, and one that is not there is refused naming the id.
    A path that does not exist, or a directory that is no compressed checkpoint eora_ft reads, is refused naming
    ``what`` (the argument it came from)."""
    local = resolve_path(name_or_path)
    if os.path.exists(local):
        directory = Path(local).resolve()
        if not directory.is_dir():
            raise NotADirectoryError(f"{what} {name_or_path!r} is a file; give the checkpoint's directory")
        name, commit = str(directory), None
    elif _looks_like_hub_id(name_or_path):
        directory, commit = _snapshot(name_or_path, what, revision)
        name = name_or_path
    else:
        raise FileNotFoundError(f"{what} {name_or_path!r} does not exist (looked relative to {os.getcwd()!r} and the "
                                "eora_ft checkout); give the directory of a compressed checkpoint or a hub id "
                                "(org/name)")
    try:
        fmt = detect_format(directory)
    except ValueError as err:
        raise ValueError(f"{what} {name_or_path!r}: {err}") from None
    return Checkpoint(directory, name, commit, fmt)


def _snapshot(repo_id: str, what: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(f"{what} {repo_id!r} is neither a local directory nor in the local Hugging Face "
                                f"cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): download it "
                                "where the hub is reachable, or give its local directory") from err
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(f"{what} {repo_id!r} is neither a local directory nor a hub repository: "
                                f"{err.__class__.__name__}") from err
    return path, (path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None)


def _read_quant(directory: Path, fmt: str) -> dict:
    """The checkpoint's ``quantization_config`` (``config.json``, else AutoGPTQ's ``quantize_config.json``), or
    for eora_ft's format its ``compression_config.json``."""
    if fmt == "eora_ft":
        return read_compression_config(directory)[0]
    quant = json.loads((directory / CONFIG).read_text()).get("quantization_config") or {}
    if not quant and (directory / QUANTIZE_CONFIG).exists():
        quant = json.loads((directory / QUANTIZE_CONFIG).read_text())
    return quant


def _ct_weights(quant: dict) -> list[dict]:
    return [group.get("weights") or {} for group in (quant.get("config_groups") or {}).values()]


def implied_compression(directory: str | os.PathLike) -> dict:
    """The :class:`~eora_ft.config.CompressionArguments` fields a checkpoint's own config implies: ``compress_method``
    (``gptq`` for a GPTQ checkpoint and for compressed-tensors that llm-compressor's ``recipe.yaml`` says GPTQ made,
    ``rtn`` for other compressed-tensors, the recorded method for eora_ft's format), ``bits``, ``group_size``,
    ``sym``, ``act_order`` (GPTQ ``desc_act``; a compressed-tensors ``actorder``), and ``damp_percent`` when
    recorded. Mixed precision (GPTQModel ``dynamic`` rules, several compressed-tensors groups) gives the global or
    first group's grid. Read from the configs only, no tensor."""
    directory = Path(directory)
    fmt = detect_format(directory)
    quant = _read_quant(directory, fmt)
    if fmt == "eora_ft":
        return {"compress_method": quant.get("method", "gptq"), **recorded_options(quant)}
    if fmt == "gptq":
        implied = {"compress_method": "gptq", "bits": int(quant["bits"]),
                   "group_size": int(quant.get("group_size", -1)), "sym": bool(quant.get("sym", True)),
                   "act_order": bool(quant.get("desc_act", False))}
        damp = quant.get("damp_percent") or (quant.get("meta") or {}).get("damp_percent")
        return implied | ({"damp_percent": float(damp)} if damp else {})
    weights = _ct_weights(quant)[0]
    recipe = directory / "recipe.yaml"
    gptq = recipe.exists() and "GPTQModifier" in recipe.read_text()
    return {"compress_method": "gptq" if gptq else "rtn", "bits": int(weights["num_bits"]),
            "group_size": -1 if weights.get("strategy") == "channel" else int(weights["group_size"]),
            "sym": bool(weights.get("symmetric", True)), "act_order": bool(gptq and weights.get("actorder"))}


def describe_checkpoint(directory: str | os.PathLike) -> str:
    """A short label of how the checkpoint was compressed, read from its config: ``imported GPTQ 4-bit g128 asym
    desc_act (v2)``, ``imported compressed-tensors W4A16 g32 asym actorder=weight``, ``imported eora_ft gptq 2-bit
    g128`` (``channel`` for per-channel grids, ``mixed`` when modules differ)."""
    directory = Path(directory)
    fmt = detect_format(directory)
    quant = _read_quant(directory, fmt)

    def grid(group, sym) -> str:
        return f"{'channel' if int(group) == -1 else f'g{group}'} {'sym' if sym else 'asym'}"

    if fmt == "eora_ft":
        return f"imported eora_ft {quant.get('description') or quant.get('method', '')}".strip()
    if fmt == "gptq":
        version = "v2" if str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower() == "gptq_v2" \
            else "v1"
        label = (f"imported GPTQ {quant['bits']}-bit {grid(quant.get('group_size', -1), quant.get('sym', True))}"
                 f"{' desc_act' if quant.get('desc_act') else ''} ({version})")
        return label + (" mixed" if quant.get("dynamic") else "")
    parts = []
    for weights in _ct_weights(quant):
        group = -1 if weights.get("strategy") == "channel" else weights.get("group_size")
        actorder = weights.get("actorder")
        parts.append(f"W{weights.get('num_bits')}A16 {grid(group, weights.get('symmetric', True))}"
                     f"{f' actorder={actorder}' if actorder else ''}")
    return "imported compressed-tensors " + ("; ".join(parts) if len(parts) == 1 else "mixed: " + "; ".join(parts))


def _checkpoint_linears(directory: Path, fmt: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """``{module path: (kind, (out_features, in_features))}`` of every linear the checkpoint stores, compressed
    (``kind`` ``compressed``) or as a dense 2-D ``weight`` (``dense``), read from the safetensors headers."""
    from safetensors import safe_open

    if fmt == "eora_ft":
        modules = read_compression_config(directory)[0]["modules"]
        return {path: ("compressed", (spec["out_features"], spec["in_features"])) for path, spec in modules.items()}
    quant = _read_quant(directory, fmt)
    found: dict[str, tuple[str, tuple[int, int]]] = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                prefix, _, key = name.rpartition(".")
                if fmt == "gptq" and key == "qweight":
                    rows, cols = weights.get_slice(name).get_shape()
                    bits = gptq_module_spec(quant, prefix)[0]
                    found[prefix] = ("compressed", (cols, rows * 32 // bits))
                elif fmt == "compressed-tensors" and key == "weight_shape":
                    found[prefix] = ("compressed", tuple(int(v) for v in weights.get_tensor(name).tolist()))
                elif key == "weight" and len(weights.get_slice(name).get_shape()) == 2:
                    found.setdefault(prefix, ("dense", tuple(weights.get_slice(name).get_shape())))
    return found


def _original_linears(original: nn.Module | PretrainedConfig, targets: list[str] | None) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` of the original's target linears, in model order. A config
    is built on the meta device (no memory, no weights read)."""
    if isinstance(original, PretrainedConfig):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            original = AutoModelForCausalLM.from_config(original)
        unfuse_experts(original, targets)  # as the loaded model will be: per-expert linears
    prefix, layers = find_decoder_layers(original)
    return {f"{prefix}.{index}.{name}": (linear.out_features, linear.in_features)
            for index, layer in enumerate(layers) for name, linear in target_linears(layer, targets).items()}


def check_pair(original: nn.Module | PretrainedConfig | str | os.PathLike, compressed: str | os.PathLike | Checkpoint,
               targets: list[str] | None) -> None:
    """Refuse, before any expensive work, a compressed checkpoint that is not a compression of ``original`` (a model,
    its config, or its hub id / directory, of which only the config is read).

    Checked in this order, and the ValueError names the first difference: ``model_type``; every config field that
    fixes a shape (:data:`SHAPE_FIELDS`, where both configs have it); then every target linear of the original, in
    model order, must be stored compressed in the checkpoint with the same ``[out_features, in_features]``
    (``model.layers.3.mlp.down_proj: compressed [4096, 14336] vs original [4096, 11008]``). Linears the checkpoint
    compresses beyond the targets are fine (they stay compressed and get no adapter)."""
    checkpoint = compressed if isinstance(compressed, Checkpoint) else resolve_checkpoint(str(compressed))
    if isinstance(original, (nn.Module, PretrainedConfig)):
        config = original.config if isinstance(original, nn.Module) else original
        source = getattr(config, "_name_or_path", None) or "the original model"
    else:
        source, config = str(original), AutoConfig.from_pretrained(resolve_path(str(original)))
    theirs = AutoConfig.from_pretrained(checkpoint.directory)
    problem = None
    if theirs.model_type != config.model_type:
        problem = f"model_type: compressed {theirs.model_type!r} vs original {config.model_type!r}"
    for name in SHAPE_FIELDS if problem is None else ():
        mine, other = getattr(config, name, None), getattr(theirs, name, None)
        if mine is not None and other is not None and mine != other:
            problem = f"{name}: compressed {other} vs original {mine}"
            break
    if problem is None:
        stored = _checkpoint_linears(checkpoint.directory, checkpoint.format)
        for path, shape in _original_linears(config if not isinstance(original, nn.Module) else original,
                                             targets).items():
            kind, other = stored.get(path, (None, None))
            if kind == "compressed" and tuple(other) == shape:
                continue
            problem = (f"{path}: compressed {list(other)} vs original {list(shape)}" if kind == "compressed" else
                       f"{path}: not compressed in the checkpoint" + (f" (a dense {list(other)} weight there): leave "
                                                                      "it out of lora_target_modules" if other else ""))
            break
    if problem is not None:
        raise ValueError(f"{_FIELD} {checkpoint.name!r} is not a compression of model_name_or_path {source!r}: "
                         f"{problem} (the first difference; the original must be the model the checkpoint was "
                         "compressed from, which EoRA and the other initializers need for W - W_c)")


def check_same_weights(model: nn.Module, checkpoint: Checkpoint, *, max_tensors: int = 8) -> None:
    """Refuse a checkpoint compressed from another model with the same shapes (Llama-3-8B vs its Instruct tune):
    the 1-D float tensors both hold (norms, biases; up to ``max_tensors``) must be the original's, cast to the
    checkpoint's dtype, in at least 99% of their elements (a compressor copies them through; a fine-tune moves
    them). The first that is not is named with its largest relative difference. Read from the checkpoint's
    safetensors (``model``: the loaded original, any device)."""
    from safetensors import safe_open

    if checkpoint.format == "eora_ft":
        files = [checkpoint.directory / "model.safetensors"]
    else:
        files = weight_files(checkpoint.directory)
    mine = dict(model.named_parameters())
    compared = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                if compared >= max_tensors or name not in mine or len(weights.get_slice(name).get_shape()) != 1:
                    continue
                theirs = weights.get_tensor(name)
                if not theirs.is_floating_point() or tuple(theirs.shape) != tuple(mine[name].shape):
                    continue
                ours = mine[name].detach().to("cpu", theirs.dtype)
                compared += 1
                if (ours == theirs).float().mean() < 0.99:
                    difference = float(((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()
                                        .clamp_min(1e-12)))
                    raise ValueError(f"{_FIELD} {checkpoint.name!r} was not compressed from model_name_or_path "
                                     f"{getattr(model.config, '_name_or_path', '')!r}: its {name} differs (largest "
                                     f"relative difference {difference:.2e}), which a compressor copies unchanged; "
                                     "give the exact model it was made from (a base vs an instruction-tuned release "
                                     "has the same shapes), since EoRA and the other initializers need its W - W_c")


def check_init_method(init_args: AdapterInitArguments, checkpoint: Checkpoint) -> None:
    """Refuse an initializer that re-compresses the weights (:data:`REBASING_INITS`): it would replace the
    checkpoint with a base of its own (see the module docstring), naming the settings of a run that compresses
    the original itself on the checkpoint's grid."""
    if init_args.init_from_adapter or init_args.init_method not in REBASING_INITS:
        return
    implied = implied_compression(checkpoint.directory)
    settings = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in implied.items())
    raise ValueError(f"init_method={init_args.init_method!r} re-compresses the weights and replaces the base with its "
                     f"own, so its adapter would not belong to {_FIELD} {checkpoint.name!r}: use one of "
                     f"{sorted(set(INITIALIZERS) - REBASING_INITS)} with a compressed checkpoint, or drop {_FIELD} and let the run compress "
                     f"model_name_or_path itself on the checkpoint's grid ({settings})")


def prepare_import(model_args: EoraModelConfig, compress_args: CompressionArguments,
                   init_args: AdapterInitArguments) -> tuple[Checkpoint, CompressionArguments]:
    """Everything a run checks about ``compressed_model_name_or_path`` before loading the original: resolve it, refuse
    ``compress_method: none`` and the re-compressing initializers, :func:`check_pair` against the original's config.
    Returns the checkpoint and the compression arguments that describe it (:func:`implied_compression` in place of
    the recipe's compression fields; the calibration fields stay the run's, the adapter calibration reads them)."""
    if compress_args.compress_method == UNCOMPRESSED:
        raise ValueError(f"compress_method={UNCOMPRESSED!r} (the uncompressed ceiling) and {_FIELD} contradict each "
                         f"other: drop one of them")
    checkpoint = resolve_checkpoint(model_args.compressed_model_name_or_path)
    check_init_method(init_args, checkpoint)
    config = AutoConfig.from_pretrained(resolve_path(model_args.model_name_or_path), revision=model_args.model_revision)
    check_pair(config, checkpoint, model_args.lora_target_modules)
    implied = implied_compression(checkpoint.directory)
    replaced = {key: (getattr(compress_args, key), value) for key, value in implied.items()
                if hasattr(compress_args, key) and getattr(compress_args, key) != value}
    if replaced:  # the checkpoint is what it is: the run's own compression fields describe nothing
        logger.info("compression settings come from %s, not from the config: %s", checkpoint.name,
                    ", ".join(f"{key} {new!r} (config: {old!r})" for key, (old, new) in replaced.items()))
    return checkpoint, dataclasses.replace(compress_args, **({"grid_search": False} | implied))


def imported_base_key_parts(checkpoint: Checkpoint, model_dir: str, dtype: torch.dtype, targets: list[str] | None,
                            commit: str | None = None) -> dict:
    """What an imported base entry depends on: the checkpoint's files (sha256 of each, or the hub commit), the
    original model's (``model_dir``, at hub ``commit``: the init entry keyed on this one corrects its ``W - W_c``),
    the target linears, the float ``dtype`` the run loads in and :data:`IMPORT_VERSION`. Hashed by
    :func:`eora_ft.run.cache.cache_key`."""
    return {
        "kind": "base",
        "imported": model_fingerprint(checkpoint.directory, checkpoint.commit),
        "import_version": IMPORT_VERSION,
        "original": model_fingerprint(model_dir, commit),
        "dtype": str(dtype),
        "targets": targets,
    }


def ensure_imported_base(cache_root: Path, checkpoint: Checkpoint, model_args: EoraModelConfig,
                         device: torch.device | str, tokenizer=None) -> tuple[Path, bool]:
    """The base entry of ``checkpoint`` in ``cache_root`` (built when missing), ``(entry, built)``. Called before
    the original model loads: the imported packed model and the original are never in host memory together
    (35 GB beside 140 GB for a 4-bit 70B)."""
    model_dir = resolve_path(model_args.model_name_or_path)
    dtype = model_dtype(model_args.dtype, model_dir, device, revision=model_args.model_revision)
    commit = getattr(AutoConfig.from_pretrained(model_dir, revision=model_args.model_revision), "_commit_hash", None)
    key = cache_key(imported_base_key_parts(checkpoint, model_dir, dtype, model_args.lora_target_modules, commit))
    return ensure_entry(cache_root, key, lambda tmp: build_imported_base(tmp, checkpoint, dtype, tokenizer))


def build_imported_base(directory: Path, checkpoint: Checkpoint, dtype: torch.dtype, tokenizer=None) -> dict:
    """Import ``checkpoint`` (:func:`eora_ft.compress.formats.import_model`, float tensors in ``dtype``) and write
    ``directory/base`` in eora_ft's format, recording the grid it implies (:func:`implied_compression`) and its
    description; returns the entry's metadata in :func:`eora_ft.run.artifacts.build_base`'s shape (no calibration
    tokens, no per-layer errors: nothing was compressed here)."""
    start = time.perf_counter()
    model = import_model(checkpoint.directory, dtype=dtype)
    description = describe_checkpoint(checkpoint.directory)
    implied = implied_compression(checkpoint.directory)
    save_compressed(model, directory / BASE_DIR, {
        "method": implied["compress_method"], **{k: implied[k] for k in COMPRESSOR_OPTIONS if k in implied},
        "description": description, "true_sequential": False, "calib_tokens": 0,
        "imported": {"format": checkpoint.format, "import_version": IMPORT_VERSION}}, tokenizer=tokenizer)
    del model
    return {"calib_tokens": 0, "layers": [], "compress_seconds": 0.0, "stage_seconds": {},
            "build_seconds": time.perf_counter() - start, "compression": description,
            "imported": {"format": checkpoint.format, "commit": checkpoint.commit}}


def imported_adapter_base(name_or_path: str) -> tuple[str, str]:
    """``(name, format)`` an adapter of an imported base records as its base: the checkpoint the user gave (its
    absolute path, or its hub id) and its format; nothing is exported."""
    checkpoint = resolve_checkpoint(name_or_path)
    return checkpoint.name, checkpoint.format


__all__ = ["Checkpoint", "build_imported_base", "check_init_method", "check_pair", "check_same_weights",
           "describe_checkpoint",
           "ensure_imported_base",
           "implied_compression", "imported_adapter_base", "imported_base_key_parts", "prepare_import",
           "resolve_checkpoint"]
