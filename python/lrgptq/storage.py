"""Bits per weight of a quantization as its checkpoint stores it: the GPTQ layout (docs/design.md §9) for
the scalar grid, the GPTVQ layout (docs/vq.md, counted by :func:`lrgptq.vq.bits_per_weight`) with
``vq_dim`` > 0."""

from __future__ import annotations

from typing import Iterable, Tuple

from . import vq
from .config import QuantConfig


def _words(n: int, bits: int) -> int:
    """int32 words holding n values of `bits` bits packed as one stream."""
    return -(-n * bits // 32)


def layer_bits(config: QuantConfig, d_out: int, d: int, g_idx: bool = True) -> int:
    """Bits stored for one (d_out, d) linear: qweight (codes packed along the inputs), qzeros
    (one `bits`-bit zero per group and output, stored for symmetric grids too), fp16 scales per
    group and output, and with ``g_idx`` the int32 group index of each input. The bias, stored in
    fp16 whether or not the layer is quantized, is not counted. A GPTVQ config counts its own
    layout instead (indices, codebooks, their scales, the column order unless it is the identity)."""
    if config.vq_dim:
        ordered = config.order != "identity"
        return int(vq.bits_per_weight(d_out, d, config.vq_dim, config.bits, config.vq_group_cols,
                                      config.vq_group_rows, ordered)["total"])
    groups = 1 if config.group_size == -1 else -(-d // config.group_size)
    qweight = 32 * _words(d, config.bits) * d_out
    qzeros = 32 * groups * _words(d_out, config.bits)
    scales = 16 * groups * d_out
    return qweight + qzeros + scales + (32 * d if g_idx else 0)


def bits_per_weight(config: QuantConfig, shapes: Iterable[Tuple[int, int]], g_idx: bool = True) -> float:
    """Stored bits over weights, summed over linears of shapes (d_out, d): e.g. 2 bits g128 is
    2 + (16 + 2)/128 ≈ 2.14 without g_idx."""
    shapes = list(shapes)
    weights = sum(o * i for o, i in shapes)
    if weights == 0:
        raise ValueError("bits_per_weight: no weights (shapes is empty or has a zero dimension)")
    return sum(layer_bits(config, o, i, g_idx) for o, i in shapes) / weights
