"""Issue 5A per layer: on SmolLM2-135M's real layers (inputs of the full-precision model on
calibration windows of Emma), each method's layer loss ‖(W − Q)Xᵀ‖²_F relative to scalar GPTQ's
(same inputs, same grid settings), its clipping rate, Babai-bound slack, noclip passes and time.
A proxy for quality that costs one forward pass instead of one model run per method.

    python bench/babai_layers.py                               # the table of docs/benchmarks.md
    python bench/babai_layers.py --blocks 0 --nsamples 2       # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict

import torch

import common
import lrgptq
from lrgptq.accumulate import Accumulator
from lrgptq.calib import text_windows
from lrgptq.capture import input_hooks
from lrgptq.demo import CALIB_BOOK, austen_books, load_demo_model
from lrgptq.models import find_blocks, find_linears, weight_matrix

METHODS: Dict[str, dict] = {  # QuantConfig.for_method presets and overrides; gptq is the baseline
    "gptq": {"method": "gptq"},
    "gptq-undamped": {"method": "gptq", "damp": 0.0},
    "gptq-noclip": {"method": "gptq", "grid": "noclip"},
    "ql": {"method": "gptq", "route": "ql", "accumulator": "qr"},  # exact, front to back
    "babai": {"method": "gptq", "route": "ql", "accumulator": "qr", "order": "babai"},
    "babai-noclip": {"method": "gptq", "route": "ql", "accumulator": "qr", "order": "babai", "grid": "noclip"},
    "ldlq2": {"method": "gptq", "ldlq_dim": 2},
    "ldlq4": {"method": "gptq", "ldlq_dim": 4},
    "ldlq8": {"method": "gptq", "ldlq_dim": 8},
    "lrgptq": {"method": "lrgptq"},
    "lrgptq-ldlq4": {"method": "lrgptq", "ldlq_dim": 4},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    p.add_argument("--settings", nargs="+", default=["2:128", "3:128", "2:64"], help="bits:group_size")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in ("gptq-undamped", "ql")],
                   choices=list(METHODS))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_demo_model()
    calib = text_windows(austen_books()[CALIB_BOOK], tok, args.nsamples, args.seqlen, 0)
    _, blocks = find_blocks(model)
    linears = {f"{i}.{n}": m for i in args.blocks for n, m in find_linears(blocks[i]).items()}
    accs = {n: {k: Accumulator(k, m.in_features) for k in ("gram", "qr")} for n, m in linears.items()}
    with torch.no_grad(), input_hooks(linears, lambda n, X: [a.add(X) for a in accs[n].values()]):
        for row in calib:
            model(row[None])
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; SmolLM2-135M blocks {args.blocks} "
          f"({len(linears)} linears), inputs of the fp32 model on {args.nsamples}x{args.seqlen} tokens of Emma; "
          f"asym; torch threads {args.threads}")
    print("| bits | group | method | loss / gptq (median over layers) | (min, max) | clipped | "
          "slack median | slack max | noclip passes (max) | s / layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        bits, group = (int(x) for x in setting.split(":"))
        base: Dict[str, float] = {}
        for m in args.methods:
            spec = dict(METHODS[m])
            cfg = common.route_config(spec.pop("method"), bits=bits, group_size=group, **spec)
            ratios, clip, smed, smax, passes, secs, weights = [], 0.0, [], [], 0, 0.0, 0
            for n, mod in linears.items():
                W = weight_matrix(mod).detach()
                t0 = time.perf_counter()
                res = lrgptq.quantize_linear(W, accs[n][cfg.accumulator], cfg, name=n)
                secs += time.perf_counter() - t0
                # every method's loss measured the same way: on H, undamped
                D = (W - res.weight).double()
                loss = float(((D @ accs[n]["gram"].state.double()) * D).sum())
                if m == "gptq":
                    base[n] = loss
                ratios.append(loss / base[n])
                clip += res.report["clip_rate"] * W.numel()
                weights += W.numel()
                smed.append(res.report["babai_slack_median"])
                smax.append(res.report["babai_slack_max"])
                passes = max(passes, res.report["grid_passes"])
            print(f"| {bits} | {group} | {m} | {statistics.median(ratios):.3f} | ({min(ratios):.3f}, "
                  f"{max(ratios):.3f}) | {100 * clip / weights:.3f}% | {statistics.median(smed):.3f} | "
                  f"{max(smax):.3f} | {passes} | {secs / len(linears):.2f} |", flush=True)


if __name__ == "__main__":
    main()
