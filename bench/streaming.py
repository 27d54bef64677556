"""Peak memory of the streamed pipeline against the in-memory one, and 2 processes against 1.

Every run is a fresh subprocess (or a torchrun group), so its peak RSS (VmHWM) is its own. The
baseline is the process after importing torch/transformers/lrgptq and building the calibration
batches; "growth" = peak − baseline.

    python bench/streaming.py rss --model smollm2 --modes memory stream
    python bench/streaming.py make-llama /tmp/llama-shapes --layers 10   # random weights, bf16
    python bench/streaming.py rss --model /tmp/llama-shapes --modes stream --nsamples 8 --seqlen 256
    python bench/streaming.py procs --model smollm2 --modes stream       # 1 process vs 2 (torchrun)
    python bench/streaming.py procs --modes stream --worlds 1x1 2x1 --flat --repeat 2   # + true_sequential=False
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = r"""
import json, os, sys, time, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
import transformers, lrgptq
from lrgptq import streaming
from lrgptq.distributed import Comm, Distributed

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

comm = Comm()
if a["world"] > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    comm = Distributed()
if a["model"] == "smollm2":
    from lrgptq.calib import text_windows
    from lrgptq.demo import CALIB_BOOK, austen_books, cache_dir, load_demo_model
    src = os.path.join(cache_dir(), "smollm2-135m")
    if not os.path.isdir(src):
        load_demo_model()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    calib = text_windows(austen_books()[CALIB_BOOK], tok, a["nsamples"], a["seqlen"], 0)
else:
    src = a["model"]
    vocab = transformers.AutoConfig.from_pretrained(src).vocab_size
    calib = torch.randint(0, vocab, (a["nsamples"], a["seqlen"]), generator=torch.Generator().manual_seed(0))
cfg = lrgptq.QuantConfig.for_method(a["method"], bits=4, group_size=128)
base = hwm()
t0 = time.perf_counter()
if a["mode"] == "stream":
    streaming.quantize_streamed(src, calib, a["out"], cfg, progress=False, comm=comm, spill=a["spill"],
                                true_sequential=a["seq"])
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    report = lrgptq.quantize_model(model, calib, cfg, progress=False, comm=comm, true_sequential=a["seq"])
    if comm.is_writer:
        lrgptq.save(model, report, a["out"])
seconds = time.perf_counter() - t0
if comm.is_writer:
    print("RESULT " + json.dumps({"base": base, "peak": hwm(), "seconds": seconds}), flush=True)
"""


def model_bytes(src: str) -> tuple:
    """(float32 bytes of the parameters, bytes of the safetensors files)."""
    import math

    from safetensors import safe_open

    files = sorted(Path(src).glob("*.safetensors"))
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return 4 * n, sum(f.stat().st_size for f in files)


def resolve(model: str) -> str:
    if model != "smollm2":
        return model
    from lrgptq.demo import cache_dir

    return os.path.join(cache_dir(), "smollm2-135m")


def run(args: argparse.Namespace, mode: str, world: int, threads: int, seq: bool = True) -> dict:
    out = tempfile.mkdtemp(prefix="lrgptq-bench-", dir=args.tmp)
    shutil.rmtree(out)
    job = {"model": args.model, "mode": mode, "world": world, "threads": threads, "method": args.method,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "out": out, "spill": args.spill, "seq": seq}
    script = Path(out + ".py")
    script.write_text(JOB)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(args.port), str(script), json.dumps(job)]
    else:
        cmd = [sys.executable, str(script), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    script.unlink()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def cmd_rss(args: argparse.Namespace) -> None:
    fp32, on_disk = model_bytes(resolve(args.model))
    mib = 2**20
    print(f"model {args.model}: {fp32 / mib:.0f} MiB of float32 parameters, {on_disk / mib:.0f} MiB on disk; "
          f"method {args.method}, {args.nsamples} x {args.seqlen} calibration tokens, {args.threads} threads")
    print("| pipeline | peak RSS (MiB) | baseline (MiB) | growth (MiB) | growth / float32 model | seconds |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        r = run(args, mode, 1, args.threads)
        growth = r["peak"] - r["base"]
        print(f"| {mode}{' + spill' if args.spill and mode == 'stream' else ''} | {r['peak'] / mib:.0f} | "
              f"{r['base'] / mib:.0f} | {growth / mib:.0f} | {growth / fp32:.2f} | {r['seconds']:.1f} |", flush=True)


def cmd_procs(args: argparse.Namespace) -> None:
    """Each configuration in turn, ``--repeat`` times; the speed-up is against the first
    configuration of the same repeat, pipeline and true_sequential (``uptime`` before each row)."""
    worlds = [tuple(int(x) for x in w.split("x")) for w in args.worlds]
    print(f"model {args.model}, method {args.method}, {args.nsamples} x {args.seqlen} calibration tokens")
    print(f"| repeat | pipeline | true_sequential | processes x threads | seconds | speed-up vs {args.worlds[0]} | "
          "load average before (1, 5, 15 min) |")
    print("|---|---|---|---|---|---|---|")
    for rep in range(1, args.repeat + 1):
        for mode in args.modes:
            for seq in (True, False) if args.flat else (True,):
                ref = None
                for world, threads in worlds:
                    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                    r = run(args, mode, world, threads, seq)
                    ref = ref if ref is not None else r["seconds"]
                    print(f"| {rep} | {mode} | {seq} | {world} x {threads} | {r['seconds']:.1f} | "
                          f"{ref / r['seconds']:.2f} | {load} |", flush=True)


def cmd_make_llama(args: argparse.Namespace) -> None:
    """A model of Llama shapes (TinyLlama-1.1B's by default) with random weights, saved in bf16."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.ff,
                                   num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                                   max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(args.out, max_shard_size="1GB")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.0f} M parameters ({args.layers} blocks of hidden {args.hidden}, ff {args.ff})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("rss", cmd_rss), ("procs", cmd_procs)):
        q = sub.add_parser(name)
        q.add_argument("--model", default="smollm2", help="'smollm2' (the cached real model) or a model directory")
        q.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
        q.add_argument("--method", default="gptq")
        q.add_argument("--nsamples", type=int, default=16)
        q.add_argument("--seqlen", type=int, default=512)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--spill", action="store_true")
        q.add_argument("--port", type=int, default=29581)
        q.add_argument("--worlds", nargs="+", default=["1x2", "1x1", "2x1"],
                       help="procs: processes x threads of each configuration, the first the reference")
        q.add_argument("--flat", action="store_true",
                       help="procs: also with true_sequential=False (a block's 7 factors in one subset)")
        q.add_argument("--repeat", type=int, default=1, help="procs: run every configuration this many times")
        q.add_argument("--tmp", default=tempfile.gettempdir())
        q.set_defaults(func=fn)
    m = sub.add_parser("make-llama")
    m.add_argument("out")
    m.add_argument("--layers", type=int, default=10)
    m.add_argument("--hidden", type=int, default=2048)
    m.add_argument("--ff", type=int, default=5632)
    m.set_defaults(func=cmd_make_llama)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
