"""Accumulators: what is kept of a layer's calibration inputs X while they stream (docs/design.md §2)."""

from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from . import ops
from .limits import ACCUMULATORS, SKETCH_KINDS


class Accumulator:
    """Streams batches X (..., d) into H (``gram``), R (``qr``) or Y (``sketch``).

    ``qr`` starts from R0 = sqrt(damp)·I, so that RᵀR = XᵀX + damp·I exactly; it buffers batches
    until 2d rows wait, so each QR of [R; X_b] costs O(d²) per token, as H += X_bᵀX_b does. ``sketch`` keeps
    m = ``sketch_size`` rows; the sketch of a token depends only on (seed, its global index), so
    two workers that cover disjoint token ranges merge by summing. The state lives on ``device``
    (default: the CPU); batches are moved there, so a CUDA state accumulates on the GPU.
    """

    def __init__(
        self,
        kind: str,
        d: int,
        *,
        sketch_size: Optional[int] = None,
        sketch_kind: str = "sparse",
        zeta: int = 8,
        seed: int = 0,
        damp: float = 0.0,
        dtype: torch.dtype = torch.float64,
        token_offset: int = 0,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if kind not in ACCUMULATORS:
            raise ValueError(f"Accumulator kind={kind!r} is not allowed: use one of {ACCUMULATORS}")
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"Accumulator d={d!r} must be a positive integer (the layer's in_features)")
        self.kind, self.d, self.sketch_kind, self.zeta, self.seed = kind, d, sketch_kind, zeta, seed
        self.tokens = 0
        self.offset = token_offset
        self._pending: List[torch.Tensor] = []
        self._pending_rows = 0
        dev = torch.device("cpu") if device is None else torch.device(device)
        if kind == "gram":
            self._state = torch.zeros(d, d, dtype=torch.float64, device=dev)
        elif kind == "qr":
            if dtype not in (torch.float32, torch.float64):
                raise ValueError(f"Accumulator dtype={dtype} must be torch.float32 or torch.float64")
            self._state = math.sqrt(damp) * torch.eye(d, dtype=dtype, device=dev)
        else:
            if sketch_size is None or sketch_size < 1:
                raise ValueError("Accumulator('sketch') needs sketch_size=m >= 1 (rows of the sketch)")
            if sketch_kind not in SKETCH_KINDS:
                raise ValueError(f"sketch_kind={sketch_kind!r} must be one of {SKETCH_KINDS}")
            self._state = torch.zeros(sketch_size, d, dtype=torch.float64, device=dev)

    @property
    def device(self) -> torch.device:
        """Where the state lives (read without flushing the batches not yet added)."""
        return self._state.device

    @property
    def state(self) -> torch.Tensor:
        """H, R or Y with every batch added so far."""
        self._flush()
        return self._state

    def _flush(self) -> None:
        if self._pending:
            batch = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._pending_rows = [], 0
            ops.qr_update(self._state, batch)

    def add(self, X: torch.Tensor) -> "Accumulator":
        """Adds a batch of inputs of shape (..., d), any float dtype."""
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"Accumulator.add: X must be a torch.Tensor, got {type(X).__name__}")
        X = X.detach().to(self._state.device)
        n = X.numel() // self.d if X.shape and X.shape[-1] == self.d else 0
        if self.kind == "gram":
            ops.gram_update(self._state, X)
        elif self.kind == "qr":
            if not X.is_floating_point() or X.shape[-1:] != (self.d,):
                ops.qr_update(self._state, X)  # the op's own error names what is wrong
            rows = X.reshape(-1, self.d).to(self._state.dtype, copy=True)  # the model may reuse X
            if not bool(torch.isfinite(rows).all()):
                raise ValueError("Accumulator.add: X contains NaN or Inf; clean the calibration inputs X")
            self._pending.append(rows)
            self._pending_rows += rows.shape[0]
            if self._pending_rows >= 2 * self.d:
                self._flush()
        else:
            ops.sketch_update(
                self._state, X, seed=self.seed, offset=self.offset + self.tokens, kind=self.sketch_kind, zeta=self.zeta
            )
        self.tokens += n
        return self

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Merges another worker's accumulator of the same kind (sum, or QR of the stacked R's)."""
        if other.kind != self.kind or other.state.shape != self.state.shape:
            raise ValueError(
                f"Accumulator.merge: cannot merge {other.kind} {tuple(other.state.shape)} "
                f"into {self.kind} {tuple(self.state.shape)}"
            )
        if self.kind == "qr":
            ops.qr_update(self.state, other.state)
        else:
            self._state += other.state
        self.tokens += other.tokens
        return self


# Held-out folds for damp="auto" (docs/design.md §13): a token is held out when its chunk of
# HELD_OUT_CHUNK consecutive global token indices is a multiple of FOLDS. Chunks keep held-out
# tokens away from the training tokens next to them; FOLDS = 5 is odd, so with windows of a power
# of two tokens the held-out chunks rotate through every position of a window (the first token of a
# sequence, often an outlier, is held out in one window of five, as every other position is).
FOLDS = 5
HELD_OUT_CHUNK = 64


def held_out_mask(offset: int, n: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Whether each of the tokens offset .. offset + n − 1 (global indices) is held out."""
    t = torch.arange(offset, offset + n, device=device)
    return (t // HELD_OUT_CHUNK) % FOLDS == 0


class FoldedAccumulator:
    """Two accumulators of one kind: the training tokens and the held-out ones (:func:`held_out_mask`
    of the global token index, so any split of the tokens into batches or ranks gives the same folds).
    ``state`` is the state of every token (the folds merged exactly: a sum, or the QR of the stacked
    R's); ``train`` and ``held_out`` are the folds."""

    def __init__(self, kind: str, d: int, *, token_offset: int = 0,
                 device: Union[str, torch.device, None] = None) -> None:
        if kind not in ("gram", "qr"):
            raise ValueError(f"damp='auto' needs the 'qr' or 'gram' accumulator (a sketch mixes the tokens, so it "
                             f"cannot hold some out), got {kind!r}")
        self.kind, self.d, self.offset = kind, d, token_offset
        self.train = Accumulator(kind, d, device=device)
        self.held_out = Accumulator(kind, d, device=device)
        self.seen = 0  # tokens this instance was given (its global indices start at ``offset``)

    @property
    def tokens(self) -> int:
        return self.train.tokens + self.held_out.tokens

    @property
    def device(self) -> torch.device:
        return self.train.device

    @property
    def parts(self) -> tuple:
        return self.train, self.held_out

    def add(self, X: torch.Tensor) -> "FoldedAccumulator":
        """Adds a batch (..., d); rows are tokens in order."""
        if not isinstance(X, torch.Tensor) or X.shape[-1:] != (self.d,):
            self.train.add(X)  # the accumulator's own error names what is wrong
        rows = X.reshape(-1, self.d)
        mask = held_out_mask(self.offset + self.seen, rows.shape[0], rows.device)
        self.seen += rows.shape[0]
        if bool(mask.any()):
            self.held_out.add(rows[mask])
        if not bool(mask.all()):
            self.train.add(rows[~mask])
        return self

    def merged(self) -> Accumulator:
        """One accumulator of every token (the folds merged; neither fold is changed)."""
        out = Accumulator(self.kind, self.d, device=self.device)
        out._state = self.train.state.clone()
        out.tokens = self.train.tokens
        return out.merge(self.held_out)

    @property
    def state(self) -> torch.Tensor:
        return self.merged().state

    def merge(self, other: "FoldedAccumulator") -> "FoldedAccumulator":
        """Merges another worker's folds, fold by fold."""
        if not isinstance(other, FoldedAccumulator):
            raise ValueError("FoldedAccumulator.merge: the other accumulator has no folds (damp differs?)")
        self.train.merge(other.train)
        self.held_out.merge(other.held_out)
        return self
