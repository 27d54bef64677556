"""Does the factor need float64? The layer loss with a float32 factor over the loss with a float64 one.

For each route's preset (gptq: gram + cholesky, identity order; lrgptq: qr + svdqr, pivot order, rel
τ = 1e-4; both damp 0.01), on the same accumulator: factor in float64 and in float32, the same engine
(float32, group size 128, asymmetric) at 3 and 4 bits, and the true layer loss ‖(W − Q)Xᵀ‖²_F in float64
on the calibration inputs X. Layers: real ones of the packaged model (SmolLM2-135M: q_proj and down_proj
of blocks 0, 10, 20, 29, inputs from 32 windows of 256 tokens of Emma) and synthetic ill-conditioned
ones (d = 512, N = 2d, X = A diag(s) B with s log-spaced from 1 to 1/κ, κ = 1e2 .. 1e8, and one with two
channels ×100). Also ‖U₃₂ − U₆₄‖_F/‖U₆₄‖_F. A ratio of 1.000 means float32 loses nothing that matters.

    python bench/factor_dtype.py            # the table of docs/benchmarks.md
    python bench/factor_dtype.py --quick    # synthetic layers only
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, Iterator, List, Tuple

import torch

import common

import lrgptq
from lrgptq.linear import make_accumulator

F32, F64 = torch.float32, torch.float64
BLOCKS = (0, 10, 20, 29)


def real_layers(n_windows: int = 32, length: int = 256) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, W, X) for q_proj and down_proj of BLOCKS, X captured in one forward pass."""
    from lrgptq.calib import text_windows
    from lrgptq.demo.data import austen_books, load_demo_model

    model, tok = load_demo_model()
    ids = text_windows(austen_books()["emma"], tok, n_windows, length, seed=0)
    layers = {f"{b}.{name}": getattr(getattr(model.model.layers[b], part), name)
              for b in BLOCKS for part, name in (("self_attn", "q_proj"), ("mlp", "down_proj"))}
    caught: Dict[str, List[torch.Tensor]] = {k: [] for k in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: caught[k].append(args[0].detach().reshape(
        -1, args[0].shape[-1]).clone())) for k, m in layers.items()]
    with torch.no_grad():
        for i in range(0, n_windows, 8):
            model(ids[i:i + 8])
    for h in hooks:
        h.remove()
    for k, m in layers.items():
        yield k, m.weight.detach().clone(), torch.cat(caught[k])


def synthetic_layers(gen: torch.Generator, d: int = 512) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    for kappa in (1e2, 1e4, 1e6, 1e8):
        A = torch.linalg.qr(torch.randn(2 * d, d, generator=gen, dtype=F64)).Q
        B = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64)).Q
        s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), d, dtype=F64)
        yield f"synthetic κ(X)={kappa:.0e}", 0.02 * torch.randn(256, d, generator=gen), ((A * s) @ B).float()
    X = torch.randn(2 * d, d, generator=gen)
    X[:, [3, 100]] *= 100
    yield "synthetic, 2 outlier channels", 0.02 * torch.randn(256, d, generator=gen), X


def layer_loss(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W.double() - Q.double()) @ X.double().T).square().sum())


def compare(W: torch.Tensor, X: torch.Tensor, method: str, bits: int) -> Tuple[float, float]:
    """(loss ratio float32 / float64 factor, relative difference of the two U)."""
    cfg = common.route_config(method, bits=bits, group_size=128)
    acc = make_accumulator(cfg, X.shape[1])
    for i in range(0, X.shape[0], 2048):
        acc.add(X[i:i + 2048])
    out = {}
    for dt in (F64, F32):
        c = dataclasses.replace(cfg, factor_dtype=dt)
        f = lrgptq.factorize(acc, c)
        out[dt] = (layer_loss(W, lrgptq.quantize_linear(W, f, c).weight, X), f.U.double())
    dU = float((out[F32][1] - out[F64][1]).norm() / out[F64][1].norm())
    return out[F32][0] / out[F64][0], dU


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="synthetic layers only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    common.setup(args.threads)
    gen = torch.Generator().manual_seed(0)
    common.header("Factor dtype: layer loss with a float32 factor / with a float64 factor")
    layers = list(synthetic_layers(gen)) + ([] if args.quick else list(real_layers()))
    rows, worst = [], {}
    for name, W, X in layers:
        row = [name, f"{W.shape[0]}x{W.shape[1]}"]
        for method in ("gptq", "lrgptq"):
            for bits in (3, 4):
                r, dU = compare(W, X, method, bits)
                row.append(f"{r:.4f} ({dU:.0e})")
                key = (method, "real" if name[0].isdigit() else "synthetic")
                worst[key] = max(worst.get(key, 1.0), r)
        rows.append(row)
    common.table(["layer", "W", "gptq 3 bits", "gptq 4 bits", "lrgptq 3 bits", "lrgptq 4 bits"], rows)
    print()
    print("Cells: loss(float32 factor) / loss(float64 factor), and (‖U₃₂ − U₆₄‖_F/‖U₆₄‖_F).")
    print("Largest ratio: " + ", ".join(f"{m} {k} {v:.4f}" for (m, k), v in sorted(worst.items())))
    common.footer()


if __name__ == "__main__":
    main()
