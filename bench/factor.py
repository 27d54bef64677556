"""CPU benchmark of the factor routes (lrgptq.ops.factor), float64 (the default factor dtype).

Inputs per d: N = 2d float32 tokens with a decaying spectrum (X = G·diag(σ)·Oᵀ, σ_i = 1/(1+i),
G Gaussian, O random orthogonal), streamed through the `qr` accumulator in batches of 2048 to get R;
H = RᵀR for the cholesky route. Timed:

- cholesky:         factor(H, "gram", "cholesky", "identity", damp=0.01)
- svdqr identity:   factor(R, "qr", "svdqr", "identity", truncation="rel", tau=1e-4)   (no pivoting when k = d)
- svdqr pivot:      factor(R, "qr", "svdqr", "pivot", ...)
and the stages, to say what dominates: torch.linalg.svd(R), torch.linalg.eigh(H), torch.linalg.qr
of a d×d matrix (mode "r", what svdqr's last step does), the three LAPACK calls of the cholesky
route, and the pivot-only cost (svdqr pivot − svdqr identity).

    python bench/factor.py            # the table of docs/benchmarks.md
    python bench/factor.py --quick    # smoke run, small d
"""

from __future__ import annotations

import argparse

import torch

import common

import lrgptq
from lrgptq import ops

F64 = torch.float64


def make_R(d: int, gen: torch.Generator) -> torch.Tensor:
    N = 2 * d
    O, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    sigma = 1.0 / (1.0 + torch.arange(d, dtype=F64))
    X = (torch.randn(N, d, generator=gen, dtype=F64) @ (sigma[:, None] * O.T)).float()
    acc = lrgptq.Accumulator("qr", d)
    for i in range(0, N, 2048):
        acc.add(X[i:i + 2048])
    return acc.state


def factor(A, source, route, order):
    return ops.factor(A, source=source, route=route, order=order, damp=0.01, damp_ref="mean", max_retries=8,
                      truncation="rel", tau=1e-4, dtype=F64)


def chol_stages(H):
    Hl = H.clone()
    Hl.diagonal().add_(0.01 * H.diagonal().mean())
    L = torch.linalg.cholesky(Hl)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: d = 256, 512, 1 run each")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    common.setup(args.threads)
    dims = [256, 512] if args.quick else args.dims
    runs = 1 if args.quick else args.runs

    common.header("Factor routes (CPU, float64): cholesky vs svdqr, and their stages")
    gen = torch.Generator().manual_seed(0)
    results = {}
    ks = {}
    notes = {}
    for n, d in enumerate(dims):
        R = make_R(d, gen)
        H = R.T @ R
        M = torch.randn(d, d, generator=gen, dtype=F64)
        wu = 1 if n == 0 else 0  # warm up every call once, at the first (smaller) d
        ks[d] = (factor(R, "qr", "svdqr", "identity")[2], factor(R, "qr", "svdqr", "pivot")[2])
        cells = [
            ("cholesky (identity)", lambda: factor(H, "gram", "cholesky", "identity")),
            ("svdqr identity", lambda: factor(R, "qr", "svdqr", "identity")),
            ("svdqr pivot", lambda: factor(R, "qr", "svdqr", "pivot")),
            ("stage: torch.linalg.svd(R)", lambda: torch.linalg.svd(R, full_matrices=False)),
            ("stage: torch.linalg.qr(dxd, 'r')", lambda: torch.linalg.qr(M, mode="r")),
            ("stage: torch.linalg.eigh(H)", lambda: torch.linalg.eigh(H)),
            ("stage: cholesky + cholesky_inverse + cholesky(upper)", lambda: chol_stages(H)),
        ]
        clean = common.Clean(not args.quick)
        t = {name: clean.times(fn, runs, wu) for name, fn in cells}
        notes[d] = clean.note()
        results[d] = {key: common.median(v) for key, v in t.items()}

    names = list(results[dims[0]].keys())
    rows = []
    for name in names:
        rows.append([name] + [common.fmt_s(results[d][name]) for d in dims])
    rows.append(["pivot only (svdqr pivot - svdqr identity)"]
                + [common.fmt_s(results[d]["svdqr pivot"] - results[d]["svdqr identity"]) for d in dims])
    for order, i in (("identity", 0), ("pivot", 1)):
        rows.append([f"svdqr {order} / cholesky"]
                    + [f"{results[d][f'svdqr {order}'] / results[d]['cholesky (identity)']:.2f}x" for d in dims])
    rows.append(["svdqr rank k (identity, pivot)"] + [f"{ks[d][0]}, {ks[d][1]}" for d in dims])
    rows.append(["others' CPU (discarded runs)"] + [notes[d] for d in dims])
    common.table(["median of %d runs" % runs] + [f"d = {d}" for d in dims], rows)
    print()
    print("Warm-up: one untimed call of each at the first d only.")
    print(common.CLEAN_NOTE)
    common.footer()


if __name__ == "__main__":
    main()
