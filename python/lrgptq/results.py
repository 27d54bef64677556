"""One result protocol for every method: what a quantized layer offers its callers.

Scalar GPTQ and block LDLQ (:class:`lrgptq.linear.QuantResult`) and GPTVQ
(:class:`lrgptq.vq.VQResult`) both implement :class:`LayerResult`, so the block loop, the
distributed row split and gather, and the checkpoint writer never ask which method made a layer:

- ``weight``, ``loss``, ``row_loss``, ``rank``, ``perm``, ``report``: the dequantized weight
  (original column order), Σ_j (t_j − q_j)²/U_jj² (docs/design.md §1) and its per-row terms, the
  factor's rank and column order, the report row;
- ``shape``: (out_features, in_features);
- ``row_unit``: the rows a split must keep together (1 for a scalar grid; GPTVQ shares a codebook
  between ``vq_group_rows`` rows, so a split falls on a group boundary or the layer is not split);
- ``row_tensors()``: the per-row tensors and the dimension their rows lie along; concatenating
  the pieces of a row split along those dimensions, in row order, and calling
  ``with_rows(tensors)`` on any piece gives the whole layer's result, report included.

How a result is packed is its checkpoint layout's business (``lrgptq.formats.for_config``).
"""

from __future__ import annotations

import abc
from typing import Dict, List, Tuple

import torch


class LayerResult(abc.ABC):
    """The protocol every method's result implements (see the module's docstring)."""

    weight: torch.Tensor
    loss: float
    row_loss: torch.Tensor
    rank: int
    perm: torch.Tensor
    report: dict

    @property
    @abc.abstractmethod
    def shape(self) -> Tuple[int, int]:
        """(out_features, in_features) of the layer."""

    @property
    @abc.abstractmethod
    def row_unit(self) -> int:
        """How many consecutive rows a row split must keep together (a split point is a multiple)."""

    @abc.abstractmethod
    def row_tensors(self) -> Dict[str, Tuple[torch.Tensor, int]]:
        """Field name -> (per-row tensor, the dimension its rows lie along)."""

    @abc.abstractmethod
    def with_rows(self, tensors: Dict[str, torch.Tensor]) -> "LayerResult":
        """The result whose per-row tensors are ``tensors`` (every row piece concatenated, as
        :meth:`row_tensors` names them), its loss and report recomputed from them."""


def row_split(rows: int, parts: int, unit: int) -> List[int]:
    """Bounds b_0 = 0 ≤ … ≤ b_parts = ``rows`` of ``parts`` contiguous runs of rows, as even as
    whole ``unit``-row groups allow; every inner bound is a multiple of ``unit``. Fewer groups
    than parts: an empty list (the layer is not split)."""
    unit = max(int(unit), 1)
    groups = -(-rows // unit)
    if groups < parts:
        return []
    return [min(rows, groups * r // parts * unit) for r in range(parts + 1)]


def concat_rows(pieces: List[LayerResult]) -> LayerResult:
    """The whole layer from its row pieces, in row order (what a gather across processes does)."""
    fields = pieces[0].row_tensors()
    whole = {k: torch.cat([p.row_tensors()[k][0] for p in pieces], dim=dim) for k, (_, dim) in fields.items()}
    return pieces[0].with_rows(whole)
