"""What every layout module shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from torch import nn


@dataclass
class Prepared:
    """What a layout's ``prepare`` returns: packed modules by layer name, the
    ``quantization_config`` block, and the decisions taken (for the caller's report)."""

    modules: Dict[str, nn.Module]
    quantization_config: Dict[str, Any]
    info: Dict[str, Any] = field(default_factory=dict)


def all_finite(t: torch.Tensor) -> bool:
    """Whether the float tensor ``t`` holds no NaN or Inf: its min and max (which propagate NaN)
    are finite. One pass without a mask, 4-7x faster than isfinite(t).all() on the CPU."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(t: torch.Tensor, key: str, where: str) -> None:
    """ValueError naming ``key`` (in file ``where``) when the float tensor ``t`` holds NaN or Inf."""
    if t.is_floating_point() and t.numel() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{where}: {key} holds {bad} NaN or Inf values; the checkpoint is damaged "
                         "(or was written from a model that had them): refusing to load it")


def check_scales(s: torch.Tensor, max_code: int, key: str, where: str) -> None:
    """Scales must be finite and > 0, and scale · ``max_code`` (the largest |code − zero| or |int8
    value|) finite in float32, which the kernels compute in: else ValueError naming ``key``."""
    check_finite(s, key, where)
    if s.numel() and not bool((s > 0).all()):
        raise ValueError(f"{where}: {key} holds scales <= 0 (smallest {float(s.min()):g}); a scale is positive")
    if s.numel() and not bool(torch.isfinite(s.float().abs().amax() * max_code)):
        raise ValueError(f"{where}: {key} holds a scale ({float(s.float().abs().amax()):g}) whose weights "
                         f"(up to {max_code} × scale) overflow float32")
