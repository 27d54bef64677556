"""Warnings a quantization run owes its user, each said once per run (``warnings.warn``; the CLI
prints them as lines of its output): options that have no effect with the other settings, a run
that quantized no layer, layers that no calibration token reached (rounded to nearest: e.g. MoE
experts the router never chose), and layers that saw fewer calibration tokens than they have
inputs."""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any, List

from .config import QuantConfig

# option -> (what makes it matter, the test on a config): set away from its default while the
# test fails, the option changes nothing.
_NEEDS = {
    "sketch_size": ("accumulator='sketch'", lambda c: c.accumulator == "sketch"),
    "sketch_kind": ("accumulator='sketch'", lambda c: c.accumulator == "sketch"),
    "grid_passes": ("grid='noclip'", lambda c: c.grid == "noclip"),
    "vq_group_cols": ("vq_dim > 0", lambda c: c.vq_dim > 0),
    "vq_group_rows": ("vq_dim > 0", lambda c: c.vq_dim > 0),
    "vq_em_iters": ("vq_dim > 0", lambda c: c.vq_dim > 0),
    "vq_codebook_steps": ("vq_dim > 0", lambda c: c.vq_dim > 0),
}


def unused_options(cfg: QuantConfig) -> List[str]:
    """The options of ``cfg`` set away from their default that have no effect with its other
    settings, each as 'name=value (only with ...)'."""
    defaults = {f.name: f.default for f in fields(QuantConfig)}
    out = []
    for name, (needs, matters) in _NEEDS.items():
        value = getattr(cfg, name)
        if value != defaults[name] and not matters(cfg):
            out.append(f"{name}={value!r} (only with {needs})")
    return out


def warn_unused_options(cfg: QuantConfig) -> None:
    unused = unused_options(cfg)
    if unused:
        warnings.warn("these options have no effect with the other settings: " + "; ".join(unused), stacklevel=4)


def warn_after_run(layers: List[dict], config: Any) -> None:
    """One warning for a run that quantized nothing, one for all the layers that saw fewer
    calibration tokens N than their inputs d (H = XᵀX then has rank <= N < d)."""
    if not layers:
        warnings.warn(
            "no layer was quantized: skip= covers every linear layer, or the blocks hold none "
            "(check skip= and blocks=)", stacklevel=4)
        return
    if config.route == "rtn":
        return
    starved = [r["name"] for r in layers if r.get("tokens", -1) == 0]
    if starved:
        shown = ", ".join(starved[:8]) + (f" and {len(starved) - 8} more" if len(starved) > 8 else "")
        warnings.warn(
            f"{len(starved)} of {len(layers)} layers received no calibration tokens and were rounded to nearest "
            f"(RTN, same grid): {shown}; MoE experts the router never chose get this treatment (docs/moe.md): "
            "give more or more varied calibration text to reach them", stacklevel=4)
    if config.accumulator == "sketch":
        return
    few = [r for r in layers if 0 < r.get("tokens", 0) < r["d"]]
    if few:
        worst = min(few, key=lambda r: r["tokens"] / r["d"])
        warnings.warn(
            f"{len(few)} of {len(layers)} layers saw fewer calibration tokens than they have inputs (N < d; "
            f"fewest: {worst['name']} with N={worst['tokens']}, d={worst['d']}): their H = XᵀX is rank-deficient "
            "and the route damped or truncated it; give more calibration tokens (samples × length >= d)",
            stacklevel=4)
