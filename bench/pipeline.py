"""Where `quantize_model`'s time goes on the packaged model (issue 13): one run under cProfile.

Prints, for SmolLM2-135M and one method: the wall time of `quantize_model`; the time of one plain
forward pass of the same calibration tokens through the model (the same batches, no hooks); the
time inside the ops of each stage (accumulate, factor, quantize: the wrappers of lrgptq.ops, so
what the C++ core spends); the number of block calls per batch and block (capture passes, cut
short or not, plus the pass that makes the next block's inputs; a batch is up to 4096 tokens of
windows in one forward, `calibration_batches`); and the profile's top lines.

    python bench/pipeline.py --method gptq --bits 3 --nsamples 16
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from common import load, machine

import lrgptq
from lrgptq import ops
from lrgptq.calib import calibration_batches, text_windows
from lrgptq.demo.data import CALIB_BOOK, austen_books, load_demo_model
from lrgptq.models import find_blocks

STAGES = {
    "accumulate": ("gram_update", "qr_update", "sketch_update"),
    "factor": ("factor",),
    "quantize": ("gptq_quantize", "vq_quantize"),
}


def stage_seconds(stats: pstats.Stats) -> dict:
    """Cumulative seconds inside the lrgptq.ops wrappers of each stage."""
    out = {stage: 0.0 for stage in STAGES}
    for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if not path.endswith("ops.py") or "lrgptq" not in path:
            continue
        for stage, names in STAGES.items():
            if func in names:
                out[stage] += ct
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=15, help="profile lines to print")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_demo_model()
    calib = text_windows(austen_books()[CALIB_BOOK], tok, args.nsamples, args.seqlen, 0)
    batches = calibration_batches(calib)
    print(f"#### quantize_model on SmolLM2-135M: {args.method}, {args.bits}-bit g128, "
          f"{args.nsamples}x{args.seqlen} calibration tokens")
    print(f"- {machine()}; load average at start: {load()}")

    t0 = time.perf_counter()
    for b in batches:
        model(b)
    forward = time.perf_counter() - t0

    _, blocks = find_blocks(model)
    calls = [0]
    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
    cfg = lrgptq.QuantConfig.for_method(args.method, bits=args.bits, group_size=128)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    lrgptq.quantize_model(model, calib, cfg, progress=False)
    prof.disable()
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()

    stats = pstats.Stats(prof)
    st = stage_seconds(stats)
    core = sum(st.values())
    print()
    print("| quantize_model wall | one forward pass of the calibration tokens | accumulate | factor | quantize | "
          "rest (forward passes, hooks, Python) | batches (windows) | block calls per block and batch | "
          "wall / (forward + ops) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {wall:.1f} s | {forward:.1f} s | {st['accumulate']:.1f} s | {st['factor']:.1f} s | "
          f"{st['quantize']:.1f} s | {wall - core:.1f} s | {len(batches)} ({args.nsamples}) | {calls[0] / (len(blocks) * len(batches)):.2f} | "
          f"{wall / (forward + core):.2f} |")
    print(f"\n- load average at end: {load()}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print("\nProfile, top lines by own time (cProfile):\n\n```")
    print("\n".join(lines[start:]))
    print("```")


if __name__ == "__main__":
    main()
