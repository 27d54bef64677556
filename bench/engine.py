"""CPU benchmark of the GPTQ engine (torch.ops.lrgptq.gptq_quantize) against a plain-PyTorch GPTQ.

Per layer (d_out, d): float32 W, 4-bit, group size 128, asymmetric, block size B = 128, identity
order, U from the cholesky route (damp 0.01) of a random SPD H. Both the engine and the baseline
(bench/gptq_baseline.py: the IST-DASLab fasterquant inner loop) get the same W and U in the same run.

Also the engine's time over its GEMM floor: the flops of the lazy block updates
(Σ_blocks 2·d_out·B·(d − i2) ≈ d_out·d²) at the sgemm rate of the lazy-update shape
(C(d_out×d) −= A(d_out×128)·B(128×d), addmm_) measured in the same run; a large square sgemm's
rate is printed for reference.

    python bench/engine.py            # the table of docs/benchmarks.md
    python bench/engine.py --quick    # smoke run, small shapes
    python bench/engine.py --breakdown  # the engine's non-GEMM pieces at 11008x4096
"""

from __future__ import annotations

import argparse
import time

import torch

import common
import gptq_baseline

import lrgptq  # noqa: F401  (registers torch.ops.lrgptq)

BITS, GS, SYM, B = 4, 128, False, 128


def random_U(d: int, gen: torch.Generator) -> torch.Tensor:
    """U (d×d upper, float64) from the cholesky route of H = XᵀX, X: 2d tokens, uneven channel scales."""
    X = torch.randn(2 * d, d, generator=gen) * torch.exp(0.5 * torch.randn(d, generator=gen))
    H = (X.T @ X).double()
    perm, U, k, dead, *_ = torch.ops.lrgptq.factor(H, "gram", "cholesky", "identity", 0.01, "mean", 8,
                                                     "rel", 1e-4, torch.float64)
    assert k == d and torch.equal(perm, torch.arange(d))
    return U


def lazy_flops(d_out: int, d: int, block: int) -> int:
    return sum(2 * d_out * min(block, d - i1) * (d - min(i1 + block, d)) for i1 in range(0, d, block))


def sgemm_rate_lazy(d_out: int, d: int, runs: int, clean: common.Clean) -> float:
    A = torch.randn(d_out, B)
    Bm = torch.randn(B, d)
    C = torch.randn(d_out, d)
    t = common.median(clean.times(lambda: C.addmm_(A, Bm, beta=1, alpha=-1), runs=max(runs, 3)))
    return 2 * d_out * B * d / t


def sgemm_rate_square(n: int, runs: int, clean: common.Clean) -> float:
    A, Bm = torch.randn(n, n), torch.randn(n, n)
    t = common.median(clean.times(lambda: A @ Bm, runs=max(runs, 3)))
    return 2 * n**3 / t


def lazy_sequence(d_out: int, d: int, U: torch.Tensor, runs: int, clean: common.Clean) -> float:
    """Seconds of the engine's actual lazy updates alone: T[:, i2:] -= E_blk @ U[i1:i2, i2:] per block."""
    T = torch.randn(d_out, d)
    E = torch.randn(d_out, B)

    def seq():
        for i1 in range(0, d - B, B):
            i2 = i1 + B
            T[:, i2:].addmm_(E, U[i1:i2, i2:], beta=1, alpha=-1)

    return common.median(clean.times(seq, runs=max(runs, 3)))


def engine(W, perm, U):
    return torch.ops.lrgptq.gptq_quantize(W, perm, U, False, BITS, GS, SYM, False, False, B)


def measure(d_out, d, W, U, runs, clean):
    perm = torch.arange(d)
    t_eng = clean.times(lambda: engine(W, perm, U), runs=runs)
    codes_e = engine(W, perm, U)[0]
    U0 = U[:0].contiguous()  # k = 0: every column rounded, no error feedback (quantizer + copies only)
    t_rtn = clean.times(lambda: engine(W, perm, U0), runs=runs)
    rate = sgemm_rate_lazy(d_out, d, runs, clean)
    t_seq = lazy_sequence(d_out, d, U, runs, clean)

    big = d_out * d > 4096 * 4096
    b_runs = 1 if big else runs
    out = []

    def base():
        out[:] = [gptq_baseline.fasterquant(W, U, bits=BITS, groupsize=GS, sym=SYM, blocksize=B)]

    b_times = clean.times(base, runs=b_runs, warmup=0 if big else 1)
    Q, S, Z, _ = out[0]
    equal = (gptq_baseline.codes_of(Q, S, Z, GS) == codes_e).double().mean().item() * 100
    return dict(te=common.median(t_eng), ne=len(t_eng), tb=common.median(b_times), nb=len(b_times),
                rate=rate, t_seq=t_seq, t_rtn=common.median(t_rtn), equal=equal)


def breakdown(d_out: int, d: int, runs: int, quick: bool = False) -> None:
    """What the engine does besides the GEMMs and the hot loop, timed piece by piece (plain torch calls
    equivalent to the op's input checks and its permutation copies), next to the whole engine at k = 0."""
    W = torch.randn(d_out, d) * 0.02
    perm = torch.arange(d)
    codes = torch.randint(0, 16, (d_out, d), dtype=torch.uint8)
    Q = torch.randn(d_out, d)
    U0 = torch.zeros(0, d)
    clean = common.Clean(not quick)
    pieces = [
        ("engine, U with 0 rows (k = 0)", lambda: engine(W, perm, U0)),
        ("isfinite(W).all() (the op's check of W)", lambda: torch.isfinite(W).all().item()),
        ("W.index_select(1, perm) (to perm order)", lambda: W.index_select(1, perm).contiguous()),
        ("Q index_copy_(1, perm) (back to original order)", lambda: torch.empty_like(Q).index_copy_(1, perm, Q)),
        ("codes index_copy_(1, perm)", lambda: torch.empty_like(codes).index_copy_(1, perm, codes)),
    ]
    rows = [[name, common.fmt_s(common.median(clean.times(fn, runs=runs)))] for name, fn in pieces]
    common.table([f"{d_out}x{d}, float32, identity perm", "median time"], rows)
    print()
    print(common.CLEAN_NOTE + f" Worst kept: {clean.note()}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small shapes, 1 run each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true",
                    help="only: time the non-GEMM pieces of the engine at 11008x4096 (k = 0 path, checks, copies)")
    args = ap.parse_args()
    common.setup(args.threads)
    if args.breakdown:
        common.header("GPTQ engine: pieces besides the GEMMs (CPU, float32, 4-bit g128 asym)")
        breakdown(*((512, 512) if args.quick else (11008, 4096)), 1 if args.quick else 3, args.quick)
        common.footer()
        return
    shapes = [(256, 256), (512, 512)] if args.quick else [(1024, 1024), (4096, 4096), (11008, 4096)]
    runs = 1 if args.quick else 3

    common.header("GPTQ engine vs plain-PyTorch GPTQ (CPU, float32, 4-bit g128 asym, B=128)")
    n_sq = 1024 if args.quick else 4096
    sq = sgemm_rate_square(n_sq, runs, common.Clean(not args.quick))
    print(f"- sgemm {n_sq}x{n_sq}x{n_sq} (A @ B): {sq / 1e9:.1f} GFLOP/s")
    print()

    gen = torch.Generator().manual_seed(0)
    U_cache = {}
    rows = []
    for d_out, d in shapes:
        if d not in U_cache:
            U_cache[d] = random_U(d, gen)
        U = U_cache[d].float().contiguous()
        W = torch.randn(d_out, d, generator=gen) * 0.02
        clean = common.Clean(not args.quick)
        r = measure(d_out, d, W, U, runs, clean)
        fl = lazy_flops(d_out, d, B)
        floor = fl / r["rate"]
        rows.append([
            f"{d_out}x{d}", f"{common.fmt_s(r['te'])} ({r['ne']})", f"{common.fmt_s(r['tb'])} ({r['nb']})",
            f"{r['tb'] / r['te']:.2f}x", f"{fl / 1e9:.1f}", f"{r['rate'] / 1e9:.1f}", common.fmt_s(floor),
            f"{r['te'] / floor:.2f}x", common.fmt_s(r["t_seq"]), common.fmt_s(r["t_rtn"]),
            f"{r['equal']:.3f}%", clean.note(),
        ])
    common.table(["d_out x d", "engine (runs)", "baseline (runs)", "speedup", "lazy GFLOP",
                  "sgemm lazy-shape GFLOP/s", "GEMM floor", "engine / floor", "lazy GEMMs alone",
                  "engine with k=0", "codes equal", "others' CPU (discarded runs)"], rows)
    print()
    print("GEMM floor = lazy GFLOP / sgemm rate of C(d_out x d) -= A(d_out x 128) @ B(128 x d).")
    print("'lazy GEMMs alone' = the engine's actual sequence of shrinking lazy updates, timed alone.")
    print("'engine with k=0' = the engine with a U of 0 rows (round to nearest: quantizer, copies, no feedback).")
    print(common.CLEAN_NOTE)
    common.footer()


if __name__ == "__main__":
    main()
