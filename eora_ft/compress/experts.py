"""Mixture-of-experts experts as one ``nn.Linear`` per expert matrix, so that every stage sees them as linears.

In transformers 5 the experts of a mixture-of-experts block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
gpt-oss, ...) are one module holding fused 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj``
``[E, H, I]``; gpt-oss transposed, interleaved and with biases). :func:`unfuse_experts` replaces that module by
:class:`ExpertLinears`: expert ``e`` becomes three linears named as the model's original per-expert checkpoints
name them (transformers' own conversion mapping says how: ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``
for Qwen2/3-MoE, OLMoE, DeepSeek; ``experts.{e}.w1`` / ``w3`` / ``w2`` for Mixtral; ``gate_proj`` / ``up_proj`` /
``down_proj`` where there is none, e.g. gpt-oss). The driver then compresses each expert on the statistics of the
tokens routed to it (its linears' hooks fire only on those), each gets its own EoRA factors, and PEFT adapts each
as a plain LoRA linear. With those names the adapter is the per-expert layout PEFT converts on load onto
transformers 5's fused experts (its transformers-v4 compatibility), so it also loads on the plain model. The
router stays the model's own module, dense and frozen.

The forward keeps the routing exactly: the same ``top_k_index`` / ``top_k_weights``, the model's own gating
(``_apply_gate``: SwiGLU, or gpt-oss's clamped variant), the same weighted ``index_add_``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# the attributes transformers' ``use_experts_implementation`` sets on a fused experts class (5.17 onward)
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
# an expert's (gate, up, down) linears where the model type's conversion mapping names none
DEFAULT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+\.")
_EXPERT_PATH = re.compile(r"(^|\.)experts\.\d+\.[A-Za-z_]\w*$")


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused experts module: 3-D ``down_proj`` and ``gate_up_proj`` (or ``up_proj``)."""
    down = getattr(module, "down_proj", None)
    upward = getattr(module, "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", None)
    return (all(hasattr(module, flag) for flag in _LAYOUT_FLAGS)
            and isinstance(down, nn.Parameter) and down.dim() == 3
            and isinstance(upward, nn.Parameter) and upward.dim() == 3)


def is_expert_linear_path(path: str) -> bool:
    """True for ``...experts.{e}.{name}`` (a linear of an unfused expert)."""
    return _EXPERT_PATH.search(path) is not None


def expert_pattern(name: str) -> str:
    """``mlp.experts.N.w1`` for ``mlp.experts.7.w1``: the same name for every expert of a block."""
    return _EXPERT_INDEX.sub(r"\1experts.N.", name)


def _leaf(pattern: str) -> str | None:
    """``w1`` from transformers' source pattern ``\\.experts.*.w1.weight``."""
    parts = pattern.replace("\\", "").removesuffix("$").split(".")
    name = parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else None
    return name if name and name.isidentifier() else None


def expert_projection_names(model_type: str | None) -> tuple[str, str, str]:
    """``(gate, up, down)``: the names the original per-expert checkpoints of ``model_type`` give an expert's
    linears, read from transformers' checkpoint conversion mapping (what it fuses into ``experts.gate_up_proj`` and
    ``experts.down_proj`` on load); :data:`DEFAULT_PROJECTIONS` where it has none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        conversions = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # an older or newer layout of that private module: the default names
        conversions = []
    gate = up = down = None
    for conversion in conversions:
        sources = [_leaf(p) for p in _patterns(conversion, "source_patterns")]
        targets = _patterns(conversion, "target_patterns")
        if len(targets) != 1 or None in sources:
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(sources) == 2:
            gate, up = sources
        elif targets[0].endswith("experts.down_proj") and len(sources) == 1:
            down = sources[0]
    return (gate, up, down) if gate and up and down else DEFAULT_PROJECTIONS


def _patterns(conversion, name: str) -> list[str]:
    value = getattr(conversion, name, None) or []
    return [value] if isinstance(value, str) else list(value)


class Expert(nn.Module):
    """One expert's linears, under the names :func:`expert_projection_names` gives (no gate: two linears)."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear | None, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        for name, linear in zip(names, (gate, up, down)):
            if linear is not None:
                setattr(self, name, linear)


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as a list of :class:`Expert` (``experts.{e}.up_proj`` ...), called as the fused
    module was: ``forward(hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k])`` -> ``[T, H]``
    in ``hidden_states``' dtype, on its device.

    ``route_all``: experts that run on every token reaching the block, so that their linears' hooks see them all
    (llm-compressor's ``calibrate_all_experts``); only the rows of the tokens routed to them enter the output, which
    is the routed one up to fp rounding (the calibration passes that set it discard it anyway)."""

    def __init__(self, experts: list[Expert], fused: nn.Module, names: tuple[str, str, str]) -> None:
        super().__init__(experts)
        self.gate_name, self.up_name, self.down_name = names
        # the fused module, parameters removed, supplies the gating (act_fn, gpt-oss's alpha/limit); kept out
        # of the module tree so that no stage mistakes it for a layer
        object.__setattr__(self, "_gating", fused)
        self.num_experts = len(experts)
        self.has_gate = fused.has_gate
        self.is_concatenated = fused.is_concatenated
        self.route_all: set[int] = set()

    def _gated(self, expert: Expert, x: torch.Tensor) -> torch.Tensor:
        up = getattr(expert, self.up_name)(x)
        if not self.has_gate:
            return self._gating.act_fn(up)
        gate = getattr(expert, self.gate_name)(x)
        # the model's own gating on the fused layout it expects: [gate | up], or gate/up interleaved
        fused = torch.cat((gate, up), dim=-1) if self.is_concatenated else torch.stack((gate, up), dim=-1).flatten(-2)
        return self._gating._apply_gate(fused)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        slots = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
        # one device-to-host copy per block (not one per expert): how many pairs each expert got; index
        # num_experts is a slot the router dropped (Mixtral's masking) and selects no expert
        counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()
        # training calls every expert, in order, the unrouted ones on no token: each rank then gives every adapter a
        # gradient (zero there) and runs the same modules, which FSDP2's reduce-scatter and ZeRO-3's gathers need
        every_expert = torch.is_grad_enabled()
        start = 0
        for index in range(self.num_experts):
            pairs = order[start:start + counts[index]]
            start += counts[index]
            if not counts[index] and index not in self.route_all and not every_expert:
                continue
            tokens, position = pairs // slots, pairs % slots
            expert = self[index]
            down = getattr(expert, self.down_name)
            if index in self.route_all:  # every token through it, for its linears' hooks; the routed rows kept
                out = down(self._gated(expert, hidden_states))[tokens]
            else:
                out = down(self._gated(expert, hidden_states[tokens]))
            out = out * top_k_weights[tokens, position, None]
            output.index_add_(0, tokens, out.to(output.dtype))
        return output


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``[out, in]`` (contiguous; a view of the fused storage where it already
    is) and ``bias``, with no fresh initialization (works on meta tensors)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous())
    return linear


def _split(fused: nn.Module, names: tuple[str, str, str]) -> list[Expert]:
    """Per-expert linears of a fused module, read as transformers' experts implementations read them."""
    transposed, concatenated = fused.is_transposed, fused.is_concatenated
    down = fused.down_proj.detach()
    upward = (fused.gate_up_proj if fused.has_gate else fused.up_proj).detach()
    down_bias = fused.down_proj_bias.detach() if fused.has_bias else None
    up_bias = (fused.gate_up_proj_bias if fused.has_gate else fused.up_proj_bias).detach() if fused.has_bias else None
    experts = []
    for index in range(down.shape[0]):
        matrix = upward[index].t() if transposed else upward[index]  # [2I or I, H]
        bias = up_bias[index] if up_bias is not None else None
        if fused.has_gate:
            half = matrix.shape[0] // 2
            if concatenated:
                gate, up = (matrix[:half], bias[:half] if bias is not None else None), \
                           (matrix[half:], bias[half:] if bias is not None else None)
            else:
                gate, up = (matrix[0::2], bias[0::2] if bias is not None else None), \
                           (matrix[1::2], bias[1::2] if bias is not None else None)
            gate_proj = _linear(*gate)
        else:
            gate_proj, up = None, (matrix, bias)
        down_matrix = down[index].t() if transposed else down[index]  # [H, I]
        experts.append(Expert(names, gate_proj, _linear(*up),
                              _linear(down_matrix, down_bias[index] if down_bias is not None else None)))
    return experts


def unfuse_experts(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`ExpertLinears`, in place, when ``targets`` (the
    run's ``lora_target_modules``; None = every linear) names one of its experts' linears
    (:func:`expert_projection_names`: ``w1``/``w2``/``w3`` for Mixtral); returns the replaced paths.

    The linears hold views of the fused storage where the layout allows (no copy: a 70B model unfuses on the
    CPU it was loaded on), on the fused parameters' device and dtype. A module with a post-expert norm
    (transformers >= 5.25's ``has_post_expert_norm``) is left fused: the coverage line names it."""
    names = expert_projection_names(getattr(getattr(model, "config", None), "model_type", None))
    if targets is not None and not set(targets) & set(names):
        return []
    replaced = []
    for path, module in list(model.named_modules()):
        if not is_fused_experts(module) or getattr(module, "has_post_expert_norm", False):
            continue
        experts, requires_grad = _split(module, names), module.down_proj.requires_grad
        for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                delattr(module, name)
        unfused = ExpertLinears(experts, module, names)
        for param in unfused.parameters():
            param.requires_grad_(requires_grad)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, unfused)
        replaced.append(path)
    return replaced


def expert_owners(module: nn.Module) -> dict[str, ExpertLinears]:
    """``{path: ExpertLinears}`` inside ``module`` (a decoder layer)."""
    return {path: m for path, m in module.named_modules() if isinstance(m, ExpertLinears)}
