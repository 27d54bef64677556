"""GPTVQ engine time per layer vs scalar GPTQ, on the same W and factor (SmolLM2-135M's shapes).

W: random (d_out, d) float32; U from the cholesky route of H = XᵀX (2d random tokens with uneven
channel scales), identity order. Both engines get the same (perm, U); time = median of the runs.

    python bench/vq_engine.py            # the table of docs/benchmarks.md
    python bench/vq_engine.py --quick    # one small shape, one run
"""

from __future__ import annotations

import argparse

import torch

import common
import lrgptq

SHAPES = [(576, 576), (1536, 576), (576, 1536)]
ROWS = [  # (name, QuantConfig overrides); bits per weight as in bench/vq_quality.py
    ("gptq b2 g128", dict(bits=2, group_size=128)),
    ("gptvq 2-D b2 192x12", dict(bits=2, vq_dim=2, vq_group_cols=192, vq_group_rows=12)),
    ("gptvq 2-D b2 192x12 + 20 CG steps", dict(bits=2, vq_dim=2, vq_group_cols=192, vq_group_rows=12,
                                               vq_codebook_steps=20)),
    ("gptvq 4-D b2 all-cols x96", dict(bits=2, vq_dim=4, vq_group_cols=-1, vq_group_rows=96)),
    ("gptq b3 g128", dict(bits=3, group_size=128)),
    ("gptvq 2-D b3 192x48", dict(bits=3, vq_dim=2, vq_group_cols=192, vq_group_rows=48)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    common.setup(args.threads)
    shapes, runs = (SHAPES[:1], 1) if args.quick else (SHAPES, args.runs)
    common.header("GPTVQ engine vs scalar GPTQ per layer (CPU, float32, cholesky factor, identity order)")
    rows = []
    for d_out, d in shapes:
        X = torch.randn(2 * d, d) * torch.exp(0.5 * torch.randn(d))
        W = torch.randn(d_out, d) * 0.02
        base = lrgptq.QuantConfig.for_method("gptq")
        acc = lrgptq.linear.make_accumulator(base, d)
        acc.add(X)
        f = lrgptq.factorize(acc, base)
        t_ref = None
        for name, kw in ROWS:
            cfg = lrgptq.QuantConfig.for_method("gptq", **kw)
            res = lrgptq.quantize_linear(W, f, cfg)
            t = common.median(common.time_it(lambda: lrgptq.quantize_linear(W, f, cfg), runs=runs))
            t_ref = t if "vq_dim" not in kw else t_ref
            bpw = res.report.get("bpw", kw["bits"] + (16 + kw["bits"]) / 128)
            rows.append([f"{d_out}x{d}", name, f"{bpw:.3f}", common.fmt_s(t), f"{t / t_ref:.1f}", f"{res.loss:.4g}"])
    common.table(["d_out x d", "method", "bits/weight", "time", "time / gptq (same bits)", "engine loss"],
                 rows)
    common.footer()


if __name__ == "__main__":
    main()
