"""QuantConfig: every setting of a quantization, validated when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import torch

from . import limits
from .limits import ACCUMULATORS, MAX_BITS, MAX_LDLQ_DIM, MIN_BITS, SKETCH_KINDS, vq_bits_ok, vq_bits_rule

ROUTES = ("cholesky", "svdqr", "ql", "rtn")
ORDERS = ("identity", "act", "pivot", "babai")
TRUNCATIONS = ("rel", "energy", "none")
DAMP_REFS = ("mean", "median")
GRIDS = ("minmax", "noclip")
COMPUTE_DTYPES = (torch.float32, torch.float64)
VQ_DIMS = (0,) + limits.VQ_DIMS  # 0: the scalar grid
AUTO = "auto"  # damp chosen per layer on held-out tokens (python/lrgptq/validate.py)
AUTO_ROUTES = ("cholesky", "svdqr")
AUTO_ACCUMULATORS = ("gram", "qr")

METHODS = {
    "gptq": {"route": "cholesky", "accumulator": "gram", "order": "identity"},
    # the project's recipe: damping chosen per layer on held-out tokens and GPTQ's MSE range search,
    # on svdqr with the pivoted order (docs/benchmarks.md §1.5)
    "lrgptq": {"route": "svdqr", "accumulator": "gram", "order": "pivot", "damp": AUTO, "mse": True},
    "rtn": {"route": "rtn", "accumulator": "gram", "order": "identity"},
}


def auto_ruled_out(route: str, accumulator: str, vq_dim: int) -> Optional[str]:
    """What damp='auto' needs instead of these settings (the fix, for the error), or None where it
    serves them. It quantizes candidates on training tokens and scores them on held-out ones
    (validate.py): a damped factor route, an accumulator that keeps tokens apart, the scalar engine."""
    if route not in AUTO_ROUTES:
        return f"a number with route={route!r} ('auto' chooses the damping of the routes 'cholesky' and 'svdqr')"
    if accumulator not in AUTO_ACCUMULATORS:
        return (f"a number with accumulator={accumulator!r} ('auto' holds tokens out, which needs accumulator "
                "'qr' or 'gram')")
    if vq_dim:
        return ("a number with vq_dim > 0 ('auto' scores candidates with the scalar engine; GPTVQ's codebooks "
                "are fitted per group of rows, so a row sample cannot score them)")
    return None


def damp_value(text: str) -> Union[float, str]:
    """``--damp`` on the command line: 'auto' or a number."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"damp must be 'auto' or a number >= 0, got {text!r}") from None


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"QuantConfig.{name}={value!r} is not allowed: {name} must be {allowed}")


def _setting(default: Any, help: str, choices: Optional[tuple] = None, value_type: Optional[type] = None) -> Any:
    """A QuantConfig field with its help text (and, for the CLI, its choices or value type): the
    command line builds its quantization options from these (cli.py), defaults included."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": value_type})


@dataclass
class QuantConfig:
    """Settings of one quantization.

    route: ``cholesky`` (GPTQ as published), ``svdqr`` (factor the inputs: SVD, spectral damping
    σ̃² = σ² + λ with λ = damp × mean diag H, truncation, pivoted order, QR; never forms H),
    ``ql`` (exact, no inverse; damped only if X is rank-deficient) or ``rtn`` (round to nearest).
    order: ``identity``, ``act`` (diag H descending), ``pivot`` (pivoted-QR order) or ``babai``
    (back to front; with route ``ql`` this is Babai's nearest plane on R).
    accumulator: what is kept of the inputs: ``gram`` (H), ``qr`` (R, exact) or ``sketch`` (Y).
    ldlq_dim: D, the columns quantized jointly (block LDLQ: the D codes that minimise the block's
    error under the D×D diagonal block of U); 1 is scalar GPTQ.
    grid: ``minmax`` (GPTQ's: range of the group's targets at its first column, or an MSE search)
    or ``noclip`` (reruns with the smallest grids that cover every target the error feedback
    produced, until nothing is clamped or ``grid_passes`` runs: the condition of Babai's bound).
    """

    bits: int = _setting(4, f"bits per weight, {MIN_BITS}..{MAX_BITS} (GPTVQ: index bits per weight)")
    group_size: int = _setting(128, "input channels per scale/zero; -1 = one per row")
    sym: bool = _setting(False, "symmetric grid (zero fixed at 2^(bits-1)) instead of asymmetric")
    mse: bool = _setting(False, "search the grid's range by MSE (shrink factors) instead of min-max")
    static_groups: bool = _setting(False, "group grids from the original weights, before any update")
    route: str = _setting("svdqr", "factor route: cholesky (GPTQ's damped H), svdqr (SVD of the input factor), "
                          "ql (exact, no inverse), rtn (round to nearest)", ROUTES)
    order: str = _setting("pivot", "column order: identity, act (diag H), pivot (pivoted QR), babai (back to front)",
                          ORDERS)
    accumulator: str = _setting("gram", "what is kept of the inputs: H (gram), R (qr, exact: what svdqr needs where it "
                                "truncates), or a sketch Y", ACCUMULATORS)
    sketch_size: Optional[int] = _setting(None, "rows m of the sketch (accumulator sketch)", value_type=int)
    sketch_kind: str = _setting("sparse", "sketch: sparse sign or gaussian", SKETCH_KINDS)
    zeta: int = _setting(8, "sparse sketch: nonzeros per token")
    seed: int = _setting(0, "seed of calibration windows and sketches")
    damp: Union[float, str] = _setting(
        0.01, "λ = damp × mean (or median) diag H: added to H (cholesky) or to σ² (svdqr); 'auto': chosen per "
        "layer on held-out calibration tokens (routes cholesky and svdqr, scalar grid)", value_type=damp_value)
    damp_ref: str = _setting("mean", "diagonal statistic that damp multiplies", DAMP_REFS)
    max_retries: int = _setting(8, "cholesky: tenfold raises of λ before giving up")
    truncation: str = _setting("rel", "svdqr: rule that drops meaningless singular values", TRUNCATIONS)
    tau: float = _setting(1e-4, "svdqr: threshold of the truncation rule")
    block_size: int = _setting(128, "columns per lazy batch update")
    ldlq_dim: int = _setting(1, f"block LDLQ: choose D columns' codes jointly, D in 1..{MAX_LDLQ_DIM}; 1 = scalar GPTQ")
    grid: str = _setting("minmax", "minmax (GPTQ's) or noclip (rerun with grids covering the error feedback's "
                         "targets)", GRIDS)
    grid_passes: int = _setting(4, "noclip: most passes")
    compute_dtype: torch.dtype = _setting(torch.float32, "dtype of the engine's arithmetic", COMPUTE_DTYPES)
    factor_dtype: torch.dtype = _setting(torch.float64, "dtype of the factor route's arithmetic", COMPUTE_DTYPES)
    # GPTVQ (python/lrgptq/vq.py): 0 = the scalar grid; 1, 2 or 4 = vector quantization with
    # codebooks of 2^(bits·vq_dim) centroids per vq_group_cols columns × vq_group_rows rows (−1: all),
    # fitted by vq_em_iters EM iterations and stored as int8 with a float16 scale.
    vq_dim: int = _setting(0, "GPTVQ: columns per codebook vector (0 = the scalar grid); codebooks of "
                           "2^(bits*D) entries", VQ_DIMS)
    vq_group_cols: int = _setting(256, "GPTVQ: columns sharing one codebook")
    vq_group_rows: int = _setting(32, "GPTVQ: rows sharing one codebook")
    vq_em_iters: int = _setting(10, "GPTVQ: EM iterations fitting each codebook")
    vq_codebook_int8: bool = _setting(True, "GPTVQ: round codebooks to int8 with a float16 scale")
    vq_codebook_steps: int = _setting(0, "GPTVQ: codebook update steps after the pass (0: none)")

    def __post_init__(self) -> None:
        def check_int(field: str, lo: int, hi: Optional[int] = None) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise _bad(field, v, f"an integer in {lo}..{hi if hi is not None else 'inf'}")

        def check_choice(field: str, choices: tuple) -> None:
            v = getattr(self, field)
            if v not in choices:
                raise _bad(field, v, "one of " + ", ".join(repr(c) for c in choices))

        check_int("bits", MIN_BITS, MAX_BITS)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size < 1
        ):
            raise _bad("group_size", self.group_size, "-1 (one group per row) or a positive integer")
        for name, choices in (
            ("route", ROUTES),
            ("order", ORDERS),
            ("accumulator", ACCUMULATORS),
            ("truncation", TRUNCATIONS),
            ("damp_ref", DAMP_REFS),
            ("grid", GRIDS),
            ("sketch_kind", SKETCH_KINDS),
            ("compute_dtype", COMPUTE_DTYPES),
            ("factor_dtype", COMPUTE_DTYPES),
        ):
            check_choice(name, choices)
        for name in ("sym", "mse", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        check_int("zeta", 1)
        check_int("seed", 0)
        check_int("max_retries", 0)
        check_int("block_size", 1)
        check_int("ldlq_dim", 1, MAX_LDLQ_DIM)
        check_int("grid_passes", 1)
        if self.sketch_size is not None:
            check_int("sketch_size", 1)
        for field in ("damp", "tau"):
            v = getattr(self, field)
            if field == "damp" and v == AUTO:
                self._check_auto()
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
                raise _bad(field, v, "a finite number >= 0" + (" or 'auto'" if field == "damp" else ""))
        self._check_vq()
        if self.accumulator == "sketch" and self.sketch_size is None:
            raise _bad("sketch_size", None, "set (the sketch's row count m) when accumulator='sketch'")
        if self.route == "ql" and self.accumulator == "sketch":
            raise _bad("route", "ql", "'svdqr' or 'cholesky' with a sketch (a sketch has m < d rows)")
        if self.ldlq_dim > 1 and self.route == "ql":
            raise _bad("route", "ql", "'cholesky' or 'svdqr' with ldlq_dim > 1 (block LDLQ needs U with H⁻¹ = UᵀU)")
        if self.ldlq_dim > 1 and not self.static_groups and self.group_size % self.ldlq_dim != 0 and (
            self.group_size != -1
        ):
            raise _bad("group_size", self.group_size, f"a multiple of ldlq_dim={self.ldlq_dim} (or -1, or use "
                       "static_groups) so that no block of columns straddles a group start")
        if self.grid == "noclip" and self.mse:
            raise _bad("mse", True, "False with grid='noclip' (noclip sets the range from the targets)")

    def _check_auto(self) -> None:
        why = auto_ruled_out(self.route, self.accumulator, self.vq_dim)
        if why is not None:
            raise _bad("damp", AUTO, why)

    def _check_vq(self) -> None:
        if self.vq_dim not in VQ_DIMS or isinstance(self.vq_dim, bool):
            raise _bad("vq_dim", self.vq_dim, "0 (scalar grid), 1, 2 or 4")
        if self.vq_dim and not vq_bits_ok(self.bits, self.vq_dim):
            raise _bad("bits", self.bits, vq_bits_rule(self.vq_dim))
        for field, step in (("vq_group_cols", max(self.vq_dim, 1)), ("vq_group_rows", 1)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or (v != -1 and (v < 1 or v % step)):
                raise _bad(field, v, f"-1 (all) or a positive multiple of {step}")
        if self.vq_dim > 1 and self.route == "ql":
            raise _bad("vq_dim", self.vq_dim, "0 or 1 with route 'ql' (its error feedback is per column); "
                       "use route 'cholesky' or 'svdqr' for vector quantization")
        for field in ("vq_em_iters", "vq_codebook_steps"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _bad(field, v, "an integer >= 0")
        if not isinstance(self.vq_codebook_int8, bool):
            raise _bad("vq_codebook_int8", self.vq_codebook_int8, "True or False")
        if self.vq_dim and (self.ldlq_dim > 1 or self.grid != "minmax"):
            raise _bad("vq_dim", self.vq_dim, "0 with ldlq_dim > 1 or grid='noclip' (options of the scalar grid; "
                       "vector quantization picks codes and codebooks itself)")

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> "QuantConfig":
        """Presets: ``gptq`` (cholesky route on H, as published), ``lrgptq`` (svdqr on H, pivoted
        order, damping chosen per layer on held-out tokens, MSE range search) and ``rtn`` (round to
        nearest); ``overrides`` win. A preset's ``damp='auto'`` yields to overrides it cannot serve
        (a route other than cholesky/svdqr, a sketch, GPTVQ): those get the default damping; its
        ``mse`` yields to ``grid='noclip'`` and to GPTVQ (which fits codebooks, not ranges)."""
        if method not in METHODS:
            raise _bad("method", method, "one of " + ", ".join(repr(m) for m in METHODS))
        preset = dict(METHODS[method])
        merged = {**preset, **overrides}
        defaults = {f.name: f.default for f in fields(cls)}
        setting = {name: merged.get(name, defaults[name]) for name in ("route", "accumulator", "vq_dim", "grid")}
        vq = setting["vq_dim"]
        if preset.get("damp") == AUTO and "damp" not in overrides and (
            auto_ruled_out(setting["route"], setting["accumulator"], vq) is not None
        ):
            preset["damp"] = defaults["damp"]
        if preset.get("mse") and "mse" not in overrides and (setting["grid"] == "noclip" or vq):
            preset["mse"] = False
        return cls(**{**preset, **overrides})

    def to_dict(self) -> dict:
        out = asdict(self)
        out["compute_dtype"] = str(self.compute_dtype).replace("torch.", "")
        out["factor_dtype"] = str(self.factor_dtype).replace("torch.", "")
        return out
