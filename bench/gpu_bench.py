"""GPU benchmarks of the CUDA ops (run by bench/gpu.sh; needs a CUDA device and a CUDA build).

Every ratio is measured side by side in one run on the same inputs and the same GPU:
  engine   gptq_quantize (float32, 4-bit, group 128, asym, B = 128, identity order) at 4096×4096
           and 11008×4096 vs the plain-PyTorch GPTQ loop (bench/gptq_baseline.py, IST-DASLab's
           fasterquant inner loop) on the GPU, and vs its GEMM floor: the lazy updates' flops
           (≈ d_out·d²) at the sgemm rate of the lazy-update shape measured in the same run.
  factor   factor(route, order='pivot') on a CUDA accumulator state (cuSOLVER; the pivot loop on the
           CPU, see csrc/factor.cpp) and on a CPU copy of it (LAPACK): svdqr (from R) vs cholesky
           (from H) at d = 4096, 11008 (and 14336 with --big).
  qmatmul  4-bit group 128, Llama-7B shapes. Batch 1: bytes moved / time over the device-to-device
           copy bandwidth (read + write) measured in the same run. Batch 16: time vs fp16 cuBLAS
           (x_fp16 @ W_fp16ᵀ) of the dequantized weight.
  model    Llama-7B shapes with random weights: 32 blocks × (q, k, v, o: 4096×4096; gate, up:
           11008×4096; down: 4096×11008) engine times, plus one factor per distinct input
           (attention in, o in, mlp in: d = 4096; down in: d = 11008), per route. The calibration
           forward passes and accumulation are not included: a lower bound on the quantize time.

    python bench/gpu_bench.py            # the table of docs/benchmarks.md
    python bench/gpu_bench.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List

import torch

import gptq_baseline

import lrgptq  # noqa: F401  (registers torch.ops.lrgptq)
from lrgptq import ops

OPS = torch.ops.lrgptq
BITS, GS, B = 4, 128, 128


def cuda_time(fn: Callable[[], object], runs: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn over `runs` timed calls (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def random_state(d: int, gen: torch.Generator, need_R: bool = True):
    """(H, R) on the GPU for X: 2d tokens with uneven channel scales; H = XᵀX = RᵀR (R: None
    unless need_R)."""
    X = torch.randn(2 * d, d, generator=gen, dtype=torch.float64)
    X = (X * torch.exp(0.5 * torch.randn(d, generator=gen, dtype=torch.float64))).cuda()
    H = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    OPS.gram_update(H, X)
    if not need_R:
        return H, None
    R = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    OPS.qr_update(R, X)
    return H, R


def factor(A: torch.Tensor, source: str, route: str, order: str = "pivot"):
    return OPS.factor(A, source, route, order, 0.01, "mean", 8, "none", 0.0, torch.float64)


def engine_call(W, perm, U):
    return lambda: ops.gptq_quantize(W, perm, U, from_original=False, bits=BITS, group_size=GS, sym=False, mse=False,
                                     static_groups=False, block_size=B)


def lazy_flops(d_out: int, d: int) -> int:
    return sum(2 * d_out * min(B, d - i1) * (d - min(i1 + B, d)) for i1 in range(0, d, B))


def bench_engine(shapes, gen, rows: List[Dict]) -> Dict:
    times = {}
    for d_out, d in shapes:
        H, _ = random_state(d, gen, need_R=False)
        perm, U, *_ = factor(H, "gram", "cholesky", "identity")
        U = U.float()
        W = torch.randn(d_out, d, generator=gen).cuda()
        t_eng = cuda_time(engine_call(W, perm, U))
        t_base = cuda_time(lambda: gptq_baseline.fasterquant(W, U, bits=BITS, groupsize=GS, blocksize=B), runs=1)
        C, A, Bm = torch.randn(d_out, d, device="cuda"), torch.randn(d_out, B, device="cuda"), torch.randn(B, d, device="cuda")
        rate = 2 * d_out * B * d / cuda_time(lambda: C.addmm_(A, Bm, beta=1, alpha=-1), runs=5)
        floor = lazy_flops(d_out, d) / rate
        times[(d_out, d)] = t_eng
        rows.append(dict(what=f"engine {d_out}x{d} fp32", value=f"{t_eng * 1e3:.1f} ms",
                         ratio=f"{t_base / t_eng:.1f}x faster than the PyTorch loop ({t_base * 1e3:.0f} ms); "
                               f"{t_eng / floor:.2f}x its GEMM floor ({floor * 1e3:.1f} ms at {rate / 1e12:.1f} TFLOP/s)"))
        del H, U, W, C, A, Bm
    return times


def bench_factor(dims, gen, rows: List[Dict]) -> Dict:
    """Per d: svdqr (from R) and cholesky (from H) with the state on the GPU (cuSOLVER; the pivot
    loop of order 'pivot' on the CPU) and the same call on a CPU copy of the state (LAPACK, all
    16 cores), the round trip that the issue compares with."""
    times = {}
    for d in dims:
        H, R = random_state(d, gen)
        Hc, Rc = H.cpu(), R.cpu()
        t = {}
        for route, A, Ac, src in (("cholesky", H, Hc, "gram"), ("svdqr", R, Rc, "qr")):
            t[route] = cuda_time(lambda: factor(A, src, route), runs=1, warmup=0)
            t[route + "_cpu"] = cuda_time(lambda: [x.cuda() if isinstance(x, torch.Tensor) else x
                                                   for x in factor(Ac, src, route)], runs=1, warmup=0)
        times[d] = t
        rows.append(dict(what=f"factor d={d} (pivot order)",
                         value=f"svdqr {t['svdqr']:.2f} s, cholesky {t['cholesky']:.2f} s",
                         ratio=f"svdqr/cholesky = {t['svdqr'] / t['cholesky']:.2f}; on a CPU copy: svdqr "
                               f"{t['svdqr_cpu']:.2f} s, cholesky {t['cholesky_cpu']:.2f} s"))
        del H, R
    return times


def random_layer(d: int, d_out: int, gen: torch.Generator):
    G = d // GS
    codes = torch.randint(0, 2**BITS, (d, d_out), generator=gen, dtype=torch.uint8)
    z = torch.randint(0, 2**BITS - 1, (G, d_out), generator=gen, dtype=torch.uint8)
    qweight = OPS.pack_bits(codes, BITS, 0).cuda()
    qzeros = OPS.pack_bits(z, BITS, 1).cuda()
    scales = (torch.rand(G, d_out, generator=gen) * 0.01).half().cuda()
    g_idx = (torch.arange(d, dtype=torch.int32) // GS).cuda()
    return qweight, qzeros, scales, g_idx


def bench_qmatmul(shapes, gen, rows: List[Dict]) -> None:
    big = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    out = torch.empty_like(big)
    copy_bw = 2 * big.numel() * 4 / cuda_time(lambda: out.copy_(big), runs=5)
    rows.append(dict(what="device copy (read + write)", value=f"{copy_bw / 1e9:.0f} GB/s", ratio="reference"))
    del big, out
    for d, d_out in shapes:
        qweight, qzeros, scales, g_idx = random_layer(d, d_out, gen)
        W16 = torch.randn(d_out, d, generator=gen).half().cuda()
        for M in (1, 16):
            x = torch.randn(M, d, generator=gen).half().cuda()
            t_q = cuda_time(lambda: OPS.qmatmul(x, qweight, qzeros, scales, g_idx, BITS, 1, None), runs=20)
            t_h = cuda_time(lambda: x @ W16.t(), runs=20)
            if M == 1:
                moved = sum(t.numel() * t.element_size() for t in (qweight, qzeros, scales, g_idx, x)) + d_out * 2
                bw = moved / t_q
                ratio = f"{bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f} % of copy; fp16 cuBLAS {t_h * 1e6:.0f} us"
            else:
                ratio = f"{t_q / t_h:.2f}x the fp16 cuBLAS time ({t_h * 1e6:.0f} us)"
            rows.append(dict(what=f"qmatmul {d}->{d_out} batch {M}", value=f"{t_q * 1e6:.0f} us", ratio=ratio))


def model_minutes(eng: Dict, fac: Dict, rows: List[Dict]) -> None:
    per_block = 4 * eng[(4096, 4096)] + 2 * eng[(11008, 4096)] + eng[(4096, 11008)]
    for route in ("cholesky", "svdqr"):
        f = 3 * fac[4096][route] + fac[11008][route]
        rows.append(dict(what=f"Llama-7B shapes, route {route}", value=f"{32 * (per_block + f) / 60:.1f} min",
                         ratio=f"engine {32 * per_block / 60:.1f} min + factor {32 * f / 60:.1f} min (no calibration)"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    ap.add_argument("--big", action="store_true", help="also the factor at d = 14336")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict] = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.quick:
        bench_engine([(256, 256), (512, 256)], gen, rows)
        bench_factor([256], gen, rows)
        bench_qmatmul([(512, 1024)], gen, rows)
    else:
        eng = bench_engine([(4096, 4096), (11008, 4096), (4096, 11008)], gen, rows)
        fac = bench_factor([4096, 11008] + ([14336] if args.big else []), gen, rows)
        bench_qmatmul([(4096, 11008), (11008, 4096)], gen, rows)
        model_minutes(eng, fac, rows)
    w = max(len(r["what"]) for r in rows)
    v = max(len(r["value"]) for r in rows)
    print(f"| {'what'.ljust(w)} | {'time'.ljust(v)} | against |")
    print(f"|{'-' * (w + 2)}|{'-' * (v + 2)}|---|")
    for r in rows:
        print(f"| {r['what'].ljust(w)} | {r['value'].ljust(v)} | {r['ratio']} |")


if __name__ == "__main__":
    main()
