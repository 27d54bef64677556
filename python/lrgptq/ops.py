"""Typed wrappers over ``torch.ops.lrgptq.*``: the only Python code that calls the raw ops.

The data flow, stage by stage (csrc/ has a file per stage):
accumulate (``gram_update``, ``qr_update``, ``sketch_update``) -> factor (``factor``) ->
quantize (``gptq_quantize``, ``vq_quantize``) -> pack (``pack_bits``, ``unpack_bits``) ->
matmul (``qmatmul``, ``vq_matmul``). Each wrapper takes keyword-friendly, typed arguments and
returns a named result, so callers never read an output by its position.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.lrgptq)

_ops = torch.ops.lrgptq

# ----------------------------------------------------------------------------- accumulate


def gram_update(H: torch.Tensor, X: torch.Tensor) -> None:
    """H += XᵀX in place (X: (..., d))."""
    _ops.gram_update(H, X)


def qr_update(R: torch.Tensor, X: torch.Tensor) -> None:
    """R <- R-factor of [R; X] in place, diag(R) >= 0 (so RᵀR gains XᵀX)."""
    _ops.qr_update(R, X)


def sketch_update(Y: torch.Tensor, X: torch.Tensor, *, seed: int, offset: int, kind: str, zeta: int) -> None:
    """Y += S X in place; S's column t is drawn from (seed, offset + t): ``kind`` 'sparse'
    (``zeta`` entries ±1/√zeta) or 'gaussian'."""
    _ops.sketch_update(Y, X, seed, offset, kind, zeta)


# ----------------------------------------------------------------------------- factor


class Factorization(NamedTuple):
    """What a factor route gives the engine, and what it decided (for the layer's report)."""

    perm: torch.Tensor  # int64 (d,): the order the columns are quantized in
    U: torch.Tensor  # (k, d) upper triangular in perm order, H⁻¹ = UᵀU (or the ql form)
    rank: int  # k
    dead: torch.Tensor  # bool (d,): features that never fired (H_jj = 0)
    damp_lambda: float  # λ added to H (cholesky, ql) or to σ² (svdqr)
    damp_retries: int  # tenfold raises of λ (cholesky, ql)
    sigma_max: float  # largest (damped) singular value kept (svdqr; estimated when no spectrum was computed)
    sigma_min_kept: float  # smallest one kept (svdqr; likewise)
    from_original: bool  # the ql form: the engine takes errors from the original weights
    pivots: int  # pivots the pivoted order certified


def factor(
    A: torch.Tensor,
    *,
    source: str,
    route: str,
    order: str,
    damp: float,
    damp_ref: str,
    max_retries: int,
    truncation: str,
    tau: float,
    dtype: torch.dtype,
    force_spectrum: bool = False,
) -> Factorization:
    """A column order and an engine-ready factor from an accumulator state ``A`` (H, R or Y).

    ``force_spectrum``: svdqr computes the spectrum even where truncation provably keeps every value
    (by default it then factors H + λI without one, and ``sigma_max``/``sigma_min_kept`` are estimates).
    """
    return Factorization(*_ops.factor(A, source, route, order, damp, damp_ref, max_retries, truncation, tau, dtype,
                                      force_spectrum))


# ----------------------------------------------------------------------------- validate


def heldout_loss(W: torch.Tensor, Q: torch.Tensor, A: torch.Tensor, *, source: str) -> torch.Tensor:
    """Per row of E = W − Q, the held-out loss ‖A eᵢ‖² (``source`` 'qr', A = R_val) or eᵢᵀ A eᵢ
    ('gram', A = H_val), float64 (damp='auto', docs/design.md §13)."""
    return _ops.heldout_loss(W, Q, A, source)


# ----------------------------------------------------------------------------- quantize


class Quantized(NamedTuple):
    """The scalar engine's output, in the original column order."""

    codes: torch.Tensor  # uint8 (d_out, d)
    scales: torch.Tensor  # (groups, d_out)
    zeros: torch.Tensor  # (groups, d_out), integer valued
    g_idx: torch.Tensor  # int32 (d,)
    Q: torch.Tensor  # (d_out, d) dequantized
    row_loss: torch.Tensor  # (d_out,) Σ_j (t_j − q_j)²/U_jj²
    row_clipped: torch.Tensor  # int64 (d_out,): targets clamped to the grid's end codes
    grid_passes: int  # passes the grid ran (noclip: up to the grid_passes asked; minmax: 1)


def gptq_quantize(
    W: torch.Tensor,
    perm: torch.Tensor,
    U: torch.Tensor,
    *,
    from_original: bool,
    bits: int,
    group_size: int,
    sym: bool,
    mse: bool,
    static_groups: bool,
    block_size: int,
    ldlq_dim: int = 1,
    grid: str = "minmax",
    grid_passes: int = 4,
) -> Quantized:
    """GPTQ's error-feedback engine (scalar grid; block LDLQ when ``ldlq_dim`` > 1)."""
    out = _ops.gptq_quantize(W, perm, U, from_original, bits, group_size, sym, mse, static_groups, block_size,
                             ldlq_dim, grid, grid_passes)
    return Quantized(*out[:7], int(out[7][0]))


class VQuantized(NamedTuple):
    """The vector engine's output; codes index their group's codebook, in perm order."""

    codes: torch.Tensor  # int32 (d_out, d / dim)
    codebooks: torch.Tensor  # (column groups, row groups, K, dim)
    codebook_scales: torch.Tensor  # (column groups, row groups); 0 when not rounded to int8
    Q: torch.Tensor  # (d_out, d), original column order
    row_loss: torch.Tensor
    em_trace: torch.Tensor  # (column groups, row groups, em_iters + 1)


def vq_quantize(
    W: torch.Tensor,
    perm: torch.Tensor,
    U: torch.Tensor,
    *,
    from_original: bool,
    dim: int,
    bits: int,
    group_cols: int,
    group_rows: int,
    em_iters: int,
    codebook_int8: bool,
    codebooks: Optional[torch.Tensor] = None,
    block_size: int = 128,
) -> VQuantized:
    """GPTVQ's engine: D-dimensional codebooks fitted by EM, with error feedback."""
    return VQuantized(*_ops.vq_quantize(W, perm, U, from_original, dim, bits, group_cols, group_rows, em_iters,
                                        codebook_int8, codebooks, block_size))


# ----------------------------------------------------------------------------- pack


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integer values in 0..2^bits−1 -> int32 words along ``dim`` (0: qweight, 1: qzeros)."""
    return _ops.pack_bits(values, bits, dim)


def unpack_bits(packed: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``n`` values along ``dim``, uint8."""
    return _ops.unpack_bits(packed, bits, dim, n)


# ----------------------------------------------------------------------------- matmul


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x · dequant(qweight)ᵀ + bias for a GPTQ-layout layer (``zero_offset`` 1 for v1)."""
    return _ops.qmatmul(x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias)


def vq_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    codebook_scales: torch.Tensor,
    perm: torch.Tensor,
    group_cols: int,
    group_rows: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x · Wᵀ + bias for a GPTVQ layer (W looked up from int8 codebooks)."""
    return _ops.vq_matmul(x, codes, codebooks, codebook_scales, perm, group_cols, group_rows, bias)
