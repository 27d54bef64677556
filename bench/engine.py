"""CPU benchmark of the GPTQ engine (lrgptq.ops.gptq_quantize) against a plain-PyTorch GPTQ.

Per layer (d_out, d): float32 W, 4-bit, group size 128, asymmetric, block size B = 128, identity
order, U from the cholesky route (damp 0.01) of a random SPD H. Both the engine and the baseline
(bench/gptq_baseline.py: the IST-DASLab fasterquant inner loop) get the same W and U in the same run.

Also the engine's time over its GEMM floor: the flops of the lazy block updates
(Σ_blocks 2·d_out·B·(d − i2) ≈ d_out·d²) at the sgemm rate of the lazy-update shape
(C(d_out×d) −= A(d_out×128)·B(128×d), addmm_) measured in the same run; a large square sgemm's
rate is printed for reference.

    python bench/engine.py            # the table of docs/benchmarks.md
    python bench/engine.py --quick    # smoke run, small shapes
    python bench/engine.py --breakdown  # the engine's pieces at 11008x4096
    python bench/engine.py --floor 5    # engine / GEMM floor at 4096^2 and 11008x4096, best of 5
    python bench/engine.py --mse        # the MSE range search: engine vs the baseline's (torch pow)
"""

from __future__ import annotations

import argparse
import time

import torch

import common
import gptq_baseline

from lrgptq import ops

BITS, GS, SYM, B = 4, 128, False, 128


def random_U(d: int, gen: torch.Generator) -> torch.Tensor:
    """U (d×d upper, float64) from the cholesky route of H = XᵀX, X: 2d tokens, uneven channel scales."""
    X = torch.randn(2 * d, d, generator=gen) * torch.exp(0.5 * torch.randn(d, generator=gen))
    H = (X.T @ X).double()
    perm, U, k, *_ = ops.factor(H, source="gram", route="cholesky", order="identity", damp=0.01, damp_ref="mean",
                                max_retries=8, truncation="rel", tau=1e-4, dtype=torch.float64)
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


_T = {}


def lazy_sequence_once(d_out: int, d: int, U: torch.Tensor) -> None:
    """The engine's lazy updates T[:, i2:] -= E_blk @ U[i1:i2, i2:], once (buffers kept between calls)."""
    if (d_out, d) not in _T:
        _T[(d_out, d)] = (torch.randn(d_out, d), torch.randn(d_out, B))
    T, E = _T[(d_out, d)]
    for i1 in range(0, d - B, B):
        T[:, i1 + B:].addmm_(E, U[i1:i1 + B, i1 + B:], beta=1, alpha=-1)


def engine(W, perm, U, mse=False, bits=BITS):
    return ops.gptq_quantize(W, perm, U, from_original=False, bits=bits, group_size=GS, sym=SYM, mse=mse,
                             static_groups=False, block_size=B)


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
    """The engine's pieces, timed in one run: the whole engine (identity and a random column order),
    its lazy GEMMs alone, the engine at k = 0 (no feedback: the pass over W, the quantizer and the
    outputs), and a plain copy of W (what one pass over W costs at least)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d, generator=gen) * 0.02
    U = random_U(d, gen).float().contiguous()
    perm = torch.arange(d)
    shuffled = torch.randperm(d, generator=gen)
    U0 = torch.zeros(0, d)
    clean = common.Clean(not quick)
    pieces = [
        ("engine, identity order", lambda: engine(W, perm, U)),
        ("engine, random column order (same U)", lambda: engine(W, shuffled, U)),
        ("its lazy GEMMs alone", lambda: lazy_sequence_once(d_out, d, U)),
        ("engine, U with 0 rows (k = 0)", lambda: engine(W, perm, U0)),
        ("W.clone() (one pass over W)", lambda: W.clone()),
    ]
    rows = [[name, common.fmt_s(common.median(clean.times(fn, runs=runs)))] for name, fn in pieces]
    common.table([f"{d_out}x{d}, float32, 4-bit g128, B={B}", "median time"], rows)
    print()
    print(common.CLEAN_NOTE + f" Worst kept: {clean.note()}.")


def mse_table(shapes, runs: int, quick: bool) -> None:
    """The MSE range search (mse=True, 3 bits): the engine with and without it, and the baseline with
    the original's search (torch pow), on the same W and U in one run; codes equal to the baseline's."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d_out, d in shapes:
        U = random_U(d, gen).float().contiguous()
        W = torch.randn(d_out, d, generator=gen) * 0.02
        perm = torch.arange(d)
        clean = common.Clean(not quick)
        before = common.load()
        t_off = common.median(clean.times(lambda: engine(W, perm, U, bits=3), runs=runs))
        t_on = common.median(clean.times(lambda: engine(W, perm, U, mse=True, bits=3), runs=runs))
        out = []
        b_runs = 1 if d_out * d > 2048 * 2048 else runs

        def base():
            out[:] = [gptq_baseline.fasterquant(W, U, bits=3, groupsize=GS, sym=SYM, blocksize=B, mse=True)]

        t_base = common.median(clean.times(base, runs=b_runs, warmup=0 if b_runs == 1 else 1))
        Q, S, Z, _ = out[0]
        equal = (gptq_baseline.codes_of(Q, S, Z, GS) == engine(W, perm, U, mse=True, bits=3)[0]).double().mean()
        rows.append([f"{d_out}x{d}", common.fmt_s(t_off), common.fmt_s(t_on), f"{t_on / t_off:.2f}x",
                     common.fmt_s(t_base), f"{t_base / t_on:.2f}x", f"{equal.item() * 100:.3f}%",
                     f"{before} / {common.load()}"])
    common.table(["d_out x d", "engine", "engine, mse", "mse / no mse", "baseline, mse (torch pow)",
                  "baseline / engine (mse)", "codes equal", "load avg before / after"], rows)
    print()
    print(common.CLEAN_NOTE)


def floor_table(shapes, reps: int) -> None:
    """The engine against its GEMM floor, on a busy machine: each repetition times, back to back, the
    engine (identity and a random column order), the lazy-shape sgemm (for the floor) and the engine's
    own lazy GEMMs; every time is the best of `reps` repetitions (the least disturbed), and the ratios
    are of those bests. `uptime` before and after each shape."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d_out, d in shapes:
        U = random_U(d, gen).float().contiguous()
        W = torch.randn(d_out, d, generator=gen) * 0.02
        perm, shuffled = torch.arange(d), torch.randperm(d, generator=gen)
        A, Bm, C = torch.randn(d_out, B), torch.randn(B, d), torch.randn(d_out, d)
        before = common.load()
        engine(W, perm, U)  # warm-up
        t = {"eng": [], "perm": [], "gemm": [], "seq": []}
        for _ in range(reps):
            t["eng"] += common.time_it(lambda: engine(W, perm, U), runs=1, warmup=0)
            t["perm"] += common.time_it(lambda: engine(W, shuffled, U), runs=1, warmup=0)
            t["gemm"] += common.time_it(lambda: C.addmm_(A, Bm, beta=1, alpha=-1), runs=1, warmup=0)
            t["seq"] += common.time_it(lambda: lazy_sequence_once(d_out, d, U), runs=1, warmup=0)
        best = {k: min(v) for k, v in t.items()}
        fl = lazy_flops(d_out, d, B)
        floor = fl / (2 * d_out * B * d / best["gemm"])
        rows.append([f"{d_out}x{d}", common.fmt_s(best["eng"]), common.fmt_s(best["perm"]), common.fmt_s(floor),
                     f"{best['eng'] / floor:.2f}x", f"{best['perm'] / floor:.2f}x", common.fmt_s(best["seq"]),
                     f"{best['eng'] / best['seq']:.2f}x", f"{before} / {common.load()}"])
    common.table(["d_out x d", "engine", "engine, random order", "GEMM floor", "engine / floor",
                  "random order / floor", "its lazy GEMMs alone", "engine / its GEMMs", "load avg before / after"],
                 rows)
    print()
    print(f"Best of {reps} repetitions each (the machine is shared: the least disturbed run of each).")
    print("GEMM floor = lazy GFLOP / sgemm rate of C(d_out x d) -= A(d_out x 128) @ B(128 x d).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small shapes, 1 run each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true",
                    help="only: time the engine's pieces at 11008x4096 (whole, permuted, GEMMs alone, k = 0, a copy of W)")
    ap.add_argument("--floor", type=int, metavar="REPS", default=0,
                    help="only: the engine against its GEMM floor at 4096x4096 and 11008x4096, best of REPS")
    ap.add_argument("--mse", action="store_true",
                    help="only: the MSE range search, engine vs the baseline's (SmolLM2's shapes and 4096^2)")
    args = ap.parse_args()
    common.setup(args.threads)
    if args.floor:
        common.header("GPTQ engine against its GEMM floor (CPU, float32, 4-bit g128 asym, B=128)")
        floor_table([(512, 512)] if args.quick else [(4096, 4096), (11008, 4096)], args.floor)
        common.footer()
        return
    if args.mse:
        common.header("GPTQ engine with the MSE range search vs the baseline's (CPU, float32, 3-bit g128 asym)")
        mse_table([(256, 256)] if args.quick else [(576, 576), (1536, 576), (576, 1536), (4096, 4096)],
                  1 if args.quick else 3, args.quick)
        common.footer()
        return
    if args.breakdown:
        common.header("GPTQ engine: its pieces (CPU, float32, 4-bit g128 asym)")
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
