"""CPU quantized matmul (lrgptq.ops.qmatmul, GPTQ layout) vs float32 F.linear, and
checkpoint sizes vs float16.

Decode is memory bound: a layer's weights stream from DRAM once per token. To measure that and
not the cache, each timed pass cycles through distinct copies of the layer whose total exceeds
--cold-mib (default: twice the L3 that lscpu reports, at least 1 GiB); "warm" repeats one copy.
GB/s is the layer's bytes (fp32 weight; qweight + qzeros + scales + g_idx) over the time of one
call, set against the machine's copy bandwidth (a large tensor copy: bytes read + written).

    python bench/qmatmul.py                   # all threads, then 1 thread
    python bench/qmatmul.py --sizes-only      # checkpoint sizes and the demo model only

OMP_WAIT_POLICY defaults to PASSIVE here: on a machine shared with other jobs, OpenMP workers
that spin while waiting steal the CPU from the ones working (measured: 2 threads 20x slower).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see the docstring

import argparse
import math
import re
import subprocess
import sys
import tempfile
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_s, footer, header, median, table, time_it  # noqa: E402

import lrgptq  # noqa: E402
from lrgptq import ops  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]  # (out_features, in_features)
BATCHES = [1, 16]
BITS, GROUP = 4, 128


def l3_bytes() -> int:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"L3 cache:\s+([\d.]+)\s*(KiB|MiB|GiB)", out)
        if m:
            return int(float(m.group(1)) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)])
    except OSError:
        pass
    return 32 * 2**20


def copy_bandwidth(nbytes: int) -> float:
    """GB/s of a tensor copy (bytes read + bytes written)."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    t = median(time_it(lambda: b.copy_(a), runs=5))
    return 2 * nbytes / t / 1e9


def quant_layer(d_out: int, d: int) -> Tuple[torch.Tensor, ...]:
    """Random packed tensors of a 4-bit g128 layer (random words are valid codes)."""
    G = math.ceil(d / GROUP)
    qweight = torch.randint(-(2**31), 2**31, (d * BITS // 32, d_out), dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31, (G, d_out * BITS // 32), dtype=torch.int32)
    scales = (torch.rand(G, d_out) * 0.01).half()
    g_idx = (torch.arange(d) // GROUP).to(torch.int32)
    return qweight, qzeros, scales, g_idx


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def per_call(fn, inputs: Sequence, runs: int) -> float:
    """Median over `runs` passes of (time of one pass over all inputs) / len(inputs)."""
    return median(time_it(lambda: [fn(i) for i in inputs], runs=runs)) / len(inputs)


def matmul_rows(cold: int, runs: int, copy_gbs: float) -> List[list]:
    rows = []
    for d_out, d in SHAPES:
        w_bytes = d_out * d * 4
        Ws = [torch.randn(d_out, d) for _ in range(max(1, math.ceil(cold / w_bytes)))]
        layers = [quant_layer(d_out, d) for _ in range(max(1, math.ceil(cold / nbytes(*quant_layer(d_out, d)))))]
        q_bytes = nbytes(*layers[0])
        for M in BATCHES:
            x = torch.randn(M, d)
            t_f = per_call(lambda W: F.linear(x, W), Ws, runs)
            t_q = per_call(lambda L: ops.qmatmul(x, *L, BITS, 1, None), layers, runs)
            t_fw = per_call(lambda W: F.linear(x, W), Ws[:1] * 8, runs)
            t_qw = per_call(lambda L: ops.qmatmul(x, *L, BITS, 1, None), layers[:1] * 8, runs)
            gb_f, gb_q = w_bytes / t_f / 1e9, q_bytes / t_q / 1e9
            rows.append([
                f"{d_out}x{d}", M,
                fmt_s(t_f), f"{M / t_f:,.0f}", f"{gb_f:.1f}",
                fmt_s(t_q), f"{M / t_q:,.0f}", f"{gb_q:.1f} ({100 * gb_q / copy_gbs:.0f}%)",
                f"{t_f / t_q:.2f}x",
                f"{fmt_s(t_fw)} / {fmt_s(t_qw)}",
            ])
        del Ws, layers
    return rows


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def size_row(label: str, model, report, tmp: str) -> list:
    lrgptq.save(model, report, os.path.join(tmp, "q"))
    q = dir_bytes(os.path.join(tmp, "q"))
    model.half().save_pretrained(os.path.join(tmp, "fp16"))
    model.float()
    f = dir_bytes(os.path.join(tmp, "fp16"))
    n_q = sum(r.codes.numel() for r in report.results.values())
    n_all = sum(p.numel() for p in model.parameters())
    return [label, f"{n_q / n_all:.0%}", f"{f / 2**20:.1f} MiB", f"{q / 2**20:.1f} MiB", f"{f / q:.2f}x"]


def tiny_size_row() -> list:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    report = lrgptq.quantize_model(model, torch.zeros(1, 8, dtype=torch.long),
                                   lrgptq.QuantConfig(bits=BITS, group_size=GROUP, route="rtn"), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        return size_row("tiny Llama (random, 2 layers, hidden 256)", model, report, tmp)


def demo_section(nsamples: int, window: int, windows: int) -> Tuple[list, List[list]]:
    """The demo model quantized (GPTQ, act-order), saved, loaded back with QuantLinear: size,
    perplexity in memory vs from the checkpoint, forward times."""
    from lrgptq.calib import text_windows
    from lrgptq.demo import CALIB_BOOK, EVAL_BOOK, austen_books, load_demo_model

    books = austen_books()
    model, tok = load_demo_model()
    eval_ids = tok(books[EVAL_BOOK], return_tensors="pt")["input_ids"]
    calib = text_windows(books[CALIB_BOOK], tok, nsamples, window, 0)
    one = eval_ids[:, :1]

    def fwd_time(m, ids):
        with torch.no_grad():
            return median(time_it(lambda: m(ids), runs=5))

    rows = [["fp32", f"{lrgptq.perplexity(model, eval_ids, window, windows):.3f}",
             fmt_s(fwd_time(model, one)), fmt_s(fwd_time(model, eval_ids[:, :window]))]]
    cfg = lrgptq.QuantConfig.for_method("gptq", bits=BITS, group_size=GROUP, order="act")
    report = lrgptq.quantize_model(model, calib, cfg, progress=False)
    rows.append([f"GPTQ {BITS}-bit g{GROUP} act-order, in memory (float weights)",
                 f"{lrgptq.perplexity(model, eval_ids, window, windows):.3f}",
                 fmt_s(fwd_time(model, one)), fmt_s(fwd_time(model, eval_ids[:, :window]))])
    with tempfile.TemporaryDirectory() as tmp:
        size = size_row("SmolLM2-135M (demo model, GPTQ act-order)", model, report, tmp)
        loaded = lrgptq.load(os.path.join(tmp, "q"), dtype=torch.float32)
    rows.append(["same, saved (float16 checkpoint) and loaded: QuantLinear + qmatmul",
                 f"{lrgptq.perplexity(loaded, eval_ids, window, windows):.3f}",
                 fmt_s(fwd_time(loaded, one)), fmt_s(fwd_time(loaded, eval_ids[:, :window]))])
    return size, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default: all, then 1)")
    ap.add_argument("--cold-mib", type=int, default=None, help="working set per timed pass (default 2x L3, >= 1 GiB)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes-only", action="store_true", help="skip the matmul timings")
    ap.add_argument("--nsamples", type=int, default=16, help="demo model: calibration windows")
    ap.add_argument("--window", type=int, default=512, help="demo model: tokens per window")
    ap.add_argument("--windows", type=int, default=8, help="demo model: perplexity windows")
    args = ap.parse_args()
    cold = (args.cold_mib * 2**20) if args.cold_mib else max(2 * l3_bytes(), 2**30)
    threads = args.threads or sorted({os.cpu_count() or 1, 1}, reverse=True)
    torch.manual_seed(0)
    header(f"CPU quantized matmul ({BITS}-bit g{GROUP}, GPTQ layout) vs float32 F.linear; checkpoint sizes")
    if not args.sizes_only:
        print(f"- cold working set per timed pass: {cold / 2**20:.0f} MiB (L3: {l3_bytes() / 2**20:.0f} MiB); "
              f"median of {args.runs} passes; tokens/s = batch / time of one layer call; "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        for n in threads:
            torch.set_num_threads(n)
            copy_gbs = copy_bandwidth(max(cold // 2, 2**28))
            print(f"\n## {n} thread(s); copy bandwidth {copy_gbs:.1f} GB/s (read + write of a "
                  f"{max(cold // 2, 2**28) / 2**20:.0f} MiB tensor)\n")
            table(["layer (out x in)", "batch", "fp32 time", "fp32 tok/s", "fp32 GB/s", "q4 time", "q4 tok/s",
                   "q4 GB/s (% of copy)", "q4 speed-up", "warm fp32 / q4"],
                  matmul_rows(cold, args.runs, copy_gbs))
    sizes = [tiny_size_row()]
    demo = None
    try:
        size, demo = demo_section(args.nsamples, args.window, args.windows)
        sizes.append(size)
    except Exception as err:  # noqa: BLE001  (the demo model is optional here)
        print(f"\n- demo model not measured ({type(err).__name__}: {err})")
    print(f"\n## Checkpoint size ({BITS}-bit g{GROUP}, float16 scales and unquantized tensors) vs float16\n")
    table(["model", "params quantized", "float16", f"lrgptq {BITS}-bit", "ratio"], sizes)
    if demo is not None:
        print(f"\n## Demo model through a checkpoint: perplexity on Persuasion ({args.windows} windows of "
              f"{args.window} tokens), calibration {args.nsamples}x{args.window} tokens of Emma; "
              f"{torch.get_num_threads()} thread(s)\n")
        table(["model", "perplexity", "forward, 1 token", f"forward, {args.window} tokens"], demo)
    footer()


if __name__ == "__main__":
    main()
