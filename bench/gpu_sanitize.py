"""Small runs of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, initcheck) in
bench/gpu.sh: the engine in shared memory and in global memory, with ragged groups, static groups,
act-order, columns past rank and the ql form; qmatmul's fused kernel (1, 3, 8 rows) and its
dequantize path (16 rows) for 2/3/4/8 bits with act-order g_idx; both sketches.
Exits non-zero if any output is not finite."""

from __future__ import annotations

import torch

import lrgptq  # noqa: F401  (registers torch.ops.lrgptq)

OPS = torch.ops.lrgptq


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    dev = "cuda"
    # Tiles: shared, shared, and for (33, 256, 256) global in float64 (shared in float32).
    for d_out, d, B in ((45, 100, 100), (45, 100, 32), (33, 256, 256)):
        X = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)
        H = X.T @ X
        for static, order in ((False, "identity"), (False, "act"), (True, "act")):
            perm, U, k, dead, *_ = OPS.factor(H, "gram", "cholesky", order, 0.01, "mean", 8, "none", 0.0,
                                                torch.float64)
            W = torch.randn(d_out, d, generator=gen, dtype=torch.float64)
            for dtype in (torch.float64, torch.float32):
                for Uk, from_original in ((U, False), (U[: d // 2].contiguous(), True)):
                    out = OPS.gptq_quantize(W.to(dev, dtype), perm.to(dev), Uk.to(dev, dtype), from_original, 3, 24,
                                            False, False, static, B)
                    assert all(torch.isfinite(t.float()).all() for t in out), "engine output not finite"
    for bits in (2, 3, 4, 8):
        d, d_out, gs = 640, 200, 64
        G = d // gs
        codes = torch.randint(0, 2**bits, (d, d_out), generator=gen, dtype=torch.uint8)
        z = torch.randint(0, 2**bits - 1, (G, d_out), generator=gen, dtype=torch.uint8)
        qweight, qzeros = OPS.pack_bits(codes, bits, 0).to(dev), OPS.pack_bits(z, bits, 1).to(dev)
        scales = torch.rand(G, d_out, generator=gen).half().to(dev)
        g_idx = (torch.arange(d, dtype=torch.int32) // gs)[torch.randperm(d, generator=gen)].to(dev)
        for M in (1, 3, 8, 16):
            x = torch.randn(M, d, generator=gen).to(dev)
            y = OPS.qmatmul(x, qweight, qzeros, scales, g_idx, bits, 1, None)
            assert torch.isfinite(y).all(), "qmatmul output not finite"
    Y = torch.zeros(16, 48, dtype=torch.float64, device=dev)
    X = torch.randn(100, 48, generator=gen, dtype=torch.float64).to(dev)
    OPS.sketch_update(Y, X, 1, 0, "sparse", 4)
    OPS.sketch_update(Y, X, 1, 100, "gaussian", 0)
    assert torch.isfinite(Y).all()
    torch.cuda.synchronize()
    print("gpu_sanitize: all kernels ran")


if __name__ == "__main__":
    main()
