"""A saved compressed model's linears, read one at a time.

Factoring an initial adapter walks the uncompressed model layer by layer and swaps each saved compressed
linear in as it goes (:func:`eora_ft.run.initial_adapter.initial_adapter`). Loading the whole packed model
first (:func:`.io.load_compressed`) would hold it beside the uncompressed one: 35 GB on top of 141 GB of
host memory for a 4-bit Llama-3-70B. :class:`PackedLinears` is the same ``{path: CompressedLinear}`` mapping,
each entry read from ``model.safetensors`` (``safe_open``, memory-mapped) when it is asked for and not kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .io import WEIGHTS, _upgrade_v1_layer, compressed_shell, read_compression_config
from .linear import CompressedLinear


class PackedLinears(Mapping):
    """``{module path: CompressedLinear}`` of a :func:`.io.save_compressed` directory, read on access.

    ``targets``: last name components to keep (None: every compressed linear). Each access reads that layer's
    tensors (int32 codes, uint8 zero points, float scales/values/bias in ``dtype``) onto the CPU and returns a
    fresh module, which the caller moves where it computes. ``meta`` is the directory's compression config;
    ``specs`` its per-layer shapes without reading any tensor. NF4 layers are not read here (bitsandbytes
    rebuilds them from a whole state): use :func:`.io.load_compressed` for an NF4 base."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 targets: list[str] | None = None) -> None:
        self.directory, self.dtype = Path(directory), dtype
        self.meta, self.version = read_compression_config(self.directory)
        nf4 = [path for path, spec in self.meta["modules"].items() if spec.get("kind") == "nf4"]
        if nf4:
            raise ValueError(f"{self.directory} holds NF4 layers ({nf4[0]}, ...), which PackedLinears does not read: "
                             "load it with load_compressed")
        self.specs = {path: spec for path, spec in self.meta["modules"].items()
                      if targets is None or path.split(".")[-1] in targets}

    def __getitem__(self, path: str) -> CompressedLinear:
        spec = self.specs[path]
        with safe_open(str(self.directory / WEIGHTS), framework="pt", device="cpu") as weights:
            state = {name: weights.get_tensor(name) for name in weights.keys() if name.startswith(f"{path}.")}
        if self.version == 1:
            spec = _upgrade_v1_layer(path, spec, state)
        layer = compressed_shell(spec, self.dtype)
        local = {name[len(path) + 1:]: t.to(self.dtype) if t.is_floating_point() else t for name, t in state.items()}
        try:
            layer.load_state_dict(local, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{self.directory / WEIGHTS}: the tensors of {path} do not fit its entry in "
                             f"compression_config.json: {err}") from err
        return layer.eval()

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, path: object) -> bool:
        return path in self.specs


def compressed_linears(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       targets: list[str] | None = None) -> Mapping:
    """The compressed linears of a :func:`.io.save_compressed` directory named by ``targets`` (None: all):
    :class:`PackedLinears` (read one at a time), or for an NF4 base the layers of the whole loaded model."""
    meta, _ = read_compression_config(Path(directory))
    if not any(spec.get("kind") == "nf4" for spec in meta["modules"].values()):
        return PackedLinears(directory, dtype, targets)
    from .io import load_compressed

    model = load_compressed(directory, dtype=dtype)
    return {path: module for path, module in model.named_modules()
            if path in meta["modules"] and (targets is None or path.split(".")[-1] in targets)}
