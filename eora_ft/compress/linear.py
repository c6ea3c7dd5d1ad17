"""CompressedLinear: a frozen linear layer stored as packed integer codes plus group grids."""

from __future__ import annotations

import torch
from torch import nn

from eora_ft.kernels.packing import pack_codes
from eora_ft.kernels.reference import dequantize

from .result import QuantizedWeight, SparseWeight


class CompressedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` whose weight lives as packed codes (buffers, not parameters).

    Quantized (``bits`` in 2, 3, 4, 8): buffers ``qweight`` int32 ``[K*bits/32, N]``, ``scales``
    ``[G, N]`` (compute dtype), ``zeros`` uint8 ``[G, N]``. Pruned only (``bits=None``): buffer
    ``weight`` ``[N, K]`` (compute dtype). Either may carry ``mask`` bool ``[N, K]`` (False = pruned,
    always exactly zero). ``bias`` stays a frozen parameter if present. ``dequantize()`` uses the
    Triton kernel on a GPU and the pure-torch reference (its specification) on CPU; with a LoRA
    adapter on top, training goes through ``eora_ft.kernels.lora_matmul.PackedLoraMatmul``.

    Optional buffer ``perm`` int64 ``[K]`` (None unless an act-order GPTQ checkpoint was imported):
    stored input column ``j`` is original input ``perm[j]``. Storage keeps groups monotone (columns
    sorted by group, permuted once at load), so the forward gathers ``x`` by ``perm`` instead;
    ``dequantize()`` still returns the weight in the original input order.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int | None,
        group_size: int,
        bias: bool = False,
        masked: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bits is None:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype, device=device))
        else:
            groups = 1 if group_size == -1 else in_features // group_size
            self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
            self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device) if masked else None)
        self.register_buffer("perm", None)  # set to an int64 [K] tensor by the act-order importer only
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the dequantized weight (PEFT reads this name to place adapters)."""
        return (self.weight if self.bits is None else self.scales).dtype

    @property
    def device(self) -> torch.device:
        return (self.weight if self.bits is None else self.scales).device

    @classmethod
    def from_quantized(cls, quantized: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        """Pack a compressor's :class:`QuantizedWeight` (codes ``[K, N]``)."""
        k, n = quantized.codes.shape
        spec = quantized.spec
        layer = cls(k, n, spec.bits, spec.group_size, bias=bias is not None, masked=quantized.mask is not None, dtype=dtype, device=quantized.codes.device)
        layer.qweight.copy_(pack_codes(quantized.codes, spec.bits))
        layer.scales.copy_(quantized.scales.to(dtype))
        layer.zeros.copy_(quantized.zeros.to(torch.uint8))
        if quantized.mask is not None:
            layer.mask.copy_(quantized.mask)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_sparse(cls, sparse: SparseWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        """Store a pruned, unquantized weight ``[N, K]`` with its mask."""
        n, k = sparse.weight.shape
        layer = cls(k, n, None, -1, bias=bias is not None, masked=True, dtype=dtype, device=sparse.weight.device)
        layer.weight.copy_((sparse.weight * sparse.mask).to(dtype))
        layer.mask.copy_(sparse.mask)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    def _stored_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[N, K]`` in storage column order (= original order unless ``perm`` is set)."""
        if self.bits is None:
            return self.weight.to(dtype or self.compute_dtype)
        if self.qweight.is_cuda:  # the Triton kernel; the reference below is its specification
            from eora_ft.kernels.dequant import dequantize_triton

            weight = dequantize_triton(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                       self.in_features, dtype=dtype or self.compute_dtype)
            return weight if self.mask is None else weight * self.mask
        return dequantize(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features,
            mask=self.mask, dtype=dtype or self.compute_dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[N, K]`` in the original input order (exactly the compressor's ``W_c``)."""
        weight = self._stored_weight(dtype)
        if self.perm is None:
            return weight
        return weight.index_select(1, torch.argsort(self.perm))  # column perm[j] <- stored column j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:  # permute the activations, not the [N, K] weight, on every call
            x = x.index_select(-1, self.perm)
        return nn.functional.linear(x, self._stored_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits or 'dense'}, "
            f"group_size={self.group_size}, sparse_mask={self.mask is not None}"
            + (", act_order=True" if self.perm is not None else "")
        )


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` under ``root`` by ``module``."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`CompressedLinear` in ``model`` by a plain ``nn.Linear`` holding ``W_c`` (in place).

    The result is an ordinary transformers model that plain PEFT, vLLM-free tooling and
    ``save_pretrained`` understand; its outputs equal the compressed model's.
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, CompressedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.compute_dtype, device=module.device)
            dense.weight.data.copy_(module.dequantize())
            if module.bias is not None:
                dense.bias.data.copy_(module.bias)
            dense.requires_grad_(False)
            set_module(model, path, dense)
    return model
