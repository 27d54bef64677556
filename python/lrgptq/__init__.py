"""lrgptq: post-training weight quantization for LLMs.

Importing the package loads the C++ core, which registers ``torch.ops.lrgptq.*``.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401  (registers torch.ops.lrgptq)
from .accumulate import Accumulator
from .checkpoint import Saved, load, save
from .config import QuantConfig
from .eval import perplexity
from .linear import Factor, QuantResult, factorize, quantize_linear
from .nn import QuantLinear
from .nn_vq import VQLinear
from .pipeline import ModelReport, quantize_model
from .vq import VQResult

__all__ = [
    "Accumulator",
    "Factor",
    "ModelReport",
    "QuantConfig",
    "QuantLinear",
    "QuantResult",
    "Saved",
    "VQLinear",
    "VQResult",
    "factorize",
    "load",
    "perplexity",
    "quantize_linear",
    "quantize_model",
    "save",
]
__version__ = "0.1.0"
