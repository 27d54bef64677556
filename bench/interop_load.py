"""Interop, load side (run by bench/interop.sh in the readers' venv, without lrgptq).

Loads every checkpoint that bench/interop_save.py wrote with every reader (one child process per
reader, restarted past a checkpoint that crashes or hangs it: that costs one cell, not the
table), computes logits on the saved token batch and compares them with lrgptq.load's float32
logits. Prints the table checkpoint x reader -> loads? / max |Δlogit| / error, and writes
OUT/results.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

READERS = ("transformers", "gptqmodel")


def _transformers(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own GPTQ path (GptqHfQuantizer, which needs optimum and a GPTQ kernel package)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    # backend "auto" picks GPTQModel's AVX-512 kernel on this CPU, which refuses any layer whose
    # input width is not a multiple of group_size (SmolLM2's 576 at g128): ask for the torch
    # kernel, as GPTQModel.load is asked below. Only loading attributes are taken from it.
    bits = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["bits"]
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend="torch"))


def _gptqmodel(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """GPTQModel's loader with its pure-torch kernel (no CUDA here)."""
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=dtype).model


LOADERS: Dict[str, Callable[[str, torch.dtype], torch.nn.Module]] = {
    "transformers": _transformers,
    "gptqmodel": _gptqmodel,
}


def _first_error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:400]


# How a reader is asked for float32 logits, best first: float32 throughout; a float16 load cast
# to float32 afterwards (exact: the checkpoint's scales are float16); float16 throughout.
MODES = (("float32", torch.float32, False), ("float16->float32", torch.float16, True),
         ("float16", torch.float16, False))


@torch.no_grad()
def run_one(path: str, reader: str, ids: torch.Tensor, refs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Loads ``path`` with ``reader`` in the first mode it takes and compares its logits with
    lrgptq.load's (``refs["float32"]``; in float16 mode also ``refs["float16"]``)."""
    out: Dict[str, Any] = {"reader": reader}
    errors = []
    for mode, dtype, cast in MODES:
        t0 = time.perf_counter()
        try:
            model = LOADERS[reader](path, dtype)
            model.eval()
            if cast:
                model.float()
            logits = model(ids).logits.float()
        except Exception as e:  # noqa: BLE001 (any refusal is a result here)
            errors.append(f"{mode}: {_first_error_line(e)}")
            out["traceback"] = traceback.format_exc()[-4000:]
            continue
        out["load_s"] = round(time.perf_counter() - t0, 1)
        q = [m for n, m in model.named_modules() if n.endswith("self_attn.q_proj")]
        out["q_proj_class"] = type(q[0]).__name__ if q else None
        ref = refs["float32"]
        out.update(loads=True, mode=mode, max_abs_diff=float((logits - ref).abs().max()),
                   max_abs_ref=float(ref.abs().max()),
                   argmax_agree=float((logits.argmax(-1) == ref.argmax(-1)).float().mean()))
        if dtype == torch.float16 and not cast:
            out["max_abs_diff_vs_lrgptq_fp16"] = float((logits - refs["float16"]).abs().max())
        break
    else:
        out["loads"] = False
    out["errors"] = errors
    return out


def versions() -> Dict[str, str]:
    got = {}
    for pkg in ("torch", "transformers", "optimum", "gptqmodel", "accelerate", "safetensors"):
        try:
            got[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            got[pkg] = "absent"
    return got


def cell(r: Dict[str, Any]) -> str:
    if r.get("loads"):
        fp = "" if r["mode"] == "float32" else f" ({r['mode']})"
        return f"yes, {r['max_abs_diff']:.2g}{fp}"
    msg = "; ".join(r.get("errors", [])) or r.get("error", "?")
    return f"**no**: {msg}"


def fp16_rounding(out: Path, name: str) -> float:
    """max |Δlogit| between lrgptq.load's float16 and float32 runs: the yardstick for a reader
    that rounds to float16 somewhere."""
    ref = {dt: torch.load(out / "ref" / f"{name}.{dt}.pt") for dt in ("float32", "float16")}
    return float((ref["float16"] - ref["float32"]).abs().max())


def table(rows: List[Dict[str, Any]], results: Dict[str, Dict[str, Any]], out: Path) -> str:
    head = ("| checkpoint | bits | sym | desc_act | format | lrgptq fp16 vs fp32 | "
            + " | ".join(READERS) + " |")
    lines = [head, "|" + "---|" * (6 + len(READERS))]
    for row in rows:
        name = row["name"]
        if "save_error" in row:
            lines.append(f"| {name} | {row['bits']} | {row['sym']} | | not written: {row['save_error'][:120]} | |"
                         + " |" * len(READERS))
            continue
        cells = [cell(results.get(f"{name}/{r}", {"error": "not run"})) for r in READERS]
        lines.append(f"| {name} | {row['bits']} | {row['sym']} | {row['desc_act']} | {row['checkpoint_format']} | "
                     f"{fp16_rounding(out, name):.2g} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _child(out: Path, reader: str, names: List[str]) -> None:
    """Runs ``reader`` on each checkpoint of ``names`` (one import of the reader for them all),
    writing results/<name>--<reader>.json after each."""
    ids = torch.load(out / "ids.pt")
    for name in names:
        refs = {dt: torch.load(out / "ref" / f"{name}.{dt}.pt") for dt in ("float32", "float16")}
        res = run_one(str(out / "ckpt" / name), reader, ids, refs)
        (out / "results" / f"{name}--{reader}.json").write_text(json.dumps(res, indent=1))
        print(f"{name}/{reader}: {cell(res)}", flush=True)


def _run_reader(out: Path, reader: str, names: List[str], timeout: int, threads: int) -> Dict[str, Dict[str, Any]]:
    """Every checkpoint of ``names`` with ``reader``, in child processes: one for them all, and
    after a crash or a timeout a new one for those left (the one it died on is marked failed)."""
    results: Dict[str, Dict[str, Any]] = {}
    for name in names:  # a rerun keeps what an earlier one wrote (delete OUT/results to redo)
        done = out / "results" / f"{name}--{reader}.json"
        if done.exists():
            results[name] = json.loads(done.read_text())
    left = [n for n in names if n not in results]
    while left:
        log = out / "results" / f"{reader}-{len(names) - len(left)}.log"
        cmd = [sys.executable, __file__, "--out", str(out), "--threads", str(threads), "--child", reader, *left]
        try:
            with open(log, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout * len(left),
                                      env={**os.environ, "TORCH_COMPILE_DISABLE": "1"})
            failure = None if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"timed out ({timeout} s per checkpoint)"
        for name in list(left):
            res_file = out / "results" / f"{name}--{reader}.json"
            if res_file.exists():
                results[name] = json.loads(res_file.read_text())
                left.remove(name)
        if left and failure is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            results[left.pop(0)] = {"loads": False, "error": f"{failure}: {tail[0][:300]}"}
        elif left:
            for name in left:
                results[name] = {"loads": False, "error": "no result written"}
            left = []
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the directory interop_save.py wrote")
    ap.add_argument("--readers", nargs="*", default=list(READERS), choices=READERS)
    ap.add_argument("--only", nargs="*", help="checkpoint names (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per checkpoint and reader")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs="+", metavar="READER CHECKPOINT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    if args.child:
        _child(out, args.child[0], args.child[1:])
        return
    meta = json.loads((out / "cases.json").read_text())
    (out / "results").mkdir(exist_ok=True)
    rows = [r for r in meta["checkpoints"] if not args.only or r["name"] in args.only]
    names = [r["name"] for r in rows if "save_error" not in r]
    results: Dict[str, Dict[str, Any]] = {}
    for reader in args.readers:
        t0 = time.perf_counter()
        got = _run_reader(out, reader, names, args.timeout, args.threads)
        results.update({f"{name}/{reader}": r for name, r in got.items()})
        for name in names:
            print(f"{name}/{reader}: {cell(got[name])}", flush=True)
        print(f"{reader}: {time.perf_counter() - t0:.0f} s", flush=True)
    summary = {"versions": versions(), "lrgptq_side": {k: meta[k] for k in meta if k != "checkpoints"},
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    print(f"reference: lrgptq {meta['lrgptq']} (torch {meta['torch']}), lrgptq.load in float32; "
          f"batch {meta['batch']} tokens of {meta['eval_book']}")
    print("cells: loads? and max |Δlogit| against lrgptq.load in float32 (the mode in brackets when the "
          "reader would not compute in float32 throughout)")
    print(table(rows, results, out))


if __name__ == "__main__":
    main()
