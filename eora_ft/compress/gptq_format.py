"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers / vLLM), per layer, pure torch.

One quantized linear ``prefix`` with ``K`` inputs, ``N`` outputs and ``G`` groups is stored as:

- ``prefix.qweight`` int32 ``[K*bits/32, N]``: codes packed along K. Every run of 32 codes forms one
  little-endian bit stream of ``bits`` words, code ``i`` at stream bit ``bits*i``. For 2/4/8 bits no
  code crosses a word, which is exactly our own packing; for 3 bits codes 10 and 21 straddle words
  (AutoGPTQ ``QuantLinear.pack``), unlike our planar 3-bit storage.
- ``prefix.qzeros`` int32 ``[G, N*bits/32]``: zero points packed the same way along N. Format
  ``"gptq"`` (v1, what every GPTQ kernel reads) stores ``zero - 1`` and kernels add the 1 back;
  ``"gptq_v2"`` (GPTQModel) stores ``zero`` itself. How a v1 file took the 1 off depends on its writer
  (:func:`zero_points`): AutoGPTQ (and eora_ft) per field; GPTQModel packs v2 and subtracts ``0x11111111``
  (4-bit; ``0x55555555``, ``0x01010101`` at 2/8 bits) from each word, so a zero point of 0 borrows from its
  neighbour; at 3 bits GPTQModel >= 7.0 shifts each field (wrapping 0 to 7) and earlier versions subtracted
  per-word constants. Each is read back by its exact inverse.
- ``prefix.scales`` fp16 ``[G, N]``; ``prefix.g_idx`` int32 ``[K]`` (group of input k; ``k // group_size``
  unless act-order); ``prefix.bias`` optional.

Dequantization: ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.
"""

from __future__ import annotations

import re
import warnings

import torch

from eora_ft.kernels.packing import SUPPORTED_BITS

from .linear import CompressedLinear
from .quantizer import SUPPORTED_GROUP_SIZES

ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is subtracted from each zero point
_WORD = 32
# GPTQModel's v1 <-> v2 conversion (gptqmodel/utils/model.py): one added to every field of a whole int32 word
_GPTQMODEL_WORD_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
# ... and at 3 bits before GPTQModel 7.0 (fixed in ModelCloud/GPTQModel#2763): one constant per qzeros column
# modulo 3. They do not line up with the fields (column 0 holds fields at bits 0, 3, ..., 30), so those v1 files
# differ from a per-field v1; adding the same constants back restores the zero points GPTQModel packed.
_GPTQMODEL_OLD_3BIT = (0b00100100100100100100100100100100, 0b10010010010010010010010010010010,
                       0b01001001001001001001001001001001)
_FIXED_3BIT = (7, 0)  # the first GPTQModel release that shifts 3-bit v1 zero points per field
_GPTQMODEL_V2 = (0, 9)  # GPTQModel's MIN_VERSION_WITH_V2: older releases wrote v1 per field, as AutoGPTQ


def _check_rows(rows: int, bits: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported by the GPTQ layout here; valid: {list(SUPPORTED_BITS)}")
    if rows % _WORD:
        # GPTQ packers size buffers as rows // 32 * bits: anything else silently loses codes
        raise ValueError(f"{what}={rows} must be a multiple of 32 for the GPTQ layout")


def pack_gptq(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[R, C]`` (values in ``[0, 2**bits)``) along R: int32 ``[R*bits/32, C]``, GPTQ bit stream."""
    rows, cols = codes.shape
    _check_rows(rows, bits, "rows")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
    blocks = codes.to(torch.int64).reshape(rows // _WORD, _WORD, cols)
    words = torch.zeros(rows // _WORD, bits, cols, dtype=torch.int64, device=codes.device)
    for i in range(_WORD):  # code i sits at stream bit bits*i: word w, offset off
        w, off = divmod(bits * i, _WORD)
        words[:, w] |= (blocks[:, i] << off) & 0xFFFFFFFF
        if off + bits > _WORD:  # 3-bit codes 10 and 21: the high bits spill into the next word
            words[:, w + 1] |= blocks[:, i] >> (_WORD - off)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.reshape(-1, cols).to(torch.int32)


def unpack_gptq(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_gptq`: int32 ``[rows*bits/32, C]`` -> int64 codes ``[rows, C]``."""
    _check_rows(rows, bits, "rows")
    if words.shape[0] * _WORD != rows * bits:
        raise ValueError(f"packed tensor has {words.shape[0]} rows, expected {rows * bits // _WORD} for {rows} {bits}-bit codes")
    cols, mask = words.shape[1], (1 << bits) - 1
    unsigned = (words.to(torch.int64) & 0xFFFFFFFF).reshape(rows // _WORD, bits, cols)
    codes = torch.empty(rows // _WORD, _WORD, cols, dtype=torch.int64, device=words.device)
    for i in range(_WORD):
        w, off = divmod(bits * i, _WORD)
        value = unsigned[:, w] >> off
        if off + bits > _WORD:
            value = value | (unsigned[:, w + 1] << (_WORD - off))
        codes[:, i] = value & mask
    return codes.reshape(rows, cols)


def gptq_writer(quant: dict) -> tuple[str, tuple[int, ...] | None] | None:
    """``(tool, version)`` of the ``meta.quantizer`` entry of a GPTQ ``quantization_config`` that packed it: the
    ``gptqmodel`` one when any is (transformers/optimum write ``["optimum:1.x", "gptqmodel:4.0.0"]``), else the first
    (eora_ft writes ``["eora_ft:0.2.0"]``), the tool lower-cased and the version as a tuple of its
    leading numbers (None when it has none); None when the checkpoint does not say (AutoGPTQ)."""
    entries = (quant.get("meta") or {}).get("quantizer") if isinstance(quant.get("meta"), dict) else None
    entries = [entries] if isinstance(entries, str) else list(entries or [])
    parsed = []
    for entry in entries:
        tool, _, version = str(entry).partition(":")
        if tool and version:
            numbers = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
            parsed.append((tool.strip().lower(),
                           tuple(int(x) for x in numbers.group(1).split(".")) if numbers else None))
    # transformers' GPTQConfig / optimum record ["optimum:X", "gptqmodel:Y"]: GPTQModel packed the words, its rules
    # decide how they read back
    return next((entry for entry in parsed if entry[0] == "gptqmodel"), parsed[0] if parsed else None)


def zero_points(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str = "gptq",
                writer: tuple[str, tuple[int, ...] | None] | None = None) -> torch.Tensor:
    """The zero points ``[G, N]`` (int64) of a ``qzeros`` tensor ``[G, N*bits/32]``, as the checkpoint's writer meant.

    ``gptq_v2`` stores them as they are. ``gptq`` (v1) stores them minus one, removed in one of three ways, each
    undone exactly here: per field (AutoGPTQ, eora_ft, any writer that does not name itself; a field of
    ``2**bits - 1`` then means ``2**bits``, as the classic kernels compute it, with a warning); GPTQModel
    (``writer[0] == "gptqmodel"``) at 2/4/8 bits by subtracting one from every field of the whole int32 word (a
    zero point of 0 borrows from the next field: read back by adding the same word); GPTQModel at 3 bits by
    shifting each field modulo 8 (>= 7.0) or, before 7.0, by subtracting per-column constants. GPTQModel before
    0.9 (no v2 yet) wrote v1 per field, as AutoGPTQ. A ``6.1.0-dev`` build is read as before 7.0."""
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not supported; valid: {sorted(ZERO_OFFSET)}")
    if (checkpoint_format == "gptq" and writer is not None and writer[0] == "gptqmodel"
            and (writer[1] is None or writer[1] >= _GPTQMODEL_V2)):
        words = qzeros.to(torch.int64) & 0xFFFFFFFF
        if bits in _GPTQMODEL_WORD_ONES:
            return unpack_gptq(((words + _GPTQMODEL_WORD_ONES[bits]) & 0xFFFFFFFF).t(), bits, out_features).t()
        if bits == 3 and writer[1] is not None and writer[1] < _FIXED_3BIT:
            ones = torch.tensor(_GPTQMODEL_OLD_3BIT, dtype=torch.int64).repeat(words.shape[1] // 3 + 1)[:words.shape[1]]
            return unpack_gptq(((words + ones) & 0xFFFFFFFF).t(), bits, out_features).t()
        return (unpack_gptq(words.t(), bits, out_features).t() + 1) % 2**bits
    zeros = unpack_gptq(qzeros.t(), bits, out_features).t() + ZERO_OFFSET[checkpoint_format]
    if int(zeros.max()) >= 2**bits:
        # a v1 field of 2**bits - 1 is ambiguous: the classic kernels (AutoGPTQ, ExLlama, vLLM gptq_gemm)
        # compute with zero = 2**bits, GPTQModel (which names itself in meta.quantizer) wraps it to 0. We follow the
        # kernels for a writer that does not say.
        if int(zeros.max()) > 255:
            raise ValueError("zero point 256 (v1 qzeros field 255 at 8 bits) does not fit the uint8 zero points")
        warnings.warn(f"qzeros hold v1 fields of {2**bits - 1}: loaded as zero point {2**bits}, as GPTQ kernels "
                      "compute it (GPTQModel reads 0 there); re-export such layers with checkpoint_format='gptq_v2'")
    return zeros


def gptq_tensors(layer: CompressedLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one quantized layer: ``{"qweight", "qzeros", "scales", "g_idx"[, "bias"]}``.

    A pruned and quantized layer (2:4 + GPTQ) exports as it is: its pruned codes hold the zero point,
    which every GPTQ kernel dequantizes to 0. Raises ValueError for what the layout cannot carry:
    pruned-only (unquantized) layers, N or K not multiples of 32, zero points outside the format's
    range, scales that overflow fp16.
    """
    if layer.bits is None:
        raise ValueError("a pruned-only (unquantized) layer cannot be stored in the GPTQ layout, which holds "
                         "integer codes only")
    bits, n = layer.bits, layer.out_features
    _check_rows(n, bits, "out_features")
    codes, g_idx = layer.codes_in_original_order()  # act-order imports: the checkpoint's column order
    offset = ZERO_OFFSET[checkpoint_format]
    stored = layer.zeros.to(torch.int64) - offset
    if int(stored.min()) < 0 or int(stored.max()) >= 2**bits:
        hint = " (v1 cannot store a zero point of 0; use checkpoint_format='gptq_v2')" if offset else ""
        raise ValueError(f"zero points must lie in [{offset}, {2**bits - 1 + offset}] for checkpoint_format="
                         f"{checkpoint_format!r} at {bits} bits, got [{int(layer.zeros.min())}, {int(layer.zeros.max())}]{hint}")
    scales = layer.scales.to(torch.float16)  # every GPTQ kernel reads fp16 scales
    if not torch.isfinite(scales).all():
        raise ValueError("scales overflow float16, which the GPTQ layout requires")
    out = {
        "qweight": pack_gptq(codes, bits),
        "qzeros": pack_gptq(stored.t(), bits).t().contiguous(),
        "scales": scales.contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().clone()
    return out


def layer_from_gptq(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32, writer: tuple[str, tuple[int, ...] | None] | None = None,
) -> CompressedLinear:
    """Build a :class:`CompressedLinear` from one layer's GPTQ tensors (keys as :func:`gptq_tensors`).

    ``g_idx`` equal to ``k // group_size`` loads as is. Any other ``g_idx`` (act-order without static
    groups) must give every group exactly ``group_size`` inputs: the columns are then stored sorted by
    group and the layer keeps ``perm`` so its function is unchanged. ``writer`` (:func:`gptq_writer`) decides
    how v1 zero points are read (:func:`zero_points`).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {list(SUPPORTED_BITS)}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; valid: {list(SUPPORTED_GROUP_SIZES)} (-1 = per channel)")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros are {qweight.dtype}/{qzeros.dtype}: eora_ft reads GPTQ words of int32 "
                         "(pack_dtype int32, what GPTQModel and AutoGPTQ write by default)")
    if (qweight.shape[0] * _WORD) % bits:
        raise ValueError(f"qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit codes per column")
    k, n = qweight.shape[0] * _WORD // bits, qweight.shape[1]
    group = k if group_size == -1 else group_size
    if k % group:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    groups = k // group
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n * bits // _WORD):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match "
                         f"[{groups}, {n}] / [{groups}, {n * bits // _WORD}] for K={k}, N={n}, group_size={group_size}")
    codes = unpack_gptq(qweight, bits, k)
    zeros = zero_points(qzeros, bits, n, checkpoint_format, writer)
    return CompressedLinear.from_codes(codes, scales, zeros, bits, group_size, tensors.get("g_idx"),
                                       tensors.get("bias"), dtype)
