"""Bits per weight of a quantization as its checkpoint stores it: the GPTQ layout (docs/design.md §9) for
the scalar grid, the GPTVQ layout (docs/vq.md) with ``vq_dim`` > 0. Every bit count lives here."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

from .config import QuantConfig
from .limits import n_groups, packed_words


def vq_layer_bits(d_out: int, d: int, dim: int, bits: int, group_cols: int, group_rows: int,
                  ordered: bool, codebook_bits: int = 8) -> Dict[str, float]:
    """Bits a GPTVQ checkpoint stores for one layer, by part, and their total per weight: indices
    (b·D bits per D weights), codebooks (K·D values of ``codebook_bits``), a float16 scale per
    codebook, and the column order as int16 when it is not the identity."""
    n_cb = n_groups(d, group_cols) * n_groups(d_out, group_rows)
    parts = {
        "indices": d_out * d * bits,
        "codebooks": n_cb * (1 << (bits * dim)) * dim * codebook_bits,
        "scales": n_cb * 16 if codebook_bits == 8 else 0,
        "perm": d * 16 if ordered else 0,
    }
    parts["total"] = sum(parts.values())
    parts["weights"] = d_out * d
    parts["bpw"] = parts["total"] / max(parts["weights"], 1)
    return parts


def layer_bits(config: QuantConfig, d_out: int, d: int, g_idx: bool = True) -> int:
    """Bits stored for one (d_out, d) linear: qweight (codes packed along the inputs), qzeros
    (one `bits`-bit zero per group and output, stored for symmetric grids too), fp16 scales per
    group and output, and with ``g_idx`` the int32 group index of each input. The bias, stored in
    fp16 whether or not the layer is quantized, is not counted. A GPTVQ config counts its own
    layout instead (indices, codebooks, their scales, the column order unless it is the identity)."""
    if config.vq_dim:
        ordered = config.order != "identity"
        return int(vq_layer_bits(d_out, d, config.vq_dim, config.bits, config.vq_group_cols,
                                 config.vq_group_rows, ordered)["total"])
    groups = n_groups(d, config.group_size)
    qweight = 32 * packed_words(d, config.bits) * d_out
    qzeros = 32 * groups * packed_words(d_out, config.bits)
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
