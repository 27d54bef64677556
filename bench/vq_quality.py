"""GPTVQ vs scalar GPTQ: perplexity of SmolLM2-135M at ≈2.125, ≈2.25 and ≈3.125 bits per weight.

Same protocol as bench/quality.py (its runner: a fresh subprocess per row, calibration windows of
*Emma*, perplexity on *Persuasion*); every row uses the gptq route (Cholesky of H + 0.01·mean
diag H, identity order), so the rows differ only in the quantizer. Bits per weight count
everything stored: scalar = b + (16 + b)/g (a float16 scale and a b-bit zero per group and row;
identity order needs no g_idx); VQ = indices + int8 codebooks + a float16 scale per codebook
(lrgptq.storage.vq_layer_bits), over all the quantized linears of the model.

    python bench/vq_quality.py                 # the table of docs/benchmarks.md
    python bench/vq_quality.py --rates 2.125 --nsamples 4 --max-windows 8   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import quality  # noqa: E402  (the runner and protocol of bench/quality.py)

from lrgptq.storage import vq_layer_bits  # noqa: E402

# rate -> rows: (name, bits, settings, scalar group size or None)
RATES = {
    "2.125": [
        ("gptq b2 g128", 2, {"method": "gptq"}, 128),
        ("gptvq 2-D b2 192x12", 2, {"method": "gptq", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 12}, None),
        ("gptvq 4-D b2 all-cols x96", 2, {"method": "gptq", "vq_dim": 4, "vq_group_cols": -1, "vq_group_rows": 96},
         None),
    ],
    "2.25": [
        ("gptq b2 g64", 2, {"method": "gptq"}, 64),
        ("gptvq 2-D b2 192x6", 2, {"method": "gptq", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 6}, None),
        ("gptvq 4-D b2 all-cols x48", 2, {"method": "gptq", "vq_dim": 4, "vq_group_cols": -1, "vq_group_rows": 48},
         None),
    ],
    "3.125": [
        ("gptq b3 g128", 3, {"method": "gptq"}, 128),
        ("gptvq 2-D b3 192x48", 3, {"method": "gptq", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 48},
         None),
    ],
}


def layer_shapes() -> list:
    """(d_out, d) of every linear that quantize_model quantizes in the demo model."""
    from lrgptq.demo import load_demo_model
    from lrgptq.models import find_blocks, find_linears

    model, _ = load_demo_model()
    _, blocks = find_blocks(model, None)
    return [tuple(m.weight.shape) for b in blocks for m in find_linears(b, ()).values()]


def bpw(shapes: list, bits: int, cfg: dict, group_size: int) -> float:
    if "vq_dim" not in cfg:
        return sum(o * i * (bits + (16 + bits) / group_size) for o, i in shapes) / sum(o * i for o, i in shapes)
    parts = [vq_layer_bits(o, i, cfg["vq_dim"], bits, cfg["vq_group_cols"], cfg["vq_group_rows"], False)
             for o, i in shapes]
    return sum(p["total"] for p in parts) / sum(p["weights"] for p in parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", nargs="+", default=list(RATES), choices=list(RATES))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    args = p.parse_args()
    args.group_size = 128
    shapes = layer_shapes()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; SmolLM2-135M; calib {args.nsamples}x"
          f"{args.seqlen} tokens of Emma; ppl on Persuasion, {args.max_windows} windows of {args.window}; "
          f"gptq route (cholesky, identity order), asym scalar grids")
    fp = quality.run_one(args, "fp32", 16, False, args.nsamples)["ppl"]
    print(f"fp32 perplexity {fp:.3f}\n")
    print("| target bpw | method | bits/weight (all counted) | ppl | Δppl vs fp | Δ / Δgptq | time (s) | time / gptq |")
    print("|---|---|---|---|---|---|---|---|")
    for rate in args.rates:
        base = None
        for name, bits, cfg, g in RATES[rate]:
            quality.METHODS[name] = cfg
            a = copy.copy(args)
            a.group_size = g or 128
            r = quality.run_one(a, name, bits, False, args.nsamples)
            base = base or r
            d, db = r["ppl"] - fp, base["ppl"] - fp
            print(f"| {rate} | {name} | {bpw(shapes, bits, cfg, a.group_size):.3f} | {r['ppl']:.3f} | {d:+.3f} | "
                  f"{d / db:.2f} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
