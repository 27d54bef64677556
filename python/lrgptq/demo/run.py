"""``lrgptq demo``: the packaged model quantized by each method, perplexity on held-out text.

The comparison that matters (issue 11): at 3 bits, round to nearest, GPTQ as published, act-order
GPTQ (the baseline to beat), the lrgptq preset, and GPTVQ at about the same bits per weight, each
with the bits per weight its checkpoint stores.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch

from ..calib import text_windows
from ..config import QuantConfig
from ..eval import perplexity
from ..pipeline import quantize_model
from ..storage import bits_per_weight
from .data import CALIB_BOOK, EVAL_BOOK, austen_books, load_demo_model

# name -> the QuantConfig of that method at `bits` bits with groups of `group_size`
METHODS: Dict[str, Callable[[int, int, int], QuantConfig]] = {
    "rtn": lambda b, g, s: QuantConfig.for_method("rtn", bits=b, group_size=g, seed=s),
    "gptq": lambda b, g, s: QuantConfig.for_method("gptq", bits=b, group_size=g, seed=s),
    "gptq-act": lambda b, g, s: QuantConfig.for_method("gptq", bits=b, group_size=g, seed=s, order="act"),
    "lrgptq": lambda b, g, s: QuantConfig.for_method("lrgptq", bits=b, group_size=g, seed=s),
    # 2-D codebooks of 2^(2b) int8 centroids per 192 columns x 48 rows: 3.113 bits/weight at b = 3
    "gptvq": lambda b, g, s: QuantConfig.for_method("gptq", bits=b, seed=s, order="act", vq_dim=2,
                                                    vq_group_cols=192, vq_group_rows=48),
}
DEFAULT_METHODS = list(METHODS)


def fast_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matmul units (AVX512-BF16 or AMX), where bfloat16 autocast
    runs the evaluation's forward passes about twice as fast as float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def run_demo(
    bits: List[int],
    methods: List[str],
    nsamples: int = 8,
    seqlen: int = 512,
    window: int = 512,
    max_windows: Optional[int] = 20,
    group_size: int = 128,
    seed: int = 0,
) -> List[dict]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"demo methods {unknown} are not known; choose from {', '.join(METHODS)}")
    books = austen_books()
    model, tok = load_demo_model()
    calib = text_windows(books[CALIB_BOOK], tok, nsamples, seqlen, seed)
    eval_ids = tok(books[EVAL_BOOK], return_tensors="pt")["input_ids"]
    # The evaluation is most of the demo's time: on CPUs with bfloat16 units its forward passes run
    # under bfloat16 autocast (SmolLM2's fp32 perplexity moves by 0.05 %, docs/benchmarks.md §1.4).
    autocast = torch.bfloat16 if fast_bfloat16() else None
    print(f"model SmolLM2-135M (GGUF Q4_1 dequantized to fp32: a 4-bit source, so 4-bit rows flatter round to "
          f"nearest); calibration: {nsamples}x{seqlen} tokens of '{CALIB_BOOK}'; perplexity: '{EVAL_BOOK}', "
          f"{max_windows} windows of {window}{', forward passes in bfloat16 autocast' if autocast else ''}; "
          f"scalar grids g{group_size} asymmetric")

    def ppl() -> float:
        return perplexity(model, eval_ids, window, max_windows, autocast=autocast)

    rows = [{"method": "fp32", "bits": 16, "bpw": 16.0, "ppl": ppl(), "seconds": 0.0}]
    print(_row(rows[0]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for b in bits:
        for method in methods:
            model.load_state_dict(state)
            cfg = METHODS[method](b, group_size, seed)
            t0 = time.perf_counter()
            report = quantize_model(model, calib, cfg, progress=False)
            seconds = time.perf_counter() - t0
            bpw = bits_per_weight(cfg, [(r["d_out"], r["d"]) for r in report.layers])
            rows.append({"method": method, "bits": b, "bpw": bpw,
                         "ppl": ppl(), "seconds": seconds})
            print(_row(rows[-1]))
    model.load_state_dict(state)
    return rows


def _row(r: dict) -> str:
    return (f"{r['method']:>8} {r['bits']:>3} bits {r['bpw']:6.3f} bits/weight  ppl {r['ppl']:9.3f}  "
            f"quantize {r['seconds']:6.1f} s")
