"""Speed of the whole layer, side by side in one run: the reference GPTQ loop, our gptq route and our
lrgptq route, per stage (accumulate, factor, engine) and end to end (factor + engine).

Per layer shape (d_out, d): the packaged model's (SmolLM2-135M: 576x576, 192x576, 1536x576, 576x1536)
and synthetic 4096x4096 and 11008x4096. Inputs: N = 2d float32 tokens with a decaying spectrum and
uneven channel scales, in batches of 2048; W ~ 0.02·N(0, 1) float32; 4-bit, group size 128,
asymmetric, block 128. Every route gets the same W and X in the same run.

- reference: IST-DASLab gptq.py as published, float32 (``add_batch``: H ← H·n/(n+m) + (2/(n+m))XᵀX;
  ``fasterquant``: dead columns, H + 0.01·mean(diag H)·I, cholesky → cholesky_inverse →
  cholesky(upper)), then bench/gptq_baseline.fasterquant (its inner loop).
- gptq: QuantConfig.for_method("gptq") (gram accumulator, route cholesky, identity order).
- lrgptq: the lrgptq route, QuantConfig.for_method("lrgptq", damp=0.01, mse=False) (gram accumulator,
  route svdqr, pivot order, rel τ = 1e-4; until 2026-12-02 the preset's accumulator was the exact QR;
  the preset's damp="auto" and MSE search are costed by bench/validate.py and bench/engine.py --mse).
Ours go through lrgptq.factorize and lrgptq.quantize_linear (the library's path for one layer). The
factor rows also time each route with the other factor dtype.

    python bench/speed.py              # the table of docs/benchmarks.md
    python bench/speed.py --quick      # smoke run: the model's shapes only, 1 run
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Dict, List, Tuple

import torch

import common
import gptq_baseline

import lrgptq
from lrgptq.linear import make_accumulator

MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LARGE_SHAPES = [(4096, 4096), (11008, 4096)]
BATCH = 2048
F32, F64 = torch.float32, torch.float64


def make_inputs(d: int, gen: torch.Generator) -> torch.Tensor:
    """X (2d, d) float32: decaying spectrum (σ_i = 1/(1+i)), random rotation, uneven channel scales."""
    O, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    sigma = 1.0 / (1.0 + torch.arange(d, dtype=F32))
    scale = torch.exp(0.5 * torch.randn(d, generator=gen))
    return (torch.randn(2 * d, d, generator=gen) @ (sigma[:, None] * O.T)) * scale


def batches(X: torch.Tensor) -> List[torch.Tensor]:
    return [X[i:i + BATCH] for i in range(0, X.shape[0], BATCH)]


# ----------------------------------------------------------------------------- the reference, as published


def reference_accumulate(X: torch.Tensor) -> torch.Tensor:
    """GPTQ.add_batch over the batches: the running mean 2/n·XᵀX in float32."""
    d = X.shape[1]
    H, n = torch.zeros(d, d), 0
    for Xb in batches(X):
        m = Xb.shape[0]
        H *= n / (n + m)
        n += m
        inp = (2 / n) ** 0.5 * Xb.t()
        H += inp.matmul(inp.t())
    return H


def reference_factor(H: torch.Tensor, percdamp: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """GPTQ.fasterquant up to Hinv: dead columns, damping, Cholesky, inverse, upper Cholesky.
    Returns (Hinv, dead); fasterquant also zeroes W[:, dead] (done untimed, per weight)."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True), dead


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Cell:
    accumulate: float
    factor: float
    engine: float

    @property
    def end_to_end(self) -> float:
        return self.factor + self.engine


def timed(fn: Callable[[], object], runs: int) -> Tuple[float, object]:
    """(median seconds of `runs` calls, the last call's result); the caller warms up."""
    out: List[object] = [None]

    def call() -> None:
        out[0] = fn()

    return common.median(common.time_it(call, runs, warmup=0)), out[0]


def prepare(d: int, X: torch.Tensor, cfgs: Dict[str, lrgptq.QuantConfig], runs: int) -> Dict:
    """Accumulate and factor (both depend on d only), timed once per d: {route: (t_acc, t_factor, factor)}
    and, for ours, the factor's time with the other factor dtype."""
    t_acc, H = timed(lambda: reference_accumulate(X), runs)
    t_f, fac = timed(lambda: reference_factor(H), runs)
    prep = {"reference": (t_acc, t_f, fac), "other_dtype": {}}
    for name, cfg in cfgs.items():
        def accumulate(cfg=cfg):
            acc = make_accumulator(cfg, d)
            for Xb in batches(X):
                acc.add(Xb)
            return acc
        t_acc, acc = timed(accumulate, runs)
        t_f, f = timed(lambda: lrgptq.factorize(acc, cfg), runs)
        prep[name] = (t_acc, t_f, f)
        alt = dataclasses.replace(cfg, factor_dtype=F32 if cfg.factor_dtype == F64 else F64)
        prep["other_dtype"][name] = (alt.factor_dtype, timed(lambda: lrgptq.factorize(acc, alt), runs)[0])
    return prep


def measure(d_out: int, d: int, prep: Dict, cfgs: Dict[str, lrgptq.QuantConfig], gen: torch.Generator,
            runs: int) -> Dict:
    """The engines on one weight (d_out, d), with the factors of `prep`."""
    W = 0.02 * torch.randn(d_out, d, generator=gen)
    t_acc, t_f, (Hinv, dead) = prep["reference"]
    W_ref = W.clone()
    W_ref[:, dead] = 0
    t_e, _ = timed(lambda: gptq_baseline.fasterquant(W_ref, Hinv, bits=4, groupsize=128, sym=False, blocksize=128),
                   runs)
    cells = {"reference": Cell(t_acc, t_f, t_e)}
    losses = {}
    for name, cfg in cfgs.items():
        t_acc, t_f, f = prep[name]
        t_e, res = timed(lambda: lrgptq.quantize_linear(W, f, cfg), runs)
        cells[name] = Cell(t_acc, t_f, t_e)
        losses[name] = res.loss
    return dict(cells=cells, losses=losses, other_dtype=prep["other_dtype"],
                factor_dtype={name: cfg.factor_dtype for name, cfg in cfgs.items()})


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: the model's shapes, 1 run each")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell at the model's shapes (1 at the large ones)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    common.setup(args.threads)
    shapes = MODEL_SHAPES + ([] if args.quick else LARGE_SHAPES)
    gen = torch.Generator().manual_seed(0)
    common.header("Speed: reference GPTQ loop vs our gptq and lrgptq routes, per stage and end to end")
    cfgs = {name: common.route_config(name, bits=4, group_size=128) for name in ("gptq", "lrgptq")}
    measure(64, 256, prepare(256, make_inputs(256, gen), cfgs, 1), cfgs, gen, 1)  # warm-up of every path, untimed

    results, prep_d = {}, {}
    for d_out, d in shapes:
        runs = 1 if args.quick or d >= 4096 else args.runs
        if d not in prep_d:
            prep_d.clear()
            prep_d[d] = prepare(d, make_inputs(d, gen), cfgs, runs)
        results[(d_out, d)] = measure(d_out, d, prep_d[d], cfgs, gen, runs)

    head = ["stage"] + [f"{a}x{b}" for a, b in shapes]
    rows = []
    for route in ("reference", "gptq", "lrgptq"):
        for stage in ("accumulate", "factor", "engine", "end_to_end"):
            label = f"{route}: {stage.replace('_', ' ')}" + (" (factor + engine)" if stage == "end_to_end" else "")
            rows.append([label] + [common.fmt_s(getattr(results[s]["cells"][route], stage)) for s in shapes])
    for name in ("gptq", "lrgptq"):
        dt = results[shapes[0]]["other_dtype"][name][0]
        rows.append([f"{name}: factor in {dtype_name(dt)}"]
                    + [common.fmt_s(results[s]["other_dtype"][name][1]) for s in shapes])

    def ratio(label: str, num: Callable[[Dict], float], den: Callable[[Dict], float]) -> None:
        rows.append([label] + [f"{num(results[s]) / den(results[s]):.2f}x" for s in shapes])

    cell = lambda r, route: r["cells"][route]  # noqa: E731
    ratio("reference / gptq, end to end", lambda r: cell(r, "reference").end_to_end,
          lambda r: cell(r, "gptq").end_to_end)
    ratio("reference / gptq, engine", lambda r: cell(r, "reference").engine, lambda r: cell(r, "gptq").engine)
    ratio("reference / lrgptq, end to end", lambda r: cell(r, "reference").end_to_end,
          lambda r: cell(r, "lrgptq").end_to_end)
    ratio("lrgptq / gptq, end to end", lambda r: cell(r, "lrgptq").end_to_end, lambda r: cell(r, "gptq").end_to_end)
    ratio("svdqr / cholesky, factor", lambda r: cell(r, "lrgptq").factor, lambda r: cell(r, "gptq").factor)
    kinds = f"{cfgs['lrgptq'].accumulator} / {cfgs['gptq'].accumulator}"
    ratio(f"lrgptq / gptq, accumulate ({kinds})", lambda r: cell(r, "lrgptq").accumulate,
          lambda r: cell(r, "gptq").accumulate)
    ratio("lrgptq / gptq, layer loss", lambda r: r["losses"]["lrgptq"], lambda r: r["losses"]["gptq"])
    common.table(head, rows)
    print()
    dts = results[shapes[0]]["factor_dtype"]
    print("Accumulate and factor depend on d only: timed once per d (the same time in each column of that d). "
          f"Factor dtype (the configs' defaults): gptq {dtype_name(dts['gptq'])}, lrgptq {dtype_name(dts['lrgptq'])}. "
          f"Median of {1 if args.quick else args.runs} runs at the model's shapes, 1 run at the large ones; "
          "one untimed warm-up of every path at 64x256.")
    common.footer()


if __name__ == "__main__":
    main()
