"""QuantLinear: a linear layer held in the GPTQ checkpoint layout, run by a C++ kernel.

Buffers, as the GPTQ readers name and shape them (docs/design.md §9):
``qweight`` int32 (ceil(in·bits/32), out), ``qzeros`` int32 (groups, ceil(out·bits/32)),
``scales`` (groups, out), ``g_idx`` int32 (in), ``bias`` (out) or None. The forward pass calls
``torch.ops.lrgptq.qmatmul``, which dequantizes tile by tile and never holds the float weight.
Inference only: the op has no backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .limits import LAYOUT_BITS, n_groups, packed_words, sequential_g_idx

# checkpoint_format -> what is added to a stored zero point to get z: v1 stores z − 1.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


class QuantLinear(nn.Module):
    """y = x · Wᵀ + b with W = scales[g_idx] · (q − z[g_idx]) stored packed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        checkpoint_format: str = "gptq",
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if bits not in LAYOUT_BITS:
            raise ValueError(f"QuantLinear: bits must be one of {LAYOUT_BITS} (the GPTQ layout's widths), got {bits!r}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"QuantLinear: group_size must be -1 or positive, got {group_size!r}")
        if checkpoint_format not in ZERO_OFFSETS:
            raise ValueError(
                f"QuantLinear: checkpoint_format must be one of {sorted(ZERO_OFFSETS)}, got {checkpoint_format!r}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        G = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_words(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(G, packed_words(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype))
        self.register_buffer("g_idx", sequential_g_idx(in_features, group_size))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @property
    def zero_offset(self) -> int:
        return ZERO_OFFSETS[self.checkpoint_format]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.qmatmul(
            x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, self.bias
        )

    def codes(self) -> torch.Tensor:
        """The integer codes q, uint8 (out, in)."""
        return ops.unpack_bits(self.qweight, self.bits, 0, self.in_features).t()

    def zeros(self) -> torch.Tensor:
        """The zero points z (stored value + the format's offset), int32 (groups, out)."""
        stored = ops.unpack_bits(self.qzeros, self.bits, 1, self.out_features)
        return stored.to(torch.int32) + self.zero_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (out, in) = scales[g_idx] · (q − z[g_idx]), computed in ``dtype``."""
        g = self.g_idx.long()
        s = self.scales.to(dtype)[g].t()
        z = self.zeros().to(dtype)[g].t()
        return s * (self.codes().to(dtype) - z)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}"
        )

    @classmethod
    def pack(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        bias: Optional[torch.Tensor] = None,
        checkpoint_format: str = "gptq",
        dtype: torch.dtype = torch.float16,
    ) -> "QuantLinear":
        """A QuantLinear from the engine's output: codes (out, in), scales and integer-valued zeros
        (groups, out), g_idx (in). Zero points are stored as z − 1 in format ``gptq`` (v1), which
        cannot hold z = 0: that raises ValueError (use ``gptq_v2``)."""
        out_features, in_features = codes.shape
        m = cls(in_features, out_features, bits, group_size, bias is not None, checkpoint_format, dtype)
        z = zeros.round().to(torch.int64)
        if not torch.equal(z.to(zeros.dtype), zeros):
            raise ValueError("QuantLinear.pack: zeros must be integer valued")
        stored = z - m.zero_offset
        if bool((stored < 0).any()):
            raise ValueError(
                f"QuantLinear.pack: {int((stored < 0).sum())} zero points are 0, which checkpoint_format "
                f"{checkpoint_format!r} stores as z − 1 = −1 and no reader decodes; use 'gptq_v2'"
            )
        with torch.no_grad():
            m.qweight.copy_(ops.pack_bits(codes.t(), bits, 0))
            m.qzeros.copy_(ops.pack_bits(stored, bits, 1))
            m.scales.copy_(scales)
            m.g_idx.copy_(g_idx)
            if bias is not None:
                m.bias.copy_(bias.detach())
        return m
