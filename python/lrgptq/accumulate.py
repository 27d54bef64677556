"""Accumulators: what is kept of a layer's calibration inputs X while they stream (DESIGN §2)."""

from __future__ import annotations

import math
from typing import Optional

import torch

KINDS = ("gram", "qr", "sketch")


class Accumulator:
    """Streams batches X (..., d) into H (``gram``), R (``qr``) or Y (``sketch``).

    ``qr`` starts from R0 = sqrt(damp)·I, so that RᵀR = XᵀX + damp·I exactly. ``sketch`` keeps
    m = ``sketch_size`` rows; the sketch of a token depends only on (seed, its global index), so
    two workers that cover disjoint token ranges merge by summing.
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
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"Accumulator kind={kind!r} is not allowed: use one of {KINDS}")
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"Accumulator d={d!r} must be a positive integer (the layer's in_features)")
        self.kind, self.d, self.sketch_kind, self.zeta, self.seed = kind, d, sketch_kind, zeta, seed
        self.tokens = 0
        self.offset = token_offset
        if kind == "gram":
            self.state = torch.zeros(d, d, dtype=torch.float64)
        elif kind == "qr":
            if dtype not in (torch.float32, torch.float64):
                raise ValueError(f"Accumulator dtype={dtype} must be torch.float32 or torch.float64")
            self.state = math.sqrt(damp) * torch.eye(d, dtype=dtype)
        else:
            if sketch_size is None or sketch_size < 1:
                raise ValueError("Accumulator('sketch') needs sketch_size=m >= 1 (rows of the sketch)")
            if sketch_kind not in ("sparse", "gaussian"):
                raise ValueError(f"sketch_kind={sketch_kind!r} must be 'sparse' or 'gaussian'")
            self.state = torch.zeros(sketch_size, d, dtype=torch.float64)

    def add(self, X: torch.Tensor) -> "Accumulator":
        """Adds a batch of inputs of shape (..., d), any float dtype."""
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"Accumulator.add: X must be a torch.Tensor, got {type(X).__name__}")
        X = X.detach().cpu()
        n = X.numel() // self.d if X.shape and X.shape[-1] == self.d else 0
        if self.kind == "gram":
            torch.ops.lrgptq.gram_update(self.state, X)
        elif self.kind == "qr":
            torch.ops.lrgptq.qr_update(self.state, X)
        else:
            torch.ops.lrgptq.sketch_update(
                self.state, X, self.seed, self.offset + self.tokens, self.sketch_kind, self.zeta
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
            torch.ops.lrgptq.qr_update(self.state, other.state)
        else:
            self.state += other.state
        self.tokens += other.tokens
        return self
