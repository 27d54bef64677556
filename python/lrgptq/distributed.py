"""Communication between the processes of one quantization (torch.distributed: gloo on CPU,
NCCL on GPU), and nothing else: the algorithm that uses it is in linear.py
(``factorize_shared``, ``quantize_shared``) and pipeline.py.

The pipeline talks to a :class:`Comm`; :class:`Comm` itself is the single-process case (every
method is the identity) and :class:`Distributed` the torch.distributed one. What they offer:
split the calibration batches, merge accumulators, broadcast an object from rank 0, gather the
row pieces of a tensor, barrier. How the pipeline uses them:

- calibration batches are split into contiguous runs, one per rank; each rank feeds its own
  accumulator, with the sketch's token counter starting at the global index of its first token
  (docs/design.md §2: S_b depends on (seed, global token index) only, so Y = Σ_ranks Y_r);
- accumulators merge exactly: H and Y by an all-reduce sum, R by a binary tree of QR merges
  (R ← R-factor of [R_a; R_b], which keeps RᵀR = R_aᵀR_a + R_bᵀR_b);
- the factor (perm, U) is computed once, on rank 0, and broadcast;
- the rows of W are split across ranks for the engine (rows are independent given U,
  docs/design.md §1; a split respects the result's ``row_unit``: GPTVQ's codebooks are shared by
  ``vq_group_rows`` rows) and every per-row tensor of the result protocol is all-gathered, so
  every rank ends with the whole layer.

What differs from one process is the order of floating-point sums (H, Y, R); see
docs/benchmarks.md ("issue 6") for the measured differences.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from . import ops
from .accumulate import Accumulator, FoldedAccumulator


def _tokens(batch: Any) -> int:
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return int(ids.numel())


class Comm:
    """One process: nothing to split, merge or gather."""

    rank = 0
    world = 1
    token_offset = 0  # global index of this rank's first calibration token

    @property
    def is_writer(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    def split(self, batches: List[Any]) -> List[Any]:
        return batches

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a factor, or decisions taken from data that differ per rank)."""
        return value

    def merge(self, acc: Accumulator) -> Accumulator:
        """Every rank's accumulator merged into rank 0's."""
        return acc

    def gather_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's piece of ``t`` concatenated along ``dim`` in rank order (pieces may differ
        in size along ``dim`` only)."""
        return t

    def barrier(self) -> None:
        pass


class Distributed(Comm):
    """The ranks of an initialised torch.distributed process group (``torchrun`` sets one up with
    ``torch.distributed.init_process_group()``)."""

    def __init__(self, group: Optional[Any] = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "lrgptq.distributed.Distributed needs an initialised process group: launch with torchrun "
                "and call torch.distributed.init_process_group() first"
            )
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def split(self, batches: List[Any]) -> List[Any]:
        """This rank's contiguous run of batches; sets ``token_offset`` to its first token's index."""
        n = len(batches)
        if n < self.world:
            raise ValueError(
                f"{n} calibration batches for {self.world} processes: each rank needs at least one batch; "
                "use more calibration samples or fewer processes"
            )
        bounds = [n * r // self.world for r in range(self.world + 1)]
        self.token_offset = sum(_tokens(b) for b in batches[: bounds[self.rank]])
        return batches[bounds[self.rank] : bounds[self.rank + 1]]

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self.dist.broadcast_object_list(box, src=self._global(0), group=self.group, device=self._obj_device)
        return box[0]

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.to(self.device)
        self.dist.all_reduce(buf, group=self.group)
        return buf.cpu()

    def merge(self, acc: Accumulator) -> Accumulator:
        """Every rank's accumulator merged into rank 0's (the only one that factors)."""
        if isinstance(acc, FoldedAccumulator):  # damp='auto': fold by fold
            for part in acc.parts:
                self.merge(part)
            return acc
        tokens = self._all_reduce(torch.tensor([acc.tokens], dtype=torch.float64))
        if acc.kind == "qr":
            self._tree_qr(acc)
        else:  # H and Y are sums over tokens (docs/design.md §2)
            acc._state = self._all_reduce(acc.state)
        acc.tokens = int(tokens.item())
        return acc

    def _tree_qr(self, acc: Accumulator) -> None:
        """R ← R-factor of [R_a; R_b] up a binary tree: rank r takes r + step's R at each level."""
        R = acc.state
        step = 1
        while step < self.world:
            if self.rank % (2 * step) == 0 and self.rank + step < self.world:
                other = torch.empty_like(R, device=self.device)
                self.dist.recv(other, src=self._global(self.rank + step), group=self.group)
                ops.qr_update(R, other.cpu())
            elif self.rank % (2 * step) == step:
                self.dist.send(R.to(self.device), dst=self._global(self.rank - step), group=self.group)
                break
            step *= 2

    def _global(self, rank: int) -> int:
        return rank if self.group is None else self.dist.get_global_rank(self.group, rank)

    @property
    def _obj_device(self) -> Optional[torch.device]:
        return self.device if self.device.type == "cuda" else None

    def gather_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's piece concatenated along ``dim`` in rank order; the pieces' sizes are
        exchanged first and each is padded to the largest, so that one all_gather moves them."""
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(sizes, torch.tensor([t.shape[dim]], device=self.device), group=self.group)
        rows = [int(n) for n in sizes]
        if t.dtype == torch.bool:  # not every backend moves bool tensors
            return self.gather_rows(t.to(torch.uint8), dim).to(torch.bool)
        pad = list(t.shape)
        pad[dim] = max(rows) - t.shape[dim]
        mine = torch.cat([t, t.new_zeros(pad)], dim=dim) if pad[dim] else t
        mine = mine.to(self.device).contiguous()
        pieces = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(pieces, mine, group=self.group)
        return torch.cat([p.narrow(dim, 0, n).to(t.device) for p, n in zip(pieces, rows)], dim=dim)

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)
