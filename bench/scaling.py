"""Planning on paper (docs/scaling.md): memory and time per block for large models, from the
model shapes and per-layer rates. Prints the tables; no model is loaded.

    python bench/scaling.py

Rates. "cpu" = measured on this project's 2-vCPU box (docs/benchmarks.md, issue 2): the engine at
11008x4096 (1.75 s for 178.9 lazy GFLOP), the cholesky route at d = 4096 (1.53 s), svdqr pivot at
d = 4096 (16.55 s), the gram accumulator at d = 4096 (4,723 tokens/s) and sgemm (266 GFLOP/s).
"h100" = NOT measured: the CPU efficiencies (engine / GEMM floor, factor / d^3) carried over to
assumed H100 rates (dense bf16 GEMM 600 TFLOP/s for forward passes, tf32 300 TFLOP/s for the
engine's float32 lazy updates, fp64 40 TFLOP/s for H and the factor). Treat them as a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

GB = 1e9


@dataclass
class Rates:
    gemm: float  # FLOP/s of the forward passes
    engine: float  # FLOP/s of the engine's lazy updates (2 d_out d^2), efficiency included
    gram: float  # FLOP/s of H += XᵀX (2 N d^2), float64
    chol_c: float  # seconds per d^3 of the cholesky route
    svdqr_c: float  # seconds per d^3 of svdqr pivot


CPU = Rates(gemm=266e9, engine=178.9e9 / 1.75, gram=2 * 4723 * 4096**2, chol_c=1.53 / 4096**3,
            svdqr_c=16.55 / 4096**3)
_CPU_GEMM = 266e9
H100 = Rates(gemm=600e12, engine=300e12 * CPU.engine / _CPU_GEMM, gram=40e12 * CPU.gram / _CPU_GEMM,
             chol_c=CPU.chol_c * _CPU_GEMM / 40e12, svdqr_c=CPU.svdqr_c * _CPU_GEMM / 40e12)


@dataclass
class Model:
    name: str
    hidden: int
    layers: int
    # one block's subsets: (name, d, [d_out of each layer reading it], copies): copies = experts
    subsets: List[Tuple[str, int, List[int], int]]
    outside: float  # parameters outside the blocks


def llama3_70b() -> Model:
    h, ff, kv = 8192, 28672, 1024
    return Model("Llama-3-70B", h, 80, [("qkv", h, [h, kv, kv], 1), ("o", h, [h], 1),
                                        ("gate/up", h, [ff, ff], 1), ("down", ff, [h], 1)], 2 * 128256 * h)


def moe_400b() -> Model:
    """A Llama-4-Maverick-like MoE (its published config as recalled here: hidden 5120, 48 layers,
    every other one MoE with 128 routed experts of ff 8192 + a shared expert, dense ff 16384,
    40 query / 8 kv heads of 128, vocab 202048): about 400 B parameters, 17 B active."""
    h, ff, e, kv = 5120, 8192, 128, 1024
    return Model("400B MoE (MoE block)", h, 24, [
        ("qkv", h, [40 * 128, kv, kv], 1), ("o", 40 * 128, [h], 1),
        ("expert gate/up", h, [ff, ff], e + 1), ("expert down", ff, [h], e + 1)], 2 * 202048 * h)


def moe_400b_dense() -> Model:
    """The dense blocks of the same model (every other block): a 16384-wide MLP."""
    h, ff, kv = 5120, 16384, 1024
    return Model("400B MoE (dense block)", h, 24, [
        ("qkv", h, [40 * 128, kv, kv], 1), ("o", 40 * 128, [h], 1),
        ("gate/up", h, [ff, ff], 1), ("down", ff, [h], 1)], 2 * 202048 * h)


def per_block(m: Model, tokens: int, route: str, r: Rates, gpus: int) -> Dict[str, float]:
    """Bytes and seconds of one block on each of ``gpus`` ranks (tokens and rows split evenly)."""
    params = sum(d * sum(outs) * c for _, d, outs, c in m.subsets)
    n = tokens / gpus  # calibration tokens on this rank
    # A routed expert sees about tokens x top_k / experts tokens (top-1 of 128 here).
    n_of = {name: (n / (c - 1) if c > 1 else n) for name, _, _, c in m.subsets}
    acc_bytes = max(8 * d * d for _, d, _, _ in m.subsets)  # one H alive at a time (true_sequential)
    factor_bytes = 5 * acc_bytes  # the factor op's peak: 5 d x d float64 (VmHWM rise at d = 5632 here)
    act_bytes = 2 * 4 * n * m.hidden  # inputs and outputs of the block, float32
    t_acc = sum(2 * n_of[s] * d * d * c / r.gram for s, d, _, c in m.subsets)
    c_f = r.chol_c if route == "cholesky" else r.svdqr_c
    # The factors of one subset are dealt out over the ranks (linear.factor_owners): equal-d layers
    # (the experts of a block) take ceil(c / gpus) factor times; a subset of one layer takes one.
    t_factor = sum(c_f * d**3 * math.ceil(c / gpus) for _, d, _, c in m.subsets)
    t_engine = sum(2 * (sum(outs) / gpus) * d * d * c / r.engine for _, d, outs, c in m.subsets)
    # One (partial) pass per subset to capture its inputs (each expert is a subset), one for the
    # next block's inputs.
    passes = sum(c for _, _, _, c in m.subsets) + 1
    active = sum(d * sum(outs) * (1 if c == 1 else 2) for _, d, outs, c in m.subsets)  # shared + 1 routed
    t_fwd = passes * 2 * active * n / r.gemm
    return {"weights_gb": 4 * params / GB, "acc_gb": acc_bytes / GB, "factor_gb": factor_bytes / GB,
            "act_gb": act_bytes / GB, "t_acc": t_acc, "t_factor": t_factor, "t_engine": t_engine,
            "t_fwd": t_fwd, "params": params}


def main() -> None:
    tokens = 128 * 2048
    print(f"Calibration: 128 x 2048 = {tokens} tokens; 4 bits; float32 block upcast; H float64.\n")
    for m in (llama3_70b(), moe_400b(), moe_400b_dense()):
        for route in ("cholesky", "svdqr") if m.layers == 80 else ("cholesky",):
            print(f"### {m.name}, route {route} ({m.layers} such blocks)\n")
            print("| machine | ranks | block fp32 (GB) | largest H (GB) | factor workspace (GB) | activations/rank (GB)"
                  " | accumulate (s) | factor, spread over ranks (s) | engine (s) | forward passes (s) | block total (s) |"
                  " model (h) |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for mach, r, counts in (("2-vCPU box (measured rates)", CPU, (1,)), ("H100 (assumed rates)", H100,
                                                                                 (1, 8, 64))):
                for g in counts:
                    b = per_block(m, tokens, route, r, g)
                    total = b["t_acc"] + b["t_factor"] + b["t_engine"] + b["t_fwd"]
                    print(f"| {mach} | {g} | {b['weights_gb']:.1f} | {b['acc_gb']:.2f} | {b['factor_gb']:.1f} | "
                          f"{b['act_gb']:.2f} | {b['t_acc']:.3g} | {b['t_factor']:.3g} | {b['t_engine']:.3g} | "
                          f"{b['t_fwd']:.3g} | {total:.3g} | {total * m.layers / 3600:.3g} |")
            print()


if __name__ == "__main__":
    main()
