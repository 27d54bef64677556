"""Quantize one linear layer with each route and compare ‖(W − Q)Xᵀ‖² (runs in seconds on a CPU).

    python examples/quantize_layer.py
"""

import torch

import lrgptq


def main() -> None:
    torch.manual_seed(0)
    d_out, d, n = 256, 512, 2048
    # Inputs with a decaying spectrum and a few outlier channels, as real activations have.
    X = torch.randn(n, d) @ torch.diag(torch.logspace(0, -3, d)) @ torch.linalg.qr(torch.randn(d, d))[0]
    X[:, :4] *= 30
    W = torch.randn(d_out, d) / d**0.5
    for method in ("rtn", "gptq", "lrgptq"):
        cfg = lrgptq.QuantConfig.for_method(method, bits=3, group_size=128)
        res = lrgptq.quantize_linear(W, X, cfg, name=f"demo.{method}")
        err = float(((W - res.weight) @ X.T).square().sum())
        print(f"{method:>7}: ‖(W − Q)Xᵀ‖² = {err:10.4g}   rank {res.rank:4d}   {res.report.get('damp_lambda', 0):.3g} damping")


if __name__ == "__main__":
    main()
