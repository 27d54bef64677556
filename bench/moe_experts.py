"""Per-expert token counts and the settings each expert got, on the tiny Qwen3-MoE of
tests/tiny_models.py with a router that starves experts 6 and 7 (never chosen) and gives expert 5
only the first 3 tokens of each forward pass: the figure for docs/moe.md.

    PYTHONPATH=python python bench/moe_experts.py [--route cholesky]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import lrgptq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import MOE_ARCHS, VOCAB, starve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--route", default="cholesky", help="QuantConfig route (cholesky: GPTQ)")
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = starve(MOE_ARCHS["qwen3_moe"]().eval())
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = lrgptq.QuantConfig(bits=4, group_size=32, route=args.route, accumulator="gram", order="act")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lrgptq.quantize_model(model, ids, cfg, progress=False)
    print(f"calibration: {tuple(ids.shape)} token ids; {cfg.route}, {cfg.bits} bits, g{cfg.group_size}, damp {cfg.damp}")
    print("| expert matrix | d | tokens | route | damp λ | rank | loss | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report.layers:
        if f"layers.{args.layer}.mlp.experts." not in r["name"]:
            continue
        lam = r.get("damp_lambda")
        print(f"| {r['name'].split('mlp.')[1]} | {r['d']} | {r['tokens']} | {r['route']} | "
              f"{'-' if lam is None else f'{lam:.3g}'} | {r['rank']} | {r['loss']:.3g} | {r.get('note', '')} |")
    for w in caught:
        print(f"warning: {w.message}")


if __name__ == "__main__":
    main()
