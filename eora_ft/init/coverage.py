"""How much of a model's decoder the run compresses: said before any work, recorded in the results.

The driver compresses the ``nn.Linear`` layers of each decoder block whose names are in the targets. A model
whose blocks hold other matrices keeps them dense: the experts of a mixture-of-experts layer (Mixtral,
Qwen3-MoE, gpt-oss; ~95% of such a model's weights) are fused 3-D parameters in transformers 5, compressed only
once :func:`eora_ft.compress.experts.unfuse_experts` made them linears (when the targets name ``gate_proj``,
``up_proj`` or ``down_proj``); a linear left out of ``lora_target_modules`` stays dense too.
:func:`compression_coverage` counts both, so that a "compressed" model that is barely compressed is never
silent. The router (``mlp.gate``, ``mlp.router``: ``[E, H]``, well under 1% of the weights) stays dense by
design: it is counted, and not warned about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from eora_ft.compress.experts import expert_projection_names

from .sequential import find_decoder_layers, target_linears


@dataclass(frozen=True)
class Coverage:
    """Elements of the decoder blocks' matrices (parameters with 2 or more dimensions; norms and biases are not
    counted): ``compressed`` (weights of target linears), ``total``, and ``left_dense``: each matrix the run
    leaves dense, by its name inside a block (``mlp.experts.gate_up_proj``), summed over the blocks."""

    compressed: int
    total: int
    left_dense: dict[str, int] = field(default_factory=dict)
    routers: frozenset[str] = frozenset()  # the entries of ``left_dense`` that are routers, dense by design
    expert_names: tuple[str, ...] = ()  # the experts' linear names for lora_target_modules (Mixtral: w1, w3, w2)

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
        unwanted = {name: count for name, count in self.left_dense.items() if name not in self.routers}
        if not unwanted:
            return None
        kinds = []
        for name in sorted(unwanted, key=lambda n: -unwanted[n]):
            fused = ".experts." in f".{name}" and ".experts.N." not in f".{name}"
            kind = "3-D expert parameter" if fused else "matrix outside lora_target_modules"
            kinds.append(f"{name} ({kind}, {unwanted[name] / self.total:.1%} of the decoder's weights)")
        advice = ""
        if any(".experts." in f".{name}" and ".experts.N." not in f".{name}" for name in unwanted) and self.expert_names:
            advice = (f"; to compress and adapt the experts add {', '.join(self.expert_names)} to lora_target_modules "
                      "(each expert's matrices then become linears; a block with a post-expert norm stays fused)")
        return (f"only {self.share:.1%} of the decoder's weights will be compressed; these stay dense: "
                f"{'; '.join(kinds)}. eora_ft compresses and adapts nn.Linear layers named in lora_target_modules"
                f"{advice}")


def compression_coverage(model: nn.Module, targets: list[str] | None) -> Coverage:
    """:class:`Coverage` of ``model``'s decoder blocks for ``targets`` (last name components of the linears the
    run compresses; None = every linear). Reads shapes only: works on meta tensors."""
    _, layers = find_decoder_layers(model)
    compressed = total = 0
    left_dense: dict[str, int] = {}
    routers: set[str] = set()
    for layer in layers:
        targeted = {f"{name}.weight" for name in target_linears(layer, targets)}
        router_modules = {path for path, module in layer.named_modules() if "router" in type(module).__name__.lower()}
        for name, param in layer.named_parameters():
            if param.dim() < 2:
                continue
            total += param.numel()
            if name in targeted:
                compressed += param.numel()
            else:
                key = re.sub(r"\.\d+\.", ".N.", f".{name}.")[1:-1]  # per-expert ModuleLists: one entry
                left_dense[key] = left_dense.get(key, 0) + param.numel()
                if name.rpartition(".")[0] in router_modules:
                    routers.add(key)
    names = expert_projection_names(getattr(getattr(model, "config", None), "model_type", None))
    return Coverage(compressed, total, left_dense, frozenset(routers), names)
