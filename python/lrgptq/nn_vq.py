"""VQLinear: a GPTVQ layer held as its checkpoint stores it, run by a codebook-lookup kernel.

Buffers (the layout of formats/vq.py): ``qweight`` uint8 (out, ceil(in/dim · bits·dim / 8)): each
row's codebook indices, bits·dim bits each, in the column order ``perm``, packed little-endian
LSB first; ``codebooks`` int8 (column groups, row groups, K, dim); ``codebook_scales`` float16
(column groups, row groups); ``perm`` int16/int32 (in) or None for the identity order; ``bias``.
The forward pass calls ``torch.ops.lrgptq.vq_matmul`` on the unpacked indices (kept beside the
stored buffers, not saved). Inference only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .limits import VQ_DIMS, n_groups, packed_bytes, vq_bits_ok, vq_bits_rule


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(n, m) integers of ``width`` bits -> (n, ceil(m·width/8)) uint8, LSB first along each row."""
    n, m = codes.shape
    bits = (codes.long()[..., None] >> torch.arange(width)) & 1  # (n, m, width)
    flat = bits.reshape(n, m * width)
    nbytes = packed_bytes(m, width)
    flat = torch.nn.functional.pad(flat, (0, nbytes * 8 - m * width))
    return (flat.reshape(n, nbytes, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, width: int, m: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: (n, m) int32."""
    n = packed.shape[0]
    bits = (packed.long()[..., None] >> torch.arange(8)) & 1
    flat = bits.reshape(n, -1)[:, : m * width].reshape(n, m, width)
    return (flat << torch.arange(width)).sum(-1).to(torch.int32)


def perm_dtype(d: int) -> torch.dtype:
    return torch.int16 if d <= torch.iinfo(torch.int16).max else torch.int32


class VQLinear(nn.Module):
    """y = x · Wᵀ + b with W[:, perm] = scale · C8[code], looked up per (column group × row group)."""

    def __init__(self, in_features: int, out_features: int, dim: int, bits: int, group_cols: int,
                 group_rows: int, bias: bool = True, ordered: bool = False,
                 dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if dim not in VQ_DIMS or in_features % dim:
            raise ValueError(f"VQLinear: dim must be one of {VQ_DIMS} and divide in_features={in_features}, "
                             f"got {dim!r}")
        if not vq_bits_ok(bits, dim):
            raise ValueError(f"VQLinear: bits must be {vq_bits_rule(dim)}, got {bits!r}")
        self.in_features, self.out_features = in_features, out_features
        self.dim, self.bits, self.group_cols, self.group_rows = dim, bits, group_cols, group_rows
        Gc, Gr = n_groups(in_features, group_cols), n_groups(out_features, group_rows)
        nv, width = in_features // dim, bits * dim
        self.register_buffer("qweight", torch.zeros(out_features, packed_bytes(nv, width), dtype=torch.uint8))
        self.register_buffer("codebooks", torch.zeros(Gc, Gr, 1 << width, dim, dtype=torch.int8))
        self.register_buffer("codebook_scales", torch.zeros(Gc, Gr, dtype=torch.float16))
        self.register_buffer("perm", torch.arange(in_features, dtype=perm_dtype(in_features)) if ordered else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("codes", torch.zeros(out_features, nv, dtype=torch.int32), persistent=False)

    def unpack(self) -> None:
        """Refreshes the index cache from ``qweight`` (after loading the stored buffers)."""
        self.codes = unpack_codes(self.qweight, self.bits * self.dim, self.in_features // self.dim)

    def order(self) -> torch.Tensor:
        return torch.arange(self.in_features) if self.perm is None else self.perm.long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.vq_matmul(x, self.codes, self.codebooks, self.codebook_scales, self.order(),
                                          self.group_cols, self.group_rows, self.bias)

    def dequantize(self) -> torch.Tensor:
        """W (out, in) in float32, by codebook lookup."""
        from .vq import dequantize

        C = self.codebook_scales.float()[..., None, None] * self.codebooks.float()
        return dequantize(self.codes, C, self.order(), self.group_cols, self.group_rows)

    @classmethod
    def pack(cls, res, bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float16) -> "VQLinear":
        """A VQLinear from a :class:`lrgptq.vq.VQResult` with int8 codebooks; ``dtype`` is the bias's."""
        d_out, nv = res.codes.shape
        d = nv * res.dim
        ordered = not torch.equal(res.perm.cpu(), torch.arange(d))
        m = cls(d, d_out, res.dim, res.bits, res.group_cols, res.group_rows, bias is not None, ordered, dtype)
        scales = res.codebook_scales.to(torch.float16)
        if not torch.equal(scales.to(res.codebook_scales.dtype), res.codebook_scales):
            raise ValueError("VQLinear.pack: the codebook scales are not float16 numbers (the engine makes them so)")
        with torch.no_grad():
            m.qweight.copy_(pack_codes(res.codes, res.bits * res.dim))
            m.codebooks.copy_(res.codebooks_int8())
            m.codebook_scales.copy_(scales)
            if ordered:
                m.perm.copy_(res.perm)
            if bias is not None:
                m.bias.copy_(bias.detach())
        m.unpack()
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
                f"bits={self.bits}, groups={self.group_cols}x{self.group_rows}, bias={self.bias is not None}")
