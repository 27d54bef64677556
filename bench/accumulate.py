"""CPU benchmark of the accumulators: lrgptq.Accumulator (add, then .state) and the raw update ops.

d = 4096, batches of 2048 float32 tokens, float64 states (the default): gram (H += XᵀX), qr
(R ← R-factor of [R; X]), sketch m = 1024 with sparse (ζ = 8) and Gaussian S.

One measurement = a stream of `--stream` batches (default 4 = 8192 tokens = 2d) through
Accumulator.add, then .state (which flushes what the qr accumulator buffers: it stacks rows until
2d are pending and then does one QR). tokens/s = stream tokens / median stream time. One warm-up
stream. The ops (lrgptq.ops.*_update, one call per 2048-token batch, no buffering) are
timed per batch too, for reference.

    python bench/accumulate.py            # the table of docs/benchmarks.md
    python bench/accumulate.py --quick    # smoke run, d = 512
"""

from __future__ import annotations

import argparse
import time

import torch

import common

import lrgptq
from lrgptq import ops


def unstructured_qr_stream(batches, d: int) -> torch.Tensor:
    """The qr accumulator as it was: rows buffered until 2d wait, then torch.linalg.qr of [R; rows]."""
    R = torch.zeros(d, d, dtype=torch.float64)
    pending = []
    for i, X in enumerate(batches):
        pending.append(X.double())
        if sum(p.shape[0] for p in pending) >= 2 * d or i == len(batches) - 1:
            R = torch.linalg.qr(torch.cat([R, *pending]), mode="r").R
            pending = []
    return R * torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: d = 512, m = 128, 1 run")
    ap.add_argument("--stream", type=int, default=4, help="batches of 2048 tokens per timed stream")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d", type=int, default=4096, help="inputs per token (the model's: 576, 1536)")
    args = ap.parse_args()
    common.setup(args.threads)
    d, m, runs = (512, 128, 1) if args.quick else (args.d, 1024, args.runs)
    bs, ns = 2048, args.stream

    common.header(f"Accumulator throughput (CPU): d = {d}, batches of {bs} float32 tokens, float64 state")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(bs, d, generator=gen) for _ in range(ns)]
    kinds = [
        ("gram", "gram", dict()),
        ("qr", "qr", dict()),
        (f"sketch sparse zeta=8, m={m}", "sketch", dict(sketch_size=m, sketch_kind="sparse", zeta=8)),
        (f"sketch gaussian, m={m}", "sketch", dict(sketch_size=m, sketch_kind="gaussian")),
    ]
    rows = []
    for name, kind, kw in kinds:
        clean = common.Clean(not args.quick)
        acc = lrgptq.Accumulator(kind, d, **kw)

        def stream():
            for X in batches:
                acc.add(X)
            acc.state  # noqa: B018  (flushes the qr buffer)

        t_stream = common.median(clean.times(stream, runs=runs, warmup=1))
        if kind == "qr":  # the op before 2026-12-02: LAPACK's QR of the stacked [R; X], same buffering
            t_old = common.median(clean.times(lambda: unstructured_qr_stream(batches, d), runs=runs, warmup=1))
            rows.append(["qr, unstructured (geqrf of [R; X], before 2026-12-02)", f"{common.fmt_s(t_old)}",
                         f"{ns * bs / t_old:,.0f}", f"{ns * bs / t_old * 3600 / 1e6:.0f}", "-", "-", clean.note()])
        state = acc.state
        if kind == "gram":
            op = lambda X: ops.gram_update(state, X)  # noqa: E731
        elif kind == "qr":
            op = lambda X: ops.qr_update(state, X)  # noqa: E731
        else:
            op = lambda X: ops.sketch_update(state, X, seed=0, offset=0, kind=kw["sketch_kind"],  # noqa: E731
                                             zeta=8)
        t_op = common.median(clean.times(lambda: op(batches[0]), runs=runs, warmup=1))
        tok = ns * bs
        rows.append([name, f"{common.fmt_s(t_stream)}", f"{tok / t_stream:,.0f}", f"{tok / t_stream * 3600 / 1e6:.0f}",
                     f"{common.fmt_s(t_op)}", f"{bs / t_op:,.0f}", clean.note()])
    common.table(["accumulator", f"stream of {ns * bs} tokens", "tokens/s (Accumulator)", "M tokens/hour",
                  f"raw op, {bs}-token batch", "tokens/s (raw op)", "others' CPU (discarded runs)"], rows)
    print()
    print(f"Median of {runs} runs each, after one warm-up. " + common.CLEAN_NOTE)
    common.footer()


if __name__ == "__main__":
    main()
