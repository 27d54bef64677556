"""Per-layer probe: each method's relative output error on HELD-OUT tokens, ratio to plain GPTQ.

For the linears of a few blocks of a packaged real model, the inputs of the full-precision model
are captured on calibration windows of *Emma* (what every method quantizes with) and on held-out
windows of *Persuasion* (what it is scored on). A method's error on a layer is
‖(W − Q) X_valᵀ‖²_F / ‖W X_valᵀ‖²_F (through the held-out Gram matrix, float64); the table gives
its ratio to plain GPTQ's on the same layer (median, min, max over the block's linears), and the
same ratio on the calibration tokens, so a method that fits the calibration tokens better and
generalises worse shows it. One capture serves every method, so this costs one forward pass and one
quantization per layer and method instead of one model run per method.

    python bench/probe.py --model smollm2                  # blocks 0 and the last, 3 bits (docs §1.7)
    python bench/probe.py --model gemma3 --methods gptq gptq-act lrgptq --nsamples 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(__file__))

from quality import METHODS, MODEL_NAMES, config_kwargs  # noqa: E402  (one table of methods for both benchmarks)

import lrgptq  # noqa: E402
from lrgptq.accumulate import Accumulator  # noqa: E402
from lrgptq.calib import text_windows  # noqa: E402
from lrgptq.capture import input_hooks  # noqa: E402
from lrgptq.demo import CALIB_BOOK, EVAL_BOOK, austen_books  # noqa: E402
from lrgptq.demo.data import load_model  # noqa: E402
from lrgptq.linear import make_accumulator  # noqa: E402
from lrgptq.models import find_blocks, find_linears, weight_matrix  # noqa: E402

BASE = "gptq"


def config_of(method: str, bits: int, group_size: int, sym: bool) -> lrgptq.QuantConfig:
    spec = {k: v for k, v in config_kwargs(method).items() if k != "bits"}
    return lrgptq.QuantConfig.for_method(spec.pop("method"), bits=METHODS[method].get("bits", bits),
                                         group_size=group_size, sym=sym, **spec)


def held_out_windows(tok, window: int, count: int) -> List[torch.Tensor]:
    ids = tok(austen_books()[EVAL_BOOK], return_tensors="pt")["input_ids"][0]
    return [ids[i * window:(i + 1) * window] for i in range(min(count, ids.numel() // window))]


def rel_error(D: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """‖D Xᵀ‖² / ‖W Xᵀ‖² from H = XᵀX."""
    D, W = D.double(), W.double()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=sorted(MODEL_NAMES))
    p.add_argument("--blocks", type=int, nargs="+", default=[0, -1], help="block indices (-1: the last)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                   default=["rtn", "gptq", "gptq-act", "gptq-act-static", "gptq-act-mse", "lrgptq",
                            "lrgptq-undamped"])
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows of Emma")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of Persuasion")
    args = p.parse_args()
    methods = [BASE] + [m for m in args.methods if m != BASE]
    cfgs = {m: config_of(m, args.bits, args.group_size, args.sym) for m in methods}
    model, tok = load_model(args.model)
    _, blocks = find_blocks(model)
    idx = sorted({b % len(blocks) for b in args.blocks})
    linears = {f"{i}.{n}": m for i in idx for n, m in find_linears(blocks[i]).items()}
    kinds = {m: (c.accumulator, str(c.damp)) for m, c in cfgs.items()}  # one accumulator per kind and layer
    accs = {n: {k: make_accumulator(cfgs[next(m for m in methods if kinds[m] == k)], lin.in_features)
                for k in set(kinds.values())} for n, lin in linears.items()}
    fit = {n: Accumulator("gram", lin.in_features) for n, lin in linears.items()}
    val = {n: Accumulator("gram", lin.in_features) for n, lin in linears.items()}
    calib = text_windows(austen_books()[CALIB_BOOK], tok, args.nsamples, args.seqlen, 0)
    with torch.no_grad():
        with input_hooks(linears, lambda n, X: [a.add(X) for a in [*accs[n].values(), fit[n]]]):
            for row in calib:
                model(row[None])
        with input_hooks(linears, lambda n, X: val[n].add(X)):
            for row in held_out_windows(tok, args.seqlen, args.eval_windows):
                model(row[None])
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {MODEL_NAMES[args.model]} blocks {idx} "
          f"({len(linears)} linears); calibration {args.nsamples}x{args.seqlen} tokens of Emma; held out "
          f"{args.eval_windows}x{args.seqlen} tokens of Persuasion; {args.bits}-bit g{args.group_size} "
          f"{'sym' if args.sym else 'asym'}; load {os.getloadavg()[0]:.2f}")
    print("| block | method | held-out error / gptq: median (min, max) | calibration error / gptq: median "
          "(min, max) | held-out rel. error (median) |")
    print("|---|---|---|---|---|")
    base: Dict[str, tuple] = {}
    for m in methods:
        cfg = cfgs[m]
        out: Dict[int, List[tuple]] = {i: [] for i in idx}
        for n, lin in linears.items():
            W = weight_matrix(lin).detach()
            res = lrgptq.quantize_linear(W, accs[n][kinds[m]], cfg, name=n)
            D = W - res.weight
            errs = (rel_error(D, W, val[n].state), rel_error(D, W, fit[n].state))
            if m == BASE:
                base[n] = errs
            out[int(n.split(".")[0])].append((errs[0] / base[n][0], errs[1] / base[n][1], errs[0]))
        for i in idx:
            v, f, e = zip(*out[i])
            print(f"| {i} | {m} | {statistics.median(v):.3f} ({min(v):.3f}, {max(v):.3f}) | "
                  f"{statistics.median(f):.3f} ({min(f):.3f}, {max(f):.3f}) | {statistics.median(e):.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
