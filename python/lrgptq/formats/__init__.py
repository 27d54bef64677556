"""Checkpoint layouts of quantized layers, one module each, chosen by ``quant_method``.

writer.py does the file work of writing (safetensors files, index, configs), checkpoint.py that
of saving into an atomic directory and of loading; a layout module says what a quantized layer
(a :class:`lrgptq.results.LayerResult`) becomes on disk and back. A new layout is a new module
here with the same names:

- ``QUANT_METHOD``: the ``quantization_config.quant_method`` it reads and writes;
- ``check_request(cfg, checkpoint_format, dtype)``: ValueError unless a quantization with
  ``cfg`` can be written so (checked before any work);
- ``prepare(model, report, checkpoint_format, dtype) -> Prepared``: the packed module per layer
  name, the ``quantization_config`` block and the decisions taken (``info``:
  ``checkpoint_format``, ``zero_point_layers``, ...), for the whole model or a part of it;
- ``final_format(formats) -> str``: the variant of a checkpoint whose parts chose ``formats``;
- ``convert(tensors, fmt, to, cfg)``: a part's tensors rewritten from variant ``fmt`` to ``to``;
- ``quantization_config(cfg, layers, info, true_sequential, dtype)``: the config block;
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
