"""damp='auto': each layer's damping chosen on held-out calibration tokens (docs/design.md §13).

The layer's tokens go to two accumulators by global token index (accumulate.FoldedAccumulator):
training tokens and held-out ones, so no token is kept and ranks merge fold by fold. For every
candidate c of :data:`CANDIDATES` (spectral or Cholesky damping λ = c × the diagonal statistic,
0 = undamped where the training tokens' H is positive definite, and ``rtn``: no error feedback, the
limit λ → ∞), a
deterministic sample of the weight's rows is quantized with the factor of the training tokens and
scored on the held-out ones, ‖R_val (W − Q)ᵀ‖²_F = tr((W − Q) H_val (W − Q)ᵀ) (rows are independent
given the factor, docs/design.md §1, so a row sample scores a candidate at a fraction of the
engine's cost). The best candidate is then used with every token, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch

from . import ops
from .accumulate import Accumulator, FoldedAccumulator
from .config import QuantConfig

Candidate = Union[float, str]
RTN = "rtn"
# Multiples of the diagonal statistic (damp_ref), a decade apart from "undamped" to "as large as the
# average input energy", and the no-feedback limit; 0.01 is QuantConfig's default damp.
DAMPS: Tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
CANDIDATES: Tuple[Candidate, ...] = DAMPS + (RTN,)
DEFAULT_DAMP = 0.01
SCORE_ROWS = 128  # rows of W that score a candidate (evenly spaced; all of them when d_out is smaller)


def label(c: Candidate) -> str:
    """A candidate as the reports name it: '0', '0.001', ..., 'rtn'."""
    return c if isinstance(c, str) else f"{c:g}"


def score_rows(d_out: int) -> torch.Tensor:
    """The rows that score candidates: at most SCORE_ROWS, evenly spaced, first and last included."""
    if d_out <= SCORE_ROWS:
        return torch.arange(d_out)
    return torch.linspace(0, d_out - 1, SCORE_ROWS, dtype=torch.float64).round().long()


def held_out_loss(W: torch.Tensor, Q: torch.Tensor, held_out: Accumulator) -> float:
    """tr(E H_val Eᵀ) for E = W − Q (rows, d): ‖R_val Eᵀ‖²_F from R, or from H itself."""
    A = held_out.state
    return float(ops.heldout_loss(W.to(A.device), Q.to(A.device), A, source=held_out.kind).sum())


@dataclass
class Search:
    """One input's folds and the config; chooses the damping of each layer that reads the input.
    Factors of the training tokens (per candidate) and of every token (per chosen candidate) are
    made once and shared by the layers (q/k/v read one input)."""

    folds: FoldedAccumulator
    config: QuantConfig
    _train: Dict[str, object] = field(default_factory=dict, repr=False)
    _final: Dict[str, object] = field(default_factory=dict, repr=False)
    _grams: Dict[str, Accumulator] = field(default_factory=dict, repr=False)

    def _gram(self, which: str) -> Accumulator:
        """H of the training tokens ('train') or of every token ('all') as a ``gram`` accumulator,
        made once: from R by H = RᵀR (the op gram_update), and H_all = H_train + H_val, so the
        candidates' factors do not form H again and the final one needs no QR of the stacked R's."""
        if which not in self._grams:
            if which == "train":
                parts = (self.folds.train,)
            else:
                parts = (self.folds.held_out,)
            acc = Accumulator("gram", self.folds.d, device=self.folds.device)
            for part in parts:
                if self.folds.kind == "gram":
                    acc._state += part.state
                else:
                    ops.gram_update(acc._state, part.state)
                acc.tokens += part.tokens
            if which == "all":
                acc.merge(self._gram("train"))
            self._grams[which] = acc
        return self._grams[which]

    def _factorize(self, which: str, cfg: QuantConfig):
        from .linear import factorize

        f = factorize(self._gram(which), cfg)
        f.report["accumulator"] = self.folds.kind
        return f

    def _train_factor(self, c: Candidate):
        """The factor of the training tokens that scores candidate ``c``: GPTQ's Cholesky route on
        H_train + λI in the config's order (act-order for the pivoted one, whose pivot loop would cost
        as much as the factor itself); for svdqr with λ > 0 this is the route's own factor (§6.1) up
        to the order. λ = 0 is scored only where H_train is positive definite (no truncation)."""
        if c == RTN:
            return self._factorize("train", dataclasses.replace(self.config, route="rtn", damp=DEFAULT_DAMP))
        order = "act" if self.config.order == "pivot" else self.config.order
        cfg = dataclasses.replace(self.config, route="cholesky", order=order, damp=float(c),
                                  max_retries=0 if c == 0 else self.config.max_retries)
        try:
            return self._factorize("train", cfg)
        except RuntimeError:
            if c == 0:
                return None  # H_train is singular: undamped would need truncation (not a candidate)
            raise

    def _final_factor(self, c: Candidate):
        """The factor of every token with candidate ``c``, by the config's route from H = H_train +
        H_val (for svdqr with λ > 0 that is the H + λI the route forms from R when it keeps every
        value, §3); λ = 0: the exact inverse by the Cholesky route, as scored."""
        from .linear import factorize

        if c == RTN:
            return self._factorize("all", dataclasses.replace(self.config, route="rtn", damp=DEFAULT_DAMP))
        if c == 0:
            try:
                return self._factorize("all", dataclasses.replace(self.config, route="cholesky", damp=0.0,
                                                                  max_retries=0))
            except RuntimeError:  # H of every token is numerically singular after all: the route's own
                return factorize(self.folds.merged(), dataclasses.replace(self.config, damp=0.0))  # undamped factor
        return self._factorize("all", dataclasses.replace(self.config, damp=float(c)))

    def score(self, W: torch.Tensor, c: Candidate, name: str) -> Optional[float]:
        """The held-out loss of candidate ``c`` on the sampled rows ``W`` (None: not scorable)."""
        from .linear import quantize_linear

        key = label(c)
        if key not in self._train:
            self._train[key] = self._train_factor(c)
        if self._train[key] is None:
            return None
        cfg = dataclasses.replace(self.config, damp=DEFAULT_DAMP)
        Q = quantize_linear(W, self._train[key], cfg, name=f"{name} (damp='auto', candidate {key})").weight
        return held_out_loss(W, Q, self.folds.held_out)

    def scores(self, weight: torch.Tensor, name: str) -> Dict[str, Optional[float]]:
        """The held-out loss of the candidates the search visits on ``weight``'s sampled rows (None:
        not visited, or not scorable). ``rtn`` is always scored (it needs no factor); the damping
        ladder is walked from the default one step at a time, up while the loss falls, else down
        while it falls, so a loss that is unimodal in log λ is minimised with 3 or 4 factors, not 5."""
        W = weight.detach()[score_rows(weight.shape[0]).to(weight.device)]
        out: Dict[str, Optional[float]] = {label(c): None for c in CANDIDATES}
        out[RTN] = self.score(W, RTN, name)
        inf = float("inf")

        def loss(i: int) -> float:
            key = label(DAMPS[i])
            if out[key] is None:
                out[key] = self.score(W, DAMPS[i], name)
            return inf if out[key] is None else out[key]

        start = DAMPS.index(DEFAULT_DAMP)
        for step in (1, -1):
            i = start
            while 0 <= i + step < len(DAMPS) and loss(i + step) < loss(i):
                i += step
            if i != start:
                break
        return out

    def choose(self, weight: torch.Tensor, name: str):
        """The factor of every token with the candidate that scored best on ``weight``; its report
        holds the choice and every candidate's held-out loss."""
        train, held = self.folds.train.tokens, self.folds.held_out.tokens
        scores: Optional[Dict[str, float]] = None
        if train and held:
            scores = self.scores(weight, name)
            scored = [c for c in CANDIDATES if scores[label(c)] is not None]
            best = min(scored, key=lambda c: scores[label(c)])  # ties: the first, the least damped
        else:
            best = DEFAULT_DAMP
        key = label(best)
        if key not in self._final:
            self._final[key] = self._final_factor(best)
        f = self._final[key]
        report = {**f.report, "damp_auto": key, "heldout_tokens": held, "train_tokens": train}
        if scores is None:  # said beside the factor's own note (e.g. N < d), not instead of it
            said = (f"damp='auto': {train} training and {held} held-out tokens, too few to validate; "
                    f"used damp={DEFAULT_DAMP}")
            report["note"] = "; ".join(n for n in (f.report.get("note"), said) if n)
        else:
            report.update(heldout_loss=scores, heldout_loss_default=scores[label(DEFAULT_DAMP)])
        return dataclasses.replace(f, report=report)


def search(acc: FoldedAccumulator, config: QuantConfig) -> Search:
    """The search for ``acc``'s layers (``acc`` from ``make_accumulator`` with damp='auto')."""
    if not isinstance(acc, FoldedAccumulator):
        raise ValueError("damp='auto' needs the held-out tokens apart: pass the inputs themselves, or an "
                         "accumulator from lrgptq.linear.make_accumulator(config, d) with that config")
    return Search(acc, config)
