"""The plain-PyTorch GPTQ baseline of the engine benchmark.

The inner loop of IST-DASLab gptq.py ``GPTQ.fasterquant`` (vectorized over rows, as the original):
blocks of ``blocksize`` columns; inside a block, per column: quantize, error, rank-1 update of the
rest of the block; after the block, one GEMM (the lazy batch update). Same quantizer as the
original (``Quantizer.find_params(weight=True)`` / ``quantize``; min-max, or with ``mse`` the
original's search: 80 shrinks p = 1 − i/100 of the range, least Σ|Q(x) − x|^2.4 with torch's pow).

Input is the engine-ready ``Hinv`` = U (upper, H⁻¹ = UᵀU), as fasterquant computes it
(cholesky → cholesky_inverse → cholesky(upper=True)). Identity column order (no act-order).
Written for the benchmark from the published algorithm; not part of the package.
"""

from __future__ import annotations

import torch


def find_params(x: torch.Tensor, maxq: int, sym: bool, mse: bool = False):
    """GPTQ Quantizer.find_params(x, weight=True): per-row (scale, zero), shapes (rows, 1)."""
    tmp = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    if mse:  # the shrink whose grid has the least Σ|Q(x) − x|^2.4 per row; the first of equal ones
        best = torch.full_like(scale, float("inf"))
        for i in range(80):
            p = 1 - i / 100
            s1 = (p * xmax - p * xmin) / maxq
            z1 = zero if sym else torch.round(-p * xmin / s1)
            err = (quantize(x, s1.unsqueeze(1), z1.unsqueeze(1), maxq) - x).abs_().pow_(2.4).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def fasterquant(W: torch.Tensor, Hinv: torch.Tensor, *, bits: int = 4, groupsize: int = 128,
                sym: bool = False, blocksize: int = 128, mse: bool = False):
    """Returns (Q dequantized, scales (G, d_out), zeros (G, d_out), Losses (d_out,))."""
    W = W.clone()
    d_out, columns = W.shape
    maxq = 2**bits - 1
    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    scales, zeros = [], []
    if groupsize == -1:
        scale, zero = find_params(W, maxq, sym, mse)
        scales.append(scale)
        zeros.append(zero)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)], maxq, sym, mse)
                scales.append(scale)
                zeros.append(zero)

            q = quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    S = torch.cat([s.T for s in scales], 0)
    Z = torch.cat([z.T for z in zeros], 0)
    return Q, S, Z, torch.sum(Losses, 1)


def codes_of(Q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groupsize: int) -> torch.Tensor:
    """Integer codes back from the dequantized Q (exact: Q = scale·(q − zero))."""
    d = Q.shape[1]
    gs = d if groupsize == -1 else groupsize
    g = torch.arange(d, device=Q.device) // gs
    s, z = scales[g].T, zeros[g].T  # (d_out, d)
    return torch.round(Q / s + z).to(torch.uint8)
