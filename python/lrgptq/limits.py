"""The limits and choices that several modules check, and the counts derived from them: one home.

QuantConfig validates settings against these, the layers (nn.py, nn_vq.py) and the checkpoint
formats (formats/) check stored values against the same ones, and storage.py counts bits with
the same group and word rules. The C++ core checks its own arguments against the same bounds
(csrc/gptq.cpp, csrc/vq.cpp, csrc/bitpack.h).
"""

from __future__ import annotations

import math

import torch

# Bit widths of the scalar grid (docs/design.md §4), and the ones the GPTQ layout packs (§9).
MIN_BITS, MAX_BITS = 2, 8
LAYOUT_BITS = (2, 3, 4, 8)

# What is kept of a layer's inputs, and the sketch's random matrices (docs/design.md §2).
ACCUMULATORS = ("gram", "qr", "sketch")
SKETCH_KINDS = ("sparse", "gaussian")

# Block LDLQ: at most this many columns chosen jointly (docs/design.md §5).
MAX_LDLQ_DIM = 8

# GPTVQ (docs/design.md §5): vector lengths, and the bits of one codebook index (bits · dim),
# which bounds a codebook at 2^12 = 4096 centroids.
VQ_DIMS = (1, 2, 4)
MAX_VQ_INDEX_BITS = 12


def vq_bits_ok(bits: int, dim: int) -> bool:
    """Whether ``bits`` index bits per weight fit a ``dim``-dimensional codebook."""
    return 1 <= bits and bits * dim <= MAX_VQ_INDEX_BITS


def vq_bits_rule(dim: int) -> str:
    """What :func:`vq_bits_ok` allows, in words (every error about it says the same)."""
    return (f"in 1..{MAX_VQ_INDEX_BITS // dim} with vq_dim={dim} (a codebook holds 2^(bits·vq_dim) <= "
            f"{1 << MAX_VQ_INDEX_BITS} centroids)")


def n_groups(n: int, size: int) -> int:
    """Groups of ``size`` (−1: one group) that cover ``n`` columns or rows; a last group may be shorter."""
    return 1 if size == -1 else math.ceil(n / size)


def packed_words(n: int, bits: int) -> int:
    """int32 words that hold n values of ``bits`` bits packed as one stream (the readers' ceil rule)."""
    return math.ceil(n * bits / 32)


def packed_bytes(n: int, bits: int) -> int:
    """uint8 bytes that hold n values of ``bits`` bits packed as one stream (GPTVQ's indices)."""
    return math.ceil(n * bits / 8)


def sequential_g_idx(n: int, group_size: int) -> torch.Tensor:
    """The group of each of ``n`` inputs without act-order: i // group_size (−1: all in group 0), int32."""
    size = max(n, 1) if group_size == -1 else group_size
    return (torch.arange(n) // size).to(torch.int32)
