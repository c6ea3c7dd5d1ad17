"""CompressedLinear: a frozen linear layer stored as packed integer codes plus group grids, or as the
kept values of a pruned weight plus a packed keep-mask."""

from __future__ import annotations

import torch
from torch import nn

from eora_ft.kernels.packing import pack_codes, pack_mask
from eora_ft.kernels.cpu_dequant import dequantize
from eora_ft.kernels.sparse24 import is_two_four, masked_dense, two_four_dense

from .result import QuantizedWeight, SparseWeight


class CompressedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` whose weight lives compressed (buffers, not parameters).

    Quantized (``bits`` in 2, 3, 4, 8): buffers ``qweight`` int32 ``[K*bits/32, N]``, ``scales``
    ``[G, N]`` (compute dtype), ``zeros`` uint8 ``[G, N]``. A pruned and quantized layer (SparseGPT +
    GPTQ) needs nothing more: its pruned codes hold the zero point and dequantize to exactly 0.
    Pruned only (``bits=None``): ``values`` ``[kept]`` (compute dtype: the kept weights, row-major) and
    ``keep_bits`` uint8 ``[N, ceil(K/8)]`` (:func:`~eora_ft.kernels.packing.pack_mask`): 2:4 at fp16 or bf16
    takes 9/16 of the dense bytes. ``bias`` stays a frozen parameter if present. ``dequantize()``
    uses the Triton kernel on a GPU and the pure-torch reference (its specification) on CPU; with a
    LoRA adapter on top, training goes through ``eora_ft.kernels.lora_matmul.PackedLoraMatmul``.

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
        kept: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bits is None:
            kept = in_features * out_features if kept is None else kept
            self.register_buffer("values", torch.zeros(kept, dtype=dtype, device=device))
            self.register_buffer("keep_bits", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                          device=device))
        else:
            groups = 1 if group_size == -1 else in_features // group_size
            self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
            self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("perm", None)  # set to an int64 [K] tensor by the act-order importer only
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the dequantized weight (PEFT reads this name to place adapters)."""
        return (self.values if self.bits is None else self.scales).dtype

    @property
    def device(self) -> torch.device:
        return (self.values if self.bits is None else self.scales).device

    @property
    def weight(self) -> torch.Tensor:
        """Pruned-only layers: the kept values ``[kept]``, for tools that find a layer's device and dtype
        through ``weight`` (PEFT places adapters so). Quantized layers have no ``weight`` (PEFT reads
        ``qweight``); use :meth:`dequantize` for the dense matrix."""
        if self.bits is None:
            return self.values
        raise AttributeError("a quantized CompressedLinear has no `weight`: its codes are `qweight`; "
                             "dequantize() gives the dense [N, K] weight")

    @property
    def kept(self) -> int | None:
        """Number of stored weights of a pruned-only layer (None for a quantized one)."""
        return self.values.numel() if self.bits is None else None

    @classmethod
    def from_quantized(cls, quantized: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        """Pack a compressor's :class:`QuantizedWeight` (codes ``[K, N]``). A pruned one must hold the zero
        point in its pruned codes (then no mask is stored)."""
        k, n = quantized.codes.shape
        spec = quantized.spec
        if quantized.mask is not None:
            group_of = torch.arange(k, device=quantized.codes.device) // spec.group(k)
            at_zero = quantized.codes == quantized.zeros[group_of].to(quantized.codes.dtype)  # [K, N]
            if not bool((at_zero | quantized.mask.t()).all()):
                raise ValueError("pruned codes must hold their group's zero point (they then dequantize to 0 and "
                                 "need no mask)")
        layer = cls(k, n, spec.bits, spec.group_size, bias=bias is not None, dtype=dtype, device=quantized.codes.device)
        layer.qweight.copy_(pack_codes(quantized.codes, spec.bits))
        layer.scales.copy_(quantized.scales.to(dtype))
        layer.zeros.copy_(quantized.zeros.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                   g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        """A layer from a checkpoint's unpacked grid: ``codes`` ``[K, N]`` in ``[0, 2**bits)``, ``scales`` and
        ``zeros`` ``[G, N]`` (zeros integer-valued), ``g_idx`` ``[K]`` the group of each input (None or
        ``k // group_size``: groups in column order). Any other ``g_idx`` (act-order without static groups)
        must give every group exactly ``group_size`` inputs: the columns are then stored sorted by group and
        the layer keeps ``perm``, so its function is unchanged. Tensors stay on ``codes.device``."""
        k, n = codes.shape
        group = k if group_size == -1 else group_size
        if k % group:
            raise ValueError(f"group_size={group_size} does not divide in_features={k}")
        groups = k // group
        if tuple(scales.shape) != (groups, n) or tuple(zeros.shape) != (groups, n):
            raise ValueError(f"scales {tuple(scales.shape)} / zero points {tuple(zeros.shape)} do not match "
                             f"[{groups}, {n}] for K={k}, N={n}, group_size={group_size}")
        monotone = torch.arange(k, device=codes.device) // group
        g_idx = monotone if g_idx is None else g_idx.to(device=codes.device, dtype=torch.int64)
        if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"g_idx must be [{k}] with values in [0, {groups}), got shape {tuple(g_idx.shape)}")
        perm = None
        if not torch.equal(g_idx, monotone):
            if not (torch.bincount(g_idx, minlength=groups) == group).all():
                raise ValueError(f"non-monotone g_idx must put exactly group_size={group} inputs in every group")
            perm = torch.argsort(g_idx, stable=True)
            codes = codes[perm]
        layer = cls(k, n, bits, group_size, bias=bias is not None, dtype=dtype, device=codes.device)
        layer.qweight.copy_(pack_codes(codes, bits))
        layer.scales.copy_(scales.to(dtype))
        layer.zeros.copy_(zeros.to(torch.uint8))
        if perm is not None:
            layer.perm = perm
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    def codes_in_original_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [K, N] int64, g_idx [K] int64)`` with inputs in the original column order (an act-order
        import's ``perm`` undone): what a checkpoint format stores. Quantized layers only."""
        from eora_ft.kernels.packing import unpack_codes

        k = self.in_features
        codes = unpack_codes(self.qweight, self.bits, k)
        g_idx = torch.arange(k, device=codes.device) // (k if self.group_size == -1 else self.group_size)
        if self.perm is not None:
            original, original_g = torch.empty_like(codes), torch.empty_like(g_idx)
            original[self.perm], original_g[self.perm] = codes, g_idx
            codes, g_idx = original, original_g
        return codes.to(torch.int64), g_idx

    @classmethod
    def from_sparse(cls, sparse: SparseWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        """Store a pruned, unquantized weight ``[N, K]``: its kept values and its packed keep-mask."""
        n, k = sparse.weight.shape
        values = sparse.weight[sparse.mask].to(dtype)
        layer = cls(k, n, None, -1, bias=bias is not None, kept=values.numel(), dtype=dtype, device=sparse.weight.device)
        layer.values.copy_(values)
        layer.keep_bits.copy_(pack_mask(sparse.mask))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    def _stored_weight(self, dtype: torch.dtype | None = None, transient: bool = False) -> torch.Tensor:
        """Dense ``[N, K]`` in storage column order (= original order unless ``perm`` is set).

        ``transient``: the caller consumes the weight at once (a matmul), so on a GPU it is written into
        the device's shared scratch buffer (:mod:`eora_ft.kernels.scratch`) instead of a new tensor."""
        dtype = dtype or self.compute_dtype
        if self.bits is None:
            rebuild = two_four_dense if self._is_two_four() else masked_dense
            return rebuild(self.values, self.keep_bits, self.out_features, self.in_features, dtype)
        if self.qweight.is_cuda:  # the Triton kernel (the reference where Triton cannot run: one warning)
            from eora_ft.kernels.fallback import dequantize as gpu_dequantize
            from eora_ft.kernels.scratch import scratch

            out = scratch(self.out_features, self.in_features, dtype, self.qweight.device) if transient else None
            return gpu_dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                  self.in_features, dtype=dtype, out=out)
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features,
                          dtype=dtype)

    def freeze_two_four(self) -> None:
        """Decide :meth:`_is_two_four` now, for good: for a mask about to be sharded (FSDP2 gathers it into
        fresh storage for every forward, so the cache key below would miss each time)."""
        if self.bits is None and not self.keep_bits.is_meta:  # a meta shell: its weights come later, unchecked
            self._two_four_frozen = self._is_two_four()

    def _is_two_four(self) -> bool:
        """Whether the pruned-only mask keeps exactly 2 of every 4 inputs; checked once per mask contents
        (keyed on the buffer and its version counter, which every in-place write such as
        ``load_state_dict`` bumps), since the check itself reads the whole mask and syncs a GPU."""
        frozen = getattr(self, "_two_four_frozen", None)
        if frozen is not None:
            return frozen
        key = (self.keep_bits.data_ptr(), self.keep_bits._version, self.values.numel())
        cached = getattr(self, "_two_four_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, is_two_four(self.keep_bits, self.in_features, self.values.numel()))
            self._two_four_cache = cached
        return cached[1]

    def transient_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`dequantize` for a caller that consumes the result at once and keeps no reference (the
        packed LoRA function's ``weight_fn``): on a GPU it lives in a shared scratch buffer."""
        weight = self._stored_weight(dtype, transient=self.perm is None)
        return weight if self.perm is None else weight.index_select(1, torch.argsort(self.perm))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[N, K]`` in the original input order (exactly the compressor's ``W_c``)."""
        weight = self._stored_weight(dtype)
        if self.perm is None:
            return weight
        return weight.index_select(1, torch.argsort(self.perm))  # column perm[j] <- stored column j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:  # permute the activations, not the [N, K] weight, on every call
            x = x.index_select(-1, self.perm)
        # autograd saves the weight for dX when x needs a gradient (a compressed linear that is not a LoRA
        # target, or PEFT's own forward with dropout): a scratch weight would be overwritten by the next layer's
        # before the backward reads it, so it gets its own tensor then
        transient = not (torch.is_grad_enabled() and x.requires_grad)
        # the bias follows the activations like the weight does: a compressed model loaded in fp32 and swapped
        # into a bf16 model (eora-ft init --dtype bfloat16 on a model with biases) must not mix dtypes
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self._stored_weight(x.dtype, transient=transient), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits or 'pruned'}, "
            + (f"group_size={self.group_size}" if self.bits is not None else f"kept={self.values.numel()}")
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
