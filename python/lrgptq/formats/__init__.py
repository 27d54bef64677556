"""Checkpoint layouts of quantized layers, one module each, chosen by ``quant_method``.

checkpoint.py does the file work (atomic directory, safetensors shards, config.json, rebuilding
the model); a layout module says what a quantized layer becomes on disk and back. A new layout
(e.g. vector-quantized layers) is a new module here with the same five names:

- ``QUANT_METHOD``: the ``quantization_config.quant_method`` it reads and writes;
- ``prepare(model, report, checkpoint_format, dtype) -> Prepared``: the packed module per layer
  name, the ``quantization_config`` block and the decisions taken (for the caller's report);
- ``parse_config(qc, where) -> settings``: a validated view of a loaded ``quantization_config``;
- ``quantized_names(keys) -> set``: which modules a checkpoint's tensor names quantize;
- ``load_module(settings, name, linear, tensors, where) -> nn.Module``: the quantized module
  for the float ``linear`` it replaces, from its tensors, every one checked.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Dict

from . import gptq, vq
from .base import Prepared

__all__ = ["LAYOUTS", "Prepared", "layout", "for_config"]

LAYOUTS: Dict[str, ModuleType] = {gptq.QUANT_METHOD: gptq, vq.QUANT_METHOD: vq}


def layout(quant_method: Any, where: str) -> ModuleType:
    """The layout module for ``quant_method``; ValueError naming ``where`` when there is none."""
    if not isinstance(quant_method, str) or quant_method not in LAYOUTS:
        raise ValueError(
            f"{where}: quantization_config.quant_method is {quant_method!r}; lrgptq reads "
            + ", ".join(repr(m) for m in LAYOUTS)
        )
    return LAYOUTS[quant_method]


def for_config(config: Any) -> ModuleType:
    """The layout a quantization with ``config`` (a QuantConfig) is written in."""
    return vq if getattr(config, "vq_dim", 0) else gptq
