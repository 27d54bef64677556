"""lrgptq: post-training weight quantization for LLMs.

Importing the package loads the C++ core, which registers ``torch.ops.lrgptq.*``.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401  (registers torch.ops.lrgptq)
from . import ops
from .accumulate import Accumulator
from .calib import text_windows
from .checkpoint import Saved, load, save
from .config import QuantConfig
from .distributed import Comm, Distributed
from .eval import perplexity
from .linear import Factor, QuantResult, factorize, quantize_linear
from .nn import QuantLinear
from .nn_vq import VQLinear
from .pipeline import ModelReport, quantize_model
from .results import LayerResult
from .storage import bits_per_weight
from .streaming import quantize_streamed
from .vq import VQResult
from .writer import CheckpointWriter

__all__ = [
    "Accumulator",
    "CheckpointWriter",
    "Comm",
    "Distributed",
    "Factor",
    "LayerResult",
    "ModelReport",
    "QuantConfig",
    "QuantLinear",
    "QuantResult",
    "Saved",
    "VQLinear",
    "VQResult",
    "bits_per_weight",
    "factorize",
    "load",
    "ops",
    "perplexity",
    "quantize_linear",
    "quantize_model",
    "quantize_streamed",
    "save",
    "text_windows",
]
__version__ = "0.1.0"
