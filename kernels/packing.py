"""Bit packing of quantization codes along K (GPTQ layout), pure torch.

Codes ``q`` are ``[K, N]`` integers in ``[0, 2**bits)``. They are packed into int32 words along K:
``qweight`` is ``[K * bits / 32, N]`` for 2, 4 and 8 bits, element ``k`` of a word sitting at bit
offset ``bits * (k % (32 / bits))``, the layout GPTQ checkpoints and their kernels use. 3-bit codes
are stored planar (DESIGN.md): a 2-bit plane of the low bits ``[K / 16, N]`` stacked on a 1-bit
plane of the high bit ``[K / 32, N]``, so every plane keeps whole words per K slab.

Keep-masks of pruned, unquantized weights are packed 8 to a byte along K (:func:`pack_mask`): bit
``k % 8`` of byte ``k // 8`` of row ``n`` is set when ``W[n, k]`` is kept.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32


def _check(bits: int, k: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {SUPPORTED_BITS}")
    if k % _WORD:
        raise ValueError(f"in_features={k} must be a multiple of {_WORD} to pack codes into int32 words")


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    k, n = codes.shape
    per_word = _WORD // bits
    grouped = codes.reshape(k // per_word, per_word, n)
    # one slot at a time into int64 words: no int64 copy of all the codes (0.5 GB at 4096 x 14336)
    words = torch.zeros(k // per_word, n, dtype=torch.int64, device=codes.device)
    for slot in range(per_word):
        words |= grouped[:, slot].to(torch.int64) << (bits * slot)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[K, N]`` (any int dtype, values in ``[0, 2**bits)``) into int32 words.

    Returns ``[K * bits / 32, N]`` int32 (3-bit: the 2-bit plane ``[K/16, N]`` then the 1-bit plane
    ``[K/32, N]``, concatenated along dim 0).
    """
    _check(bits, codes.shape[0])
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
    if bits == 3:
        return torch.cat([_pack_plane(codes & 0b11, 2), _pack_plane(codes >> 2, 1)], dim=0)
    return _pack_plane(codes, bits)


def _plane_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words ``[R, N]`` of ``bits``-bit codes -> uint8 codes ``[N, R * 32 / bits]`` (row ``n`` = output ``n``).

    The words are transposed first (a ``[N, R]`` int32 copy: ``bits / 8`` of the codes' bytes), so each word's
    codes land next to each other in the output row; the codes come out of the words' bytes (little-endian,
    as every CPU and GPU torch runs on), one uint8 pass per code in a byte, no int32 or int64 copy of them."""
    rows, n = words.shape
    per_byte = 8 // bits
    transposed = torch.empty(n, rows, dtype=torch.int32, device=words.device).copy_(words.t())  # unit strides
    byte_view = transposed.view(torch.uint8).view(n, rows * 4, 1)
    codes = torch.empty(n, rows * 4, per_byte, dtype=torch.uint8, device=words.device)
    for position in range(per_byte):
        torch.bitwise_and(byte_view >> (bits * position), (1 << bits) - 1, out=codes[..., position:position + 1])
    return codes.view(n, rows * 4 * per_byte)


def unpack_rows(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes of :func:`pack_codes`'s words as uint8 ``[N, K]``: the weight's own layout, so that dequantizing
    is a conversion and two in-place passes (:func:`eora_ft.kernels.reference.dequantize`)."""
    _check(bits, in_features)
    if bits != 3:
        return _plane_rows(qweight, bits)
    low_rows = in_features * 2 // _WORD
    return _plane_rows(qweight[:low_rows], 2) | (_plane_rows(qweight[low_rows:], 1) << 2)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[K * bits / 32, N]`` -> codes ``[K, N]`` in ``dtype`` (int64 by default)."""
    return unpack_rows(qweight, bits, in_features).t().to(dtype).contiguous()


def packed_rows(in_features: int, bits: int) -> int:
    """Number of int32 rows that ``in_features`` codes of ``bits`` bits occupy."""
    return in_features * bits // _WORD


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, K]`` -> uint8 ``[N, ceil(K / 8)]``, 8 entries per byte, least significant bit first."""
    n, k = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-k) % 8)).view(n, -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 ``[N, ceil(K / 8)]`` -> bool ``[N, K]`` (same device)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :in_features].to(torch.bool)
