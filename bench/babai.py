"""Issue 5A on the real model: scalar GPTQ, the lrgptq route, Babai's order, the noclip grid and
block LDLQ (D = 2, 4, 8) at ≈2.125, ≈2.25 and ≈3.125 bits per weight, with clipping rates,
Babai-bound slack and time per layer. Runs each setting as bench/quality.py does (one fresh
process per run, calibration on Emma, perplexity on Persuasion).

    python bench/babai.py                                 # the table of docs/benchmarks.md
    python bench/babai.py --settings 3:128 --methods gptq ldlq4 --nsamples 4 --max-windows 4   # smoke
"""

from __future__ import annotations

import argparse
import time

from quality import METHODS, run_one

# (bits, group size): 2 + 18/128 ≈ 2.14, 2 + 18/64 ≈ 2.28, 3 + 19/128 ≈ 3.15 bits per weight
# (codes + fp16 scale + packed zero per group and row; the int32 g_idx adds ≈ 0.1 on this model).
SETTINGS = ["2:128", "3:128", "2:64"]
DEFAULT_METHODS = ["gptq", "lrgptq", "babai", "gptq-noclip", "ldlq2", "ldlq4", "ldlq8"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="bits:group_size")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    p.add_argument("--sym", action="store_true")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--fp32-ppl", type=float, help="the fp32 perplexity, if measured already (skips that run)")
    args = p.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; SmolLM2-135M; calib {args.nsamples}x"
          f"{args.seqlen} tokens of Emma; ppl on Persuasion, {args.max_windows} windows of {args.window}; "
          f"{'sym' if args.sym else 'asym'}")
    args.group_size = 128
    fp = args.fp32_ppl if args.fp32_ppl else run_one(args, "fp32", 16, args.sym, args.nsamples)["ppl"]
    print(f"fp32 perplexity {fp:.3f}\n")
    print("| bits | group | bits/weight (with g_idx) | method | ppl | Δppl / Δgptq | clipped (all layers) | "
          "clipped (worst layer) | noclip passes (max) | slack median | slack max | s / layer | time / gptq |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        bits, group = (int(x) for x in setting.split(":"))
        args.group_size = group
        base = None
        for m in args.methods:
            r = run_one(args, m, bits, args.sym, args.nsamples)
            base = r if m == "gptq" else base
            rel = (r["ppl"] - fp) / (base["ppl"] - fp) if base else float("nan")
            tr = r["seconds"] / base["seconds"] if base else float("nan")
            print(f"| {bits} | {group} | {r['bpw_no_gidx']:.3f} ({r['bpw']:.3f}) | {m} | {r['ppl']:.3f} | {rel:.2f} "
                  f"| {100 * r['clip_rate']:.3f}% | {100 * r['clip_max']:.3f}% | {r['passes_max']} "
                  f"| {r['slack_median']:.3f} | {r['slack_max']:.3f} | {r['layer_seconds']:.2f} | {tr:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
