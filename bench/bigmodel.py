"""A model larger than the memory given to the process, quantized from disk under a memory cap.

``make`` writes a random-weight model of any transformers architecture (Llama shapes by default)
shard by shard: one safetensors file per block, generated, written and freed before the next,
so the whole model is never in memory. ``run`` quantizes it in a child process placed in a cgroup
v1 memory controller with a hard limit (root only; the cgroup is made under this process's own
memory cgroup and removed after), streamed (``lrgptq.quantize_streamed``) or in memory
(``from_pretrained`` + ``quantize_model`` + ``save``), and prints the child's exit status, wall
time, peak RSS (``ru_maxrss``), the cgroup's ``memory.max_usage_in_bytes`` (page cache included)
and failcnt. The cgroup OOM killer ends a child that needs more than the cap: exit status -9.

    python bench/bigmodel.py make /tmp/big --layers 80 --hidden 1024 --ff 2816 --dtype float32
    python bench/bigmodel.py run /tmp/big --cap 1.25G --modes stream memory --nsamples 4 --seqlen 128
    # an MoE (Qwen3-MoE shapes, 128 experts of width 1024, top-8), saved per expert as transformers 5
    # saves it; "mapped" streams with expert_budget (experts mapped from a scratch file, captured in runs)
    python bench/bigmodel.py make /tmp/moe --arch qwen3_moe --layers 2 --hidden 1024 --ff 1024 --experts 128
    python bench/bigmodel.py run /tmp/moe --cap 1.5G --modes mapped stream memory

A bench, never a test: minutes, GBs of disk, and root for the cgroup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

MIB = 2**20
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")

JOB = r"""
import json, os, resource, sys, time, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
import transformers, lrgptq
from lrgptq import streaming

vocab = transformers.AutoConfig.from_pretrained(a["model"]).vocab_size
calib = torch.randint(0, vocab, (a["nsamples"], a["seqlen"]), generator=torch.Generator().manual_seed(0))
cfg = lrgptq.QuantConfig.for_method(a["method"], bits=4, group_size=128)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("BASE " + json.dumps({"base": base}), flush=True)
t0 = time.perf_counter()
if a["mode"] in ("stream", "mapped"):
    budget = a["expert_budget"] if a["mode"] == "mapped" else None
    streaming.quantize_streamed(a["model"], calib, a["out"], cfg, progress=False, expert_budget=budget)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    print("LOADED", flush=True)
    report = lrgptq.quantize_model(model, calib, cfg, progress=False)
    lrgptq.save(model, report, a["out"])
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"base": base, "peak": peak, "seconds": seconds}), flush=True)
"""


def parse_bytes(text: str) -> int:
    """'1.5G', '800M', '123456' -> bytes (binary units)."""
    m = re.fullmatch(r"([0-9.]+)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise SystemExit(f"--cap {text!r}: give bytes, or a number with K, M or G")
    return int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " "))


def _block_of(name: str, block_path: str) -> int:
    """The block index of state-dict key ``name`` (-1: outside the blocks)."""
    if not name.startswith(block_path + "."):
        return -1
    return int(name[len(block_path) + 1:].split(".", 1)[0])


def _random_tensor(name: str, shape: Tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02²) (Llama's init)."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)


def _per_expert(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """The shapes as transformers 5 saves fused experts: ``<experts>.<e>.gate_proj.weight``,
    ``up_proj`` (the two halves of ``gate_up_proj``'s rows) and ``down_proj`` per expert."""
    out: Dict[str, Tuple[int, ...]] = {}
    for k, s in shapes.items():
        path, _, leaf = k.rpartition(".")
        if len(s) == 3 and leaf == "gate_up_proj":
            for e in range(s[0]):
                out.update({f"{path}.{e}.{r}.weight": (s[1] // 2, s[2]) for r in ("gate_proj", "up_proj")})
        elif len(s) == 3 and leaf == "down_proj":
            out.update({f"{path}.{e}.down_proj.weight": tuple(s[1:]) for e in range(s[0])})
        else:
            out[k] = s
    return out


def _shards(shapes: Dict[str, Tuple[int, ...]], block_path: str) -> Iterator[Tuple[str, List[str]]]:
    """(file name, keys) per shard: the tensors outside the blocks, then one file per block."""
    groups: Dict[int, List[str]] = {}
    for k in shapes:
        groups.setdefault(_block_of(k, block_path), []).append(k)
    yield "model-rest.safetensors", groups.pop(-1, [])
    for i in sorted(groups):
        yield f"model-block-{i:05d}.safetensors", groups[i]


def cmd_make(args: argparse.Namespace) -> None:
    """Writes config.json, one safetensors file per block and the index, never holding more than
    one block's tensors."""
    import transformers
    from safetensors.torch import save_file

    from lrgptq.models import find_blocks

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ff,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096, tie_word_embeddings=False)
    elif args.arch == "qwen3_moe":  # every block an MoE of --experts experts of width --ff, top-8
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ff, moe_intermediate_size=args.ff,
            num_experts=args.experts, num_experts_per_tok=8, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), head_dim=64,
            max_position_embeddings=4096, tie_word_embeddings=False)
    else:  # a config.json of another architecture, its layer count set by --layers
        cfg = transformers.AutoConfig.from_pretrained(args.arch)
        cfg.num_hidden_layers = args.layers
    dtype = getattr(torch, args.dtype)
    cfg.dtype = args.dtype
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    block_path, _ = find_blocks(model, None)
    shapes = _per_expert({k: tuple(t.shape) for k, t in model.state_dict().items()})
    del model
    gen = torch.Generator().manual_seed(args.seed)
    weight_map: Dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for fname, keys in _shards(shapes, block_path):
        tensors = {k: _random_tensor(k, shapes[k], dtype, gen) for k in keys}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: fname for k in keys})
        del tensors
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg.save_pretrained(out)
    n = sum(math.prod(s) for s in shapes.values())
    print(f"wrote {out}: {n / 1e9:.3f} B parameters, {total / 2**30:.2f} GiB of {args.dtype} safetensors "
          f"({args.layers} blocks) in {time.perf_counter() - t0:.0f} s; peak RSS of this writer "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def model_sizes(src: Path) -> Tuple[int, int, int, int]:
    """(bytes of the safetensors files, float32 bytes of all parameters, float32 bytes of the
    largest block, the widest layer input d_max in the blocks)."""
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    per_file, d_max = {}, 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            shapes = [h.get_slice(k).get_shape() for k in h.keys()]
        per_file[f.name] = 4 * sum(math.prod(s) for s in shapes)
        if f.name.startswith("model-block-"):
            d_max = max([d_max] + [s[-1] for s in shapes if len(s) >= 2])
    blocks = [v for k, v in per_file.items() if k.startswith("model-block-")]
    return sum(f.stat().st_size for f in files), sum(per_file.values()), max(blocks, default=0), d_max


def _own_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / path.lstrip("/")
    raise SystemExit("no cgroup v1 memory controller here (/proc/self/cgroup has no memory line)")


class _AnonPeak(threading.Thread):
    """Samples the cgroup's anonymous memory (memory.stat ``rss``) every 0.2 s and keeps the
    largest: unlike ``ru_maxrss`` it leaves out file pages (the mapped experts, the source files)."""

    def __init__(self, stat: Path) -> None:
        super().__init__(daemon=True)
        self.stat, self.peak, self.stop = stat, 0, False

    def run(self) -> None:
        while not self.stop:
            with contextlib.suppress(OSError, ValueError, StopIteration):
                rss = next(int(ln.split()[1]) for ln in self.stat.read_text().splitlines() if ln.startswith("rss "))
                self.peak = max(self.peak, rss)
            time.sleep(0.2)


def run_capped(job: dict, cap: int, threads: int) -> dict:
    """Runs JOB in a child placed in a fresh memory cgroup limited to ``cap`` bytes (the child
    adds itself before exec'ing Python, so every allocation counts)."""
    group = _own_cgroup() / f"lrgptq-bigmodel-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap))
        script = Path(job["out"] + ".py")
        script.write_text(JOB)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        shell = f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"'
        t0 = time.perf_counter()
        proc = subprocess.Popen(["sh", "-c", shell, sys.executable, str(script), json.dumps(job)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        anon = _AnonPeak(group / "memory.stat")
        anon.start()
        stdout, stderr = proc.communicate()
        anon.stop = True
        anon.join()
        wall = time.perf_counter() - t0
        script.unlink()
        stat = {ln.split()[0]: int(ln.split()[1]) for ln in (group / "memory.oom_control").read_text().splitlines()}
        row = {"rc": proc.returncode, "wall": wall, "anon_peak": anon.peak,
               "max_usage": int((group / "memory.max_usage_in_bytes").read_text()),
               "failcnt": int((group / "memory.failcnt").read_text()), "oom_kill": stat.get("oom_kill", -1),
               "loaded": "LOADED" in stdout}
        for tag in ("BASE ", "RESULT "):
            lines = [ln for ln in stdout.splitlines() if ln.startswith(tag)]
            if lines:
                row.update(json.loads(lines[-1][len(tag):]))
        if proc.returncode != 0:
            row["stderr"] = stderr[-1500:]
        return row
    finally:
        for _ in range(50):  # the cgroup empties once the child is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def cmd_run(args: argparse.Namespace) -> None:
    src = Path(args.model)
    cap = parse_bytes(args.cap)
    on_disk, fp32, block, d_max = model_sizes(src)
    # The largest block's working set: its weights in float32, the widest layer's H (float64) and
    # the factor op's workspace (5 more d x d float64, docs/benchmarks.md §3.1), the activations
    # entering and leaving the block (float32).
    import transformers

    hidden = transformers.AutoConfig.from_pretrained(str(src)).hidden_size
    working = block + 6 * 8 * d_max**2 + 2 * 4 * args.nsamples * args.seqlen * hidden
    print(f"model {src}: {on_disk / MIB:.0f} MiB of safetensors, {fp32 / MIB:.0f} MiB as float32, largest block "
          f"{block / MIB:.0f} MiB as float32, d_max {d_max}; the largest block's working set (block fp32 + "
          f"6 d_max² float64 for H and the factor + activations) {working / MIB:.0f} MiB; "
          f"cap {cap / MIB:.0f} MiB (cgroup v1 memory.limit_in_bytes); "
          f"method {args.method}, 4-bit g128, {args.nsamples} x {args.seqlen} random calibration tokens, "
          f"{args.threads} thread(s)")
    print(os.popen("uptime").read().strip())
    print("| pipeline | exit status | wall (s) | peak RSS ru_maxrss (MiB) | peak anonymous memory, sampled (MiB) | "
          "baseline after imports (MiB) | cgroup max_usage incl. page cache (MiB) | failcnt | OOM kills | "
          "(peak − baseline) / working set |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        out = tempfile.mkdtemp(prefix=f"lrgptq-big-{mode}-", dir=args.tmp)
        shutil.rmtree(out)
        r = run_capped({"model": str(src), "mode": mode, "out": out, "threads": args.threads,
                        "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "expert_budget": parse_bytes(args.expert_budget)}, cap, args.threads)
        shutil.rmtree(out, ignore_errors=True)
        peak, base = r.get("peak"), r.get("base")
        ratio = f"{(peak - base) / working:.2f}" if peak and base else "-"
        name = {"stream": "streamed (quantize_streamed)",
                "mapped": f"streamed, expert_budget={args.expert_budget} (experts mapped, runs of experts)",
                "memory": "in memory (from_pretrained + quantize_model)"}[mode]
        if mode == "memory" and not r["loaded"]:
            name += ", killed while loading"
        print(f"| {name} | {r['rc']} | {r['wall']:.1f} | {peak / MIB if peak else float('nan'):.0f} | "
              f"{r['anon_peak'] / MIB:.0f} | "
              f"{base / MIB if base else float('nan'):.0f} | {r['max_usage'] / MIB:.0f} | {r['failcnt']} | "
              f"{r['oom_kill']} | {ratio} |", flush=True)
        if "stderr" in r and args.verbose:
            print(r["stderr"], file=sys.stderr)
    print(os.popen("uptime").read().strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random-weight model shard by shard")
    m.add_argument("out")
    m.add_argument("--arch", default="llama",
                   help="'llama', 'qwen3_moe', or a directory with another model's config.json")
    m.add_argument("--experts", type=int, default=128, help="qwen3_moe: experts per block")
    m.add_argument("--layers", type=int, default=80)
    m.add_argument("--hidden", type=int, default=1024)
    m.add_argument("--ff", type=int, default=2816)
    m.add_argument("--vocab", type=int, default=32000)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make)
    r = sub.add_parser("run", help="quantize it in a child under a memory cgroup")
    r.add_argument("model")
    r.add_argument("--cap", default="1.5G", help="the cgroup's memory.limit_in_bytes (e.g. 1.5G)")
    r.add_argument("--modes", nargs="+", default=["stream", "memory"], choices=["stream", "mapped", "memory"],
                   help="stream: quantize_streamed; mapped: the same with --expert-budget; memory: "
                        "from_pretrained + quantize_model + save")
    r.add_argument("--method", default="gptq")
    r.add_argument("--expert-budget", default="128M", help="mapped: quantize_streamed's expert_budget")
    r.add_argument("--nsamples", type=int, default=4)
    r.add_argument("--seqlen", type=int, default=128)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--tmp", default=tempfile.gettempdir())
    r.add_argument("--verbose", action="store_true", help="print a failed child's stderr")
    r.set_defaults(func=cmd_run)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
