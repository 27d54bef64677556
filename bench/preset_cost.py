"""Wall time of quantize_model on the packaged SmolLM2-135M, per method, side by side in one process:
what the `lrgptq` preset (damp='auto' with the MSE range search) costs against act-order GPTQ (the
baseline of the quality tables), against act-order GPTQ with the MSE search, and against the lrgptq
route at damp 0.01. Same calibration ids for every method; the weights are restored between runs;
methods run in the given order, then again in reverse, and each time is the mean of the two.

    python bench/preset_cost.py --nsamples 32     # the figures of docs/benchmarks.md §6.2
"""

from __future__ import annotations

import argparse
import time

import torch

import common

import lrgptq
from lrgptq.calib import text_windows
from lrgptq.demo import CALIB_BOOK, austen_books, load_demo_model

METHODS = {
    "gptq-act": dict(method="gptq", order="act"),
    "gptq-act + mse": dict(method="gptq", order="act", mse=True),
    "lrgptq route (damp 0.01)": dict(method="lrgptq", damp=0.01, mse=False),
    "lrgptq preset": dict(method="lrgptq"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    common.setup(args.threads)
    model, tok = load_demo_model()
    calib = text_windows(austen_books()[CALIB_BOOK], tok, args.nsamples, 512, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = {name: [] for name in METHODS}
    print(f"# quantize_model on SmolLM2-135M, {args.bits}-bit g128, {args.nsamples}x512 tokens of Emma, "
          f"{args.threads} threads; load {common.load()}")
    for order in (list(METHODS), list(reversed(METHODS))):
        for name in order:
            spec = dict(METHODS[name])
            cfg = lrgptq.QuantConfig.for_method(spec.pop("method"), bits=args.bits, group_size=128, **spec)
            model.load_state_dict(state)
            t0 = time.perf_counter()
            lrgptq.quantize_model(model, calib, cfg, progress=False)
            times[name].append(time.perf_counter() - t0)
            print(f"- {name}: {times[name][-1]:.1f} s (load {common.load()})", flush=True)
    base = sum(times["gptq-act"]) / 2
    common.table(["method", "quantize_model (mean of 2)", "/ act-order GPTQ"],
                 [[name, f"{sum(t) / 2:.1f} s", f"{sum(t) / 2 / base:.2f}x"] for name, t in times.items()])


if __name__ == "__main__":
    main()
