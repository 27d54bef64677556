"""What every layout module shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from torch import nn


@dataclass
class Prepared:
    """What a layout's ``prepare`` returns: packed modules by layer name, the
    ``quantization_config`` block, and the decisions taken (for the caller's report)."""

    modules: Dict[str, nn.Module]
    quantization_config: Dict[str, Any]
    info: Dict[str, Any] = field(default_factory=dict)
