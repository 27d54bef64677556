"""GPTVQ (arXiv 2402.15319): vector quantization of a layer with error feedback, and its bit count.

``QuantConfig(vq_dim=D, bits=b, vq_group_cols=gc, vq_group_rows=gr)`` quantizes D columns at a
time (in the factor's column order) against codebooks of K = 2^(b·D) centroids, one per gc
columns × gr rows, fitted by a Hessian-weighted EM and rounded to int8 with a float16 scale; the
engine is ``torch.ops.lrgptq.vq_quantize`` (csrc/vq.cpp). Index bits per weight are b; the
codebooks, their scales and (out of order) the column order add to that:
:func:`lrgptq.storage.vq_layer_bits` counts everything a checkpoint stores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from . import ops
from .config import QuantConfig
from .results import LayerResult
from .storage import vq_layer_bits


@dataclass
class VQResult(LayerResult):
    """The VQ engine's output for one layer, a :class:`lrgptq.results.LayerResult`. ``codes``
    index the codebook of their group, in the column order ``perm`` (vector v covers columns
    perm[v·D : v·D + D])."""

    codes: torch.Tensor  # int32 (d_out, d / dim)
    codebooks: torch.Tensor  # (column groups, row groups, K, dim), = scales · int8 values when rounded
    codebook_scales: torch.Tensor  # (column groups, row groups); 0 when not rounded to int8
    weight: torch.Tensor  # dequantized, original column order, the input weight's dtype
    loss: float  # Σ ‖(t − q)·Ū⁻¹‖²: ‖(W − Q)Xᵀ‖²_F when undamped and full rank
    row_loss: torch.Tensor
    perm: torch.Tensor
    rank: int
    dim: int
    bits: int
    group_cols: int  # as given (−1: all columns)
    group_rows: int
    em_trace: torch.Tensor  # (column groups, row groups, em_iters + 1): the EM objective per iteration
    report: dict = field(default_factory=dict)
    codebook_bits: int = 8  # 16 when the codebooks were not rounded to int8

    @property
    def shape(self) -> Tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * self.dim

    @property
    def row_unit(self) -> int:
        return row_unit(self.group_rows, self.codes.shape[0])

    def row_tensors(self) -> Dict[str, Tuple[torch.Tensor, int]]:
        # Codebooks, their scales and the EM trace are per row group: dimension 1.
        return {"codes": (self.codes, 0), "weight": (self.weight, 0), "row_loss": (self.row_loss, 0),
                "codebooks": (self.codebooks, 1), "codebook_scales": (self.codebook_scales, 1),
                "em_trace": (self.em_trace, 1)}

    def with_rows(self, tensors: Dict[str, torch.Tensor]) -> "VQResult":
        full = dataclasses.replace(self, **tensors)
        full.loss = float(full.row_loss.sum())
        full.report = {**self.report, **_report(full)}
        return full

    def codebooks_int8(self) -> torch.Tensor:
        """The stored int8 codebooks: codebooks / scales, exact integers in [−127, 127]."""
        s = self.codebook_scales
        if not bool((s > 0).all()):
            raise ValueError("these codebooks were not rounded to int8 (QuantConfig.vq_codebook_int8=False)")
        return torch.round(self.codebooks / s[..., None, None]).to(torch.int8)


def row_unit(group_rows: int, d_out: int) -> int:
    """Rows that share a codebook (``group_rows``, −1: all ``d_out``): a row split keeps them together."""
    return d_out if group_rows == -1 else group_rows


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor, group_cols: int,
               group_rows: int) -> torch.Tensor:
    """W (d_out, d) from codes by codebook lookup, in the original column order (the reference
    for ``vq_matmul``)."""
    d_out, nv = codes.shape
    D = codebooks.shape[-1]
    d = nv * D
    gc = d if group_cols == -1 else group_cols
    gr = d_out if group_rows == -1 else group_rows
    cg = (torch.arange(nv) * D) // gc
    rg = torch.arange(d_out) // gr
    Wp = codebooks[cg[None, :], rg[:, None], codes.long()].reshape(d_out, d)
    W = torch.empty_like(Wp)
    W[:, perm.long()] = Wp
    return W


def run(W: torch.Tensor, perm: torch.Tensor, U: torch.Tensor, from_original: bool, cfg: QuantConfig) -> tuple:
    """The engine call for a compute-dtype W and its factor (perm, U), then, with
    ``cfg.vq_codebook_steps``, the codebook update (full-rank factors with H⁻¹ = UᵀU: not the
    ql form, whose factor plays another part)."""
    if W.device.type != "cpu":
        raise ValueError(f"the GPTVQ engine (vq_dim={cfg.vq_dim}) runs on the CPU only, the weight is on {W.device}: "
                         "move the layer to the CPU or use vq_dim=0 (the scalar grid runs on CUDA)")
    out = tuple(ops.vq_quantize(
        W, perm, U, from_original=from_original, dim=cfg.vq_dim, bits=cfg.bits, group_cols=cfg.vq_group_cols,
        group_rows=cfg.vq_group_rows, em_iters=cfg.vq_em_iters, codebook_int8=cfg.vq_codebook_int8,
        block_size=cfg.block_size,
    ))
    if cfg.vq_codebook_steps and not from_original and U.shape[0] == W.shape[1] > 0:
        out = update_codebooks(W, out, perm, U, cfg)
    return out


def _round_int8(C: torch.Tensor) -> tuple:
    """C = s·C8 per codebook with s a float16 number and C8 in −127..127 (as csrc/vq.cpp)."""
    amax = C.abs().amax(dim=(-2, -1))
    s = (amax / 127).half().to(C.dtype)
    s = torch.where(s > 0, s, torch.full_like(s, 2.0**-24))
    return s[..., None, None] * torch.clamp(torch.round(C / s[..., None, None]), -127, 127), s


def update_codebooks(W: torch.Tensor, out: tuple, perm: torch.Tensor, U: torch.Tensor, cfg: QuantConfig) -> tuple:
    """GPTVQ's codebook update: with the assignments fixed, conjugate-gradient steps with exact line
    search on f(C) = tr((W − Q)H(W − Q)ᵀ) = ‖(W − Q)[:, perm]·U⁻¹‖²_F (a quadratic in C: Q is a lookup),
    ``cfg.vq_codebook_steps`` steps, then int8 rounding again; kept only if f went down."""
    codes, C0, scales0, Q0, row_loss0, trace = out
    d_out, d = W.shape
    D = cfg.vq_dim
    gc = d if cfg.vq_group_cols == -1 else cfg.vq_group_cols
    gr = d_out if cfg.vq_group_rows == -1 else cfg.vq_group_rows
    cg = (torch.arange(d // D) * D) // gc
    rg = torch.arange(d_out) // gr
    idx = codes.long()

    def residual(C: torch.Tensor) -> torch.Tensor:  # (W − Q)[:, perm]·U⁻¹
        Qp = C[cg[None, :], rg[:, None], idx].reshape(d_out, d)
        return torch.linalg.solve_triangular(U, W[:, perm] - Qp, upper=True, left=False)

    C, p, gg_old = C0.clone(), None, None
    for _ in range(cfg.vq_codebook_steps):  # conjugate gradients (Fletcher–Reeves), exact line search
        Cv = C.clone().requires_grad_(True)
        R = residual(Cv)
        (g,) = torch.autograd.grad(R.pow(2).sum(), Cv)
        with torch.no_grad():
            gg = g.pow(2).sum()
            p = -g if p is None else -g + (gg / gg_old) * p
            gg_old = gg
            Z = R - residual(C + p)  # R(C + αp) = R − αZ: R is affine in C
            zz = Z.pow(2).sum()
            if not zz > 0:
                break
            C = C + (R * Z).sum() / zz * p  # α = ⟨R, Z⟩/‖Z‖² minimises ‖R − αZ‖²
    with torch.no_grad():
        C, s = _round_int8(C) if cfg.vq_codebook_int8 else (C, scales0)
        R = residual(C)
        row_loss = R.pow(2).sum(1)
        if not row_loss.sum() < row_loss0.sum():
            return out
        Qp = C[cg[None, :], rg[:, None], idx].reshape(d_out, d)
        Q = torch.empty_like(Qp)
        Q[:, perm] = Qp
    return codes, C, s, Q, row_loss, trace


def result(out: tuple, weight: torch.Tensor, perm: torch.Tensor, rank: int, cfg: QuantConfig,
           report: dict) -> VQResult:
    """Wraps the engine's outputs with the layer's bit count and EM summary."""
    codes, C, scales, Q, row_loss, trace = out
    res = VQResult(codes, C, scales, Q.to(weight.dtype), float(row_loss.sum()), row_loss, perm, rank, cfg.vq_dim,
                   cfg.bits, cfg.vq_group_cols, cfg.vq_group_rows, trace, {},
                   8 if cfg.vq_codebook_int8 else 16)
    res.report = {**report, **_report(res)}
    return res


def _report(res: VQResult) -> dict:
    """The report entries a result derives from its tensors: loss, bit count, EM objective."""
    d_out, d = res.shape
    ordered = not torch.equal(res.perm.cpu(), torch.arange(d))
    bits = vq_layer_bits(d_out, d, res.dim, res.bits, res.group_cols, res.group_rows, ordered, res.codebook_bits)
    rep = {"loss": float(res.row_loss.sum()), "bits": bits, "bpw": bits["bpw"]}
    if res.em_trace.numel():
        rep["em_objective"] = (float(res.em_trace[..., 0].sum()), float(res.em_trace[..., -1].sum()))
    return rep
