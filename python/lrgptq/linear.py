"""quantize_linear: one layer's weight and inputs in, codes, grid and dequantized weight out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import ops, vq
from .accumulate import Accumulator, FoldedAccumulator
from .config import AUTO, QuantConfig
from .results import LayerResult, row_split

if TYPE_CHECKING:
    from .distributed import Comm

Inputs = Union[torch.Tensor, Iterable[torch.Tensor], Accumulator, FoldedAccumulator]


@dataclass
class QuantResult(LayerResult):
    """The scalar engine's output for one layer (GPTQ, block LDLQ; column order of the original
    weight), a :class:`lrgptq.results.LayerResult`."""

    codes: torch.Tensor  # uint8 (d_out, d)
    scales: torch.Tensor  # (groups, d_out)
    zeros: torch.Tensor  # (groups, d_out), integer valued
    g_idx: torch.Tensor  # int32 (d,)
    weight: torch.Tensor  # dequantized, the input weight's dtype
    loss: float  # Σ_j (t_j − q_j)²/U_jj² over rows: ‖(W − Q)Xᵀ‖²_F when undamped and full rank
    row_loss: torch.Tensor
    perm: torch.Tensor  # the order the columns were quantized in
    rank: int
    report: dict = field(default_factory=dict)
    row_clipped: Optional[torch.Tensor] = None  # per row: targets clamped to the grid's end codes
    row_slack: Optional[torch.Tensor] = None  # per row: loss over Babai's bound (rank > 0)

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def row_unit(self) -> int:
        return 1  # rows are independent given U (docs/design.md §1)

    def row_tensors(self) -> Dict[str, Tuple[torch.Tensor, int]]:
        rows = {"codes": (self.codes, 0), "scales": (self.scales, 1), "zeros": (self.zeros, 1),
                "weight": (self.weight, 0), "row_loss": (self.row_loss, 0)}
        rows.update({k: (t, 0) for k, t in (("row_clipped", self.row_clipped), ("row_slack", self.row_slack))
                     if t is not None})
        return rows

    def with_rows(self, tensors: Dict[str, torch.Tensor]) -> "QuantResult":
        full = dataclasses.replace(self, **tensors)
        full.loss = float(full.row_loss.sum())
        full.report = {**self.report, **row_report(full.row_loss, full.row_clipped, full.row_slack,
                                                   full.codes.numel())}
        return full


def row_report(row_loss: torch.Tensor, row_clipped: Optional[torch.Tensor], row_slack: Optional[torch.Tensor],
               n_codes: int) -> dict:
    """The report entries a scalar result derives from its per-row tensors."""
    report = {"loss": float(row_loss.sum())}
    if row_clipped is not None:
        report["clip_rate"] = float(row_clipped.sum()) / max(n_codes, 1)
    if row_slack is not None and row_slack.numel():
        report.update(babai_slack_median=float(row_slack.median()), babai_slack_max=float(row_slack.max()))
    return report


def babai_bound(scales: torch.Tensor, g_idx: torch.Tensor, perm: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Per row, Babai's bound on the loss when nothing is clipped (docs/design.md §6.5):
    Σ_j (δ_j²/4)/U_jj² over the k factored columns, δ_j the step of column j's group (1/U_jj = L_jj)."""
    k = U.shape[0]
    if k == 0:
        return torch.zeros(scales.shape[1], dtype=torch.float64)
    cols = perm[:k].long()
    step = scales.double()[g_idx.long()[cols]]  # (k, d_out)
    return (step.square() / (4 * torch.diagonal(U).double().square()[:, None])).sum(0)


def make_accumulator(
    config: QuantConfig, d: int, device: Union[str, torch.device, None] = None, *, token_offset: int = 0
) -> Union[Accumulator, FoldedAccumulator]:
    """The accumulator that ``config`` asks for, for a layer with ``d`` inputs, on ``device``
    (default: the CPU); ``token_offset``: the global index of the first token it will see (a
    sketch's counter and the held-out folds of damp='auto', for merging workers)."""
    if config.damp == AUTO:
        return FoldedAccumulator(config.accumulator, d, token_offset=token_offset, device=device)
    return Accumulator(
        config.accumulator,
        d,
        sketch_size=config.sketch_size,
        sketch_kind=config.sketch_kind,
        zeta=config.zeta,
        seed=config.seed,
        device=device,
        token_offset=token_offset,
    )


def _accumulate(
    inputs: Inputs, config: QuantConfig, d: int, name: str, device: Optional[torch.device] = None
) -> Accumulator:
    if isinstance(inputs, (Accumulator, FoldedAccumulator)):
        if inputs.d != d:
            raise ValueError(f"{name}: the accumulator has d={inputs.d} but the weight has in_features={d}")
        return inputs
    acc = make_accumulator(config, d, device)
    batches = [inputs] if isinstance(inputs, torch.Tensor) else inputs
    for X in batches:
        if not isinstance(X, torch.Tensor) or X.shape[-1:] != (d,):
            shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"{name}: inputs X must be tensors of shape (..., {d}), got {shape}")
        acc.add(X)
    return acc


@dataclass
class Factor:
    """A column order and an engine-ready factor of one set of inputs; layers that read the same
    inputs (q/k/v, gate/up) share one."""

    perm: torch.Tensor
    U: torch.Tensor
    rank: int
    dead: Optional[torch.Tensor]
    from_original: bool
    route: str
    report: dict
    # damp='auto': the search that makes the factor once it sees the weight (validate.Search.choose);
    # perm and U are then placeholders.
    pending: Optional[Any] = None

    def for_weight(self, weight: torch.Tensor, name: str) -> "Factor":
        """The factor to quantize ``weight`` with (the search's choice for it under damp='auto')."""
        return self if self.pending is None else self.pending.choose(weight, name)


def _unfactored(acc: Union[Accumulator, FoldedAccumulator], route: str, report: dict,
                pending: Optional[Any] = None) -> Factor:
    """A factor of no columns in the identity order (rtn, or damp='auto' before it sees the weight)."""
    return Factor(torch.arange(acc.d, device=acc.device), torch.empty(0, acc.d, device=acc.device), 0, None, False,
                  route, report, pending)


def factorize(acc: Union[Accumulator, FoldedAccumulator], config: QuantConfig) -> Factor:
    """Factors an accumulator with ``config``'s route; with no tokens, every column is rounded.
    With damp='auto' the factor waits for the weight (:meth:`Factor.for_weight`)."""
    if config.damp == AUTO and acc.tokens > 0:
        from . import validate

        return _unfactored(acc, config.route, {}, pending=validate.search(acc, config))
    route = config.route if acc.tokens > 0 else "rtn"
    report = {"route": route, "order": config.order, "accumulator": acc.kind, "tokens": acc.tokens}
    if route == "rtn":
        if acc.tokens == 0 and config.route != "rtn":
            report["note"] = "no calibration tokens reached this layer: rounded to nearest"
        return _unfactored(acc, route, report)
    f = ops.factor(
        acc.state, source=acc.kind, route=route, order=config.order, damp=config.damp, damp_ref=config.damp_ref,
        max_retries=config.max_retries, truncation=config.truncation, tau=config.tau, dtype=config.factor_dtype,
    )
    report.update(
        damp_lambda=f.damp_lambda, damp_retries=f.damp_retries, dead=int(f.dead.sum()),
        sigma_max=f.sigma_max, sigma_min_kept=f.sigma_min_kept,
    )
    if acc.kind != "sketch" and acc.tokens < acc.d:
        report["note"] = (f"{acc.tokens} calibration tokens for {acc.d} inputs: H has rank <= {acc.tokens}; "
                          f"{route} {'damped' if report['damp_lambda'] > 0 else 'truncated'} it")
    return Factor(f.perm, f.U, f.rank, f.dead, f.from_original, route, report)


def quantize_linear(
    weight: torch.Tensor,
    inputs: Union[Inputs, Factor],
    config: Optional[QuantConfig] = None,
    name: str = "layer",
) -> LayerResult:
    """Quantizes one linear layer's ``weight`` (d_out, d) given its inputs.

    ``inputs`` is a tensor (..., d), an iterable of such batches, an :class:`Accumulator` that
    already holds them, or a :class:`Factor` made from one by :func:`factorize`. Errors name the
    layer (``name``), the tensor and the fix. With ``config.vq_dim`` > 0 the layer is vector
    quantized (GPTVQ) and the result is a :class:`lrgptq.vq.VQResult`; either way a
    :class:`lrgptq.results.LayerResult`.
    """
    cfg = config if config is not None else QuantConfig()
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        desc = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be a 2-D float tensor (out_features, in_features), got {desc}")
    d = weight.shape[1]
    try:
        if isinstance(inputs, Factor):
            if inputs.perm.numel() != d:
                raise ValueError(f"the factor is for d={inputs.perm.numel()} inputs, the weight has {d}")
            f = inputs.for_weight(weight, name)
        else:
            f = factorize(_accumulate(inputs, cfg, d, name, weight.device), cfg).for_weight(weight, name)
        # The engine runs on the weight's device (CPU or CUDA); the factor follows it there.
        dev = weight.device
        W = weight.detach().to(cfg.compute_dtype)
        if f.route == "cholesky" and f.dead is not None and bool(f.dead.any()):
            W = W.clone()  # never write into the caller's weight
            W[:, f.dead.to(dev)] = 0  # as GPTQ: a feature that never fires gets a zero weight
        perm, U = f.perm.to(dev), f.U.to(dev, cfg.compute_dtype)
        if cfg.vq_dim:
            out = vq.run(W, perm, U, f.from_original, cfg)
        else:
            codes, scales, zeros, g_idx, Q, row_loss, row_clipped, passes = ops.gptq_quantize(
                W, perm, U, from_original=f.from_original, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                mse=cfg.mse, static_groups=cfg.static_groups, block_size=cfg.block_size, ldlq_dim=cfg.ldlq_dim,
                grid=cfg.grid, grid_passes=cfg.grid_passes,
            )
    except (RuntimeError, ValueError) as err:
        if str(err).startswith(f"{name}:"):
            raise
        raise type(err)(f"{name}: {err}") from err
    if cfg.vq_dim:
        return vq.result(out, weight, f.perm, f.rank, cfg, {**f.report, "d": d, "rank": f.rank})
    slack = row_loss.double() / babai_bound(scales, g_idx, perm, U) if f.rank > 0 else None
    report = {**f.report, "d": d, "rank": f.rank, "ldlq_dim": cfg.ldlq_dim, "grid": cfg.grid, "grid_passes": passes,
              **row_report(row_loss, row_clipped, slack, codes.numel())}
    return QuantResult(codes, scales, zeros, g_idx, Q.to(weight.dtype), report["loss"], row_loss, f.perm, f.rank,
                       report, row_clipped, slack)


def row_unit(config: QuantConfig, d_out: int) -> int:
    """The rows a split of a ``d_out``-row layer must keep together under ``config`` (the
    ``row_unit`` of the result it will make)."""
    return vq.row_unit(config.vq_group_rows, d_out) if config.vq_dim else 1


def factor_cost(acc: Accumulator, config: QuantConfig) -> int:
    """What factoring ``acc`` costs, up to a constant shared by the layers of one config: the
    rows of its state times d² (d³ for H and R, m·d² for an m-row sketch); nothing for ``rtn``."""
    if config.route == "rtn":
        return 0
    rows = acc.state.shape[0] if acc.kind == "sketch" else acc.d  # a folded accumulator merges its state lazily
    return rows * acc.d * acc.d


def factor_owners(costs: Sequence[int], world: int) -> List[int]:
    """The rank that factors each layer: the costliest layer first, each to the rank with the least
    work so far (ties: the lower rank, then the earlier layer), so that no rank waits on one
    that holds all the work. Deterministic: every rank computes the same owners from the same costs."""
    load = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def factorize_shared(accs: Mapping[str, Accumulator], config: QuantConfig, comm: "Comm") -> Dict[str, Factor]:
    """The factor of each of a subset's accumulators, on every rank: each layer's accumulators are
    merged into its owner rank (:func:`factor_owners`), each rank factors the layers it owns, and
    every factor is broadcast from its owner. The factors equal one process's (one process:
    :func:`factorize` of each); N ranks factor N layers at once instead of rank 0 all of them."""
    names = list(accs)
    owners = factor_owners([factor_cost(accs[n], config) for n in names], comm.world)
    merged = {n: comm.merge(accs[n], dst=o) for n, o in zip(names, owners)}
    mine = {n: factorize(merged[n], config) for n, o in zip(names, owners) if o == comm.rank}
    return {n: comm.broadcast(mine.get(n), src=o) for n, o in zip(names, owners)}


def quantize_shared(weight: torch.Tensor, factor: Factor, config: QuantConfig, comm: "Comm",
                    name: str = "layer") -> LayerResult:
    """:func:`quantize_linear` with the rows of ``weight`` split across ``comm``'s ranks (rows
    are independent given U, docs/design.md §1): each rank quantizes a contiguous run that
    respects the result's ``row_unit``, and the pieces are gathered in row order through the
    result protocol, so every rank ends with the whole layer. A layer with fewer row units
    than ranks is quantized whole on every rank."""
    if factor.pending is not None:  # damp='auto' chooses from the whole weight, once (rank 0)
        factor = comm.broadcast(factor.for_weight(weight, name) if comm.rank == 0 else None)
    bounds = row_split(weight.shape[0], comm.world, row_unit(config, weight.shape[0]))
    if comm.world == 1 or not bounds:
        return quantize_linear(weight, factor, config, name=name)
    part = quantize_linear(weight[bounds[comm.rank] : bounds[comm.rank + 1]], factor, config, name=name)
    return part.with_rows({k: comm.gather_rows(t, dim) for k, (t, dim) in part.row_tensors().items()})
