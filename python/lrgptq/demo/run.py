"""``lrgptq demo``: the packaged model quantized by each method, perplexity on held-out text."""

from __future__ import annotations

import time
from typing import List, Optional

import torch

from ..calib import text_windows
from ..config import QuantConfig
from ..eval import perplexity
from ..pipeline import quantize_model
from .data import CALIB_BOOK, EVAL_BOOK, austen_books, load_demo_model


def run_demo(
    bits: List[int],
    methods: List[str],
    nsamples: int = 32,
    seqlen: int = 512,
    window: int = 512,
    max_windows: Optional[int] = 16,
    group_size: int = 128,
    seed: int = 0,
) -> List[dict]:
    books = austen_books()
    model, tok = load_demo_model()
    calib = text_windows(books[CALIB_BOOK], tok, nsamples, seqlen, seed)
    eval_ids = tok(books[EVAL_BOOK], return_tensors="pt")["input_ids"]
    print(f"model SmolLM2-135M (GGUF Q4_1 dequantized to fp32); calibration: {nsamples}x{seqlen} tokens of "
          f"'{CALIB_BOOK}'; perplexity: '{EVAL_BOOK}', {max_windows} windows of {window}; g{group_size} asym")
    rows = [{"method": "fp32", "bits": 16, "ppl": perplexity(model, eval_ids, window, max_windows), "seconds": 0.0}]
    print(_row(rows[0]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for b in bits:
        for method in methods:
            model.load_state_dict(state)
            cfg = QuantConfig.for_method(method, bits=b, group_size=group_size, seed=seed)
            t0 = time.perf_counter()
            quantize_model(model, calib, cfg, progress=False)
            seconds = time.perf_counter() - t0
            rows.append({"method": method, "bits": b, "ppl": perplexity(model, eval_ids, window, max_windows),
                         "seconds": seconds})
            print(_row(rows[-1]))
    model.load_state_dict(state)
    return rows


def _row(r: dict) -> str:
    return f"{r['method']:>8} {r['bits']:>4} bits  ppl {r['ppl']:9.3f}  quantize {r['seconds']:7.1f} s"
