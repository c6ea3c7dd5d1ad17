"""How much of a model's decoder the run compresses: said before any work, recorded in the results.

The driver compresses the ``nn.Linear`` layers of each decoder block whose names are in the targets. A model
whose blocks hold other matrices keeps them dense: in transformers 5 the experts of a mixture-of-experts
layer (Mixtral, Qwen3-MoE, gpt-oss) are fused 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``), not linears, and they are ~95% of such a model's weights; a linear
left out of ``lora_target_modules`` stays dense too. :func:`compression_coverage` counts both, so that a
"compressed" model that is barely compressed is never silent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .sequential import find_decoder_layers, target_linears


@dataclass(frozen=True)
class Coverage:
    """Elements of the decoder blocks' matrices (parameters with 2 or more dimensions; norms and biases are not
    counted): ``compressed`` (weights of target linears), ``total``, and ``left_dense``: each matrix the run
    leaves dense, by its name inside a block (``mlp.experts.gate_up_proj``), summed over the blocks."""

    compressed: int
    total: int
    left_dense: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Fraction of the decoder's matrix elements the run compresses (1.0 when there are none)."""
        return self.compressed / self.total if self.total else 1.0

    def summary(self) -> str:
        """``100.0%`` or ``7.9% (dense: mlp.experts.gate_up_proj 61.4%, ...)``: what the results table shows."""
        if not self.left_dense:
            return f"{self.share:.1%}"
        parts = ", ".join(f"{name} {count / self.total:.1%}" for name, count in
                          sorted(self.left_dense.items(), key=lambda item: -item[1]))
        return f"{self.share:.1%} (dense: {parts})"

    def warning(self) -> str | None:
        """The log line for a run that leaves decoder matrices dense, naming them; None when it compresses all."""
        if not self.left_dense:
            return None
        kinds = []
        for name in sorted(self.left_dense, key=lambda n: -self.left_dense[n]):
            kind = "3-D expert parameter" if ".experts." in f".{name}" else "matrix outside lora_target_modules"
            kinds.append(f"{name} ({kind}, {self.left_dense[name] / self.total:.1%} of the decoder's weights)")
        return (f"only {self.share:.1%} of the decoder's weights will be compressed; these stay dense: "
                f"{'; '.join(kinds)}. eora_ft compresses and adapts nn.Linear layers named in lora_target_modules; "
                "fused mixture-of-experts parameters are not compressed (issue #35)")


def compression_coverage(model: nn.Module, targets: list[str] | None) -> Coverage:
    """:class:`Coverage` of ``model``'s decoder blocks for ``targets`` (last name components of the linears the
    run compresses; None = every linear). Reads shapes only: works on meta tensors."""
    _, layers = find_decoder_layers(model)
    compressed = total = 0
    left_dense: dict[str, int] = {}
    for layer in layers:
        targeted = {f"{name}.weight" for name in target_linears(layer, targets)}
        for name, param in layer.named_parameters():
            if param.dim() < 2:
                continue
            total += param.numel()
            if name in targeted:
                compressed += param.numel()
            else:
                key = re.sub(r"\.\d+\.", ".N.", f".{name}.")[1:-1]  # per-expert ModuleLists: one entry
                left_dense[key] = left_dense.get(key, 0) + param.numel()
    return Coverage(compressed, total, left_dense)
