"""CPU benchmark of the accumulators (lrgptq.Accumulator.add → torch.ops.lrgptq.*_update).

d = 4096, batches of 2048 float32 tokens (states in float64, the default): gram (H += XᵀX),
qr (R ← R-factor of [R; X]), sketch m = 1024 with sparse (ζ = 8) and Gaussian S. One warm-up batch,
then each batch timed on its own; tokens/s = batch / median batch time.

    python bench/accumulate.py            # the table of docs/benchmarks.md
    python bench/accumulate.py --quick    # smoke run, d = 512
"""

from __future__ import annotations

import argparse
import time

import torch

import common

import lrgptq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: d = 512, m = 128, 1 timed batch")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per accumulator (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    common.setup(args.threads)
    d, m, nb = (512, 128, 1) if args.quick else (4096, 1024, args.batches)
    bs = 2048

    common.header(f"Accumulator throughput (CPU): d = {d}, batches of {bs} float32 tokens, float64 state")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(bs, d, generator=gen) for _ in range(nb + 1)]
    kinds = [
        ("gram", dict()),
        ("qr", dict()),
        (f"sketch sparse zeta=8, m={m}", dict(sketch_size=m, sketch_kind="sparse", zeta=8)),
        (f"sketch gaussian, m={m}", dict(sketch_size=m, sketch_kind="gaussian")),
    ]
    rows = []
    for name, kw in kinds:
        acc = lrgptq.Accumulator(name.split()[0], d, **kw)
        acc.add(batches[0])  # warm-up

        def timed():
            times = []
            for X in batches[1:]:
                t0 = time.perf_counter()
                acc.add(X)
                times.append(time.perf_counter() - t0)
            return times

        times, others, tries = common.quiet_run(timed, attempts=1 if args.quick else 4)
        t = common.median(times)
        rows.append([name, f"{common.fmt_s(t)} ({len(times)})", f"{bs / t:,.0f}",
                     f"{bs / t * 3600 / 1e6:.1f}",
                     f"{100 * others:.0f}% ({tries})"])
    common.table(["accumulator", "median s / batch (batches)", "tokens/s", "M tokens/hour", "others' CPU (tries)"], rows)
    print()
    print("Rows are retried (up to 4 tries) until other processes used <= 5% of the CPUs during the timed "
          "batches; the quietest try is shown.")
    common.footer()


if __name__ == "__main__":
    main()
