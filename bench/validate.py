"""Cost of damp='auto' (python/lrgptq/validate.py, docs/design.md §13) against one quantization with
the same route (the baseline: QuantConfig.for_method(method) with damp=0.01), side by side in one run
on the packaged SmolLM2-135M and Emma calibration windows; both sides with or without the MSE range
search (--mse: the `lrgptq` preset against its route at damp 0.01).

Per layer (the linears of --blocks, inputs captured from the float model): the seconds of
factor + engine from the accumulated inputs, baseline vs auto (folds, candidate search on a row
sample, final factor + engine), and the accumulation of the inputs (one accumulator vs two folds).
End to end (--e2e): quantize_model with the baseline vs auto, on fresh copies of the model (cut to
its first --e2e-blocks blocks when given), with the count and seconds of the lrgptq ops each side
called. Every line carries the load average; only the ratios are claims. On a loaded box every op
call pays a fixed cost for its threads' synchronisation (docs/benchmarks.md §6), so compare at
--threads 1 as well.

    python bench/validate.py --blocks 0 --e2e --e2e-blocks 3 --threads 1   # the figures of docs/benchmarks.md §6
    python bench/validate.py --blocks 0 --nsamples 2      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter
from contextlib import contextmanager

import torch

import common

import lrgptq
from lrgptq.calib import text_windows
from lrgptq.demo import austen_books, load_demo_model
from lrgptq.linear import factorize, make_accumulator, quantize_linear


def capture(model, ids, blocks):
    """Inputs (tokens, d) of every linear of ``blocks`` on the float model."""
    out, hooks = {}, []
    for b in blocks:
        for name, m in model.model.layers[b].named_modules():
            if isinstance(m, torch.nn.Linear):
                def keep(mod, args, key=f"{b}.{name}"):
                    out.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

                hooks.append(m.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def one_layer(W, X, cfg):
    """(seconds to accumulate, seconds to factor + quantize, result) with ``cfg``."""
    t0 = time.perf_counter()
    acc = make_accumulator(cfg, X.shape[1])
    for piece in X.split(512):
        acc.add(piece)
    for part in getattr(acc, "parts", (acc,)):
        part.state  # flush the pending rows
    t1 = time.perf_counter()
    res = quantize_linear(W, factorize(acc, cfg), cfg)
    return t1 - t0, time.perf_counter() - t1, res


@contextmanager
def op_calls(counts: Counter, seconds: Counter):
    """Counts the calls and seconds of each op wrapper of lrgptq.ops (they do not call each other)."""
    import inspect

    from lrgptq import ops

    saved = {n: f for n, f in vars(ops).items()
             if inspect.isfunction(f) and f.__module__ == ops.__name__ and not n.startswith("_")}

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                counts[name] += 1
                seconds[name] += time.perf_counter() - t0

        return call

    for n, f in saved.items():
        setattr(ops, n, timed(n, f))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(ops, n, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lrgptq", choices=["lrgptq", "gptq"])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--blocks", default="0,15")
    p.add_argument("--e2e", action="store_true", help="also quantize_model end to end")
    p.add_argument("--e2e-blocks", type=int, default=0, help="end to end on the first N blocks (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mse", action="store_true", help="both sides with the MSE range search")
    args = p.parse_args()
    common.setup(args.threads)
    model, tok = load_demo_model()
    ids = text_windows(austen_books()["emma"], tok, args.nsamples, args.seqlen, seed=0)
    base = common.route_config(args.method, bits=args.bits, mse=args.mse)
    auto = common.route_config(args.method, bits=args.bits, damp="auto", mse=args.mse)
    print(f"# {args.method} {args.bits}-bit g128{' mse' if args.mse else ''}, calibration {args.nsamples}x{args.seqlen} tokens of Emma, "
          f"{args.threads} threads; load {common.load()}")
    print("| layer | d_out x d | accumulate auto/base | factor+engine base s | auto s | ratio | chosen | "
          "held-out loss chosen/default | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    inputs = capture(model, ids, [int(b) for b in args.blocks.split(",") if b])
    tot_b = tot_a = 0.0
    first = next(iter(inputs), None)  # warm-up: the first calls of the ops and of LAPACK, untimed
    for cfg in (auto, base) if first else ():
        one_layer(model.model.layers[int(first.split(".")[0])].get_submodule(first.split(".", 1)[1]).weight.detach(),
                  inputs[first], cfg)
    for i, (key, X) in enumerate(inputs.items()):
        b, name = key.split(".", 1)
        W = model.model.layers[int(b)].get_submodule(name).weight.detach()
        # alternate the order so that a change of load does not favour one side
        if i % 2:
            acc_b, run_b, _ = one_layer(W, X, base)
            acc_a, run_a, res = one_layer(W, X, auto)
        else:
            acc_a, run_a, res = one_layer(W, X, auto)
            acc_b, run_b, _ = one_layer(W, X, base)
        r = res.report
        tot_b += acc_b + run_b
        tot_a += acc_a + run_a
        print(f"| {key} | {W.shape[0]}x{W.shape[1]} | {acc_a / acc_b:.2f} | {run_b:.2f} | {run_a:.2f} | "
              f"{(acc_a + run_a) / (acc_b + run_b):.2f} | {r['damp_auto']} | "
              f"{r['heldout_loss'][r['damp_auto']] / r['heldout_loss_default']:.3f} | {common.load()} |")
    if tot_b:
        print(f"\nper-layer total (accumulate + factor + engine): auto/base = {tot_a / tot_b:.2f}  "
              f"(load {common.load()})")
    if args.e2e:
        if args.e2e_blocks:
            model.model.layers = model.model.layers[: args.e2e_blocks]
            model.config.num_hidden_layers = args.e2e_blocks
        times, choices = {}, Counter()
        for label, cfg in (("auto", auto), ("base", base)):
            m = copy.deepcopy(model)
            counts, secs = Counter(), Counter()
            t0 = time.perf_counter()
            with op_calls(counts, secs):
                rep = lrgptq.quantize_model(m, ids, cfg, progress=False)
            times[label] = time.perf_counter() - t0
            if label == "auto":
                choices = Counter(r["damp_auto"] for r in rep.layers)
            print(f"quantize_model {label} ({len(m.model.layers)} blocks): {times[label]:.1f} s "
                  f"(load {common.load()}); ops: " + ", ".join(f"{k} {counts[k]}x {secs[k]:.2f} s"
                                                             for k in sorted(counts)))
        print(f"end to end: auto/base = {times['auto'] / times['base']:.2f}; choices over "
              f"{sum(choices.values())} layers: {dict(sorted(choices.items()))}")


if __name__ == "__main__":
    main()
