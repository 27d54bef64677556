"""The ``lrgptq`` command: quantize, eval and demo.

Every path and option is checked before a model is loaded (preflight.py); errors are one line
``lrgptq CMD: error: ...`` and exit status 2, warnings one line ``lrgptq CMD: warning: ...``.
A model directory that holds an lrgptq checkpoint is loaded with ``lrgptq.load``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import fields
from typing import List, Optional

import torch

from . import preflight
from .config import METHODS, QuantConfig


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shown(value) -> str:
    """A QuantConfig default as the help shows it."""
    if value is None:
        return "unset"
    return _dtype_name(value) if isinstance(value, torch.dtype) else str(value)


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    """One option per QuantConfig field, with the field's help text; defaults come from QuantConfig
    (or the --method preset), so only the options given on the command line are passed on."""
    g = p.add_argument_group("quantization")
    g.add_argument("--method", choices=sorted(METHODS), default="lrgptq",
                   help="preset: gptq = Cholesky of the damped H (as published); lrgptq = the svdqr route "
                        "(pivoted order; never fails) with the damping chosen per layer on held-out tokens "
                        "(damp=auto) and GPTQ's MSE range search (mse); rtn = round to nearest "
                        "(default: %(default)s)")
    preset = set().union(*METHODS.values())
    for f in fields(QuantConfig):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = "the --method preset's" if f.name in preset else _shown(f.default)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{meta['help']} (default: {default})")
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(f.default, torch.dtype):
            g.add_argument(flag, choices=[_dtype_name(c) for c in meta["choices"]], **kw)
        elif meta["choices"] is not None:
            g.add_argument(flag, choices=meta["choices"], type=type(f.default), **kw)
        else:
            g.add_argument(flag, type=meta["type"] or type(f.default), **kw)
    g.add_argument("--skip", nargs="*", default=[], help="leave layers whose name contains any of these in full precision")
    g.add_argument("--no-true-sequential", action="store_true",
                   help="capture all of a block's inputs at once instead of subset by subset")


def _config(args: argparse.Namespace) -> QuantConfig:
    """The --method preset with the QuantConfig fields given on the command line."""
    overrides = {}
    for f in fields(QuantConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            overrides[f.name] = getattr(torch, value) if isinstance(f.default, torch.dtype) else value
    return QuantConfig.for_method(args.method, **overrides)


def _tokenizer(path: str, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    except Exception as err:  # transformers raises many kinds (OSError, ValueError, ImportError, ...)
        raise ValueError(f"{path}: transformers cannot load its tokenizer ({type(err).__name__}: {err})") from err


def _model(path: str, gguf_file: Optional[str]):
    """The model in ``path`` in float32: an lrgptq checkpoint through lrgptq.load, anything else
    through transformers."""
    if not gguf_file and preflight.quantized_checkpoint(path):
        from .checkpoint import load

        return load(path, dtype=torch.float32)
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kw).eval()


def _comm(args: argparse.Namespace):
    """The process group for --distributed (torchrun's environment), else one process."""
    from .distributed import Comm, Distributed

    if not args.distributed:
        return Comm()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Distributed()


def _check_quantize(args: argparse.Namespace) -> None:
    """Every path and option of ``quantize``, before anything is loaded."""
    preflight.model_dir(args.model, args.gguf_file)
    if preflight.quantized_checkpoint(args.model):
        raise ValueError(f"{args.model} is already a quantized checkpoint; quantize the full-precision model")
    if args.stream and (not args.save or args.gguf_file):
        raise ValueError("--stream reads the model's safetensors files and writes the checkpoint as it goes: "
                         "give --save DIR, and a model directory with safetensors (not --gguf-file)")
    if args.spill and not args.stream:
        raise ValueError("--spill keeps a streamed run's activations in a file and works only with --stream; "
                         "add --stream (or drop --spill): without it the run would hold them in memory, "
                         "which --spill was asked to avoid")
    preflight.at_least(args.nsamples, "--nsamples", 1, "calibration windows")
    preflight.at_least(args.seqlen, "--seqlen", 1, "tokens per calibration window")
    preflight.at_least(args.window, "--window", 2, "a window scores each token after its first")
    preflight.at_least(args.max_windows, "--max-windows", 1, "perplexity windows")
    if args.save:
        preflight.save_dir(args.save, args.model, args.stream)
        from . import formats

        # e.g. 5 bits (no GPTQ layout) or float codebooks: refused now, not after every block
        cfg = _config(args)
        formats.for_config(cfg).check_request(cfg, "auto", torch.float16)
    if args.report:
        preflight.output_file(args.report, "--report")
    if not args.eval_text and (args.window != 512 or args.max_windows is not None):
        warnings.warn("--window and --max-windows have no effect without --eval-text")


def _eval_ids(tok, text: str, option: str, path: str, window: int) -> torch.Tensor:
    ids = preflight.tokens(tok, text, option, path)
    if ids.numel() < window:
        raise ValueError(f"{option} {path}: {ids.numel()} tokens, fewer than one perplexity window of {window} "
                         "(--window): give a longer text or a smaller window")
    return ids


def cmd_quantize(args: argparse.Namespace) -> int:
    from .calib import text_windows
    from .eval import perplexity
    from .pipeline import quantize_model

    _check_quantize(args)
    calib_text = preflight.text_file(args.calib, "--calib")
    eval_text = preflight.text_file(args.eval_text, "--eval-text") if args.eval_text else None
    cfg = _config(args)
    comm = _comm(args)
    say = print if comm.is_writer else (lambda *a, **k: None)
    tok = _tokenizer(args.model, args.gguf_file)
    try:
        calib = text_windows(calib_text, tok, args.nsamples, args.seqlen, cfg.seed)
    except ValueError as err:
        raise ValueError(f"--calib {args.calib}: {err} (--seqlen)") from err
    eval_ids = _eval_ids(tok, eval_text, "--eval-text", args.eval_text, args.window) if eval_text else None
    common = dict(skip=tuple(args.skip), true_sequential=not args.no_true_sequential, comm=comm,
                  progress=comm.is_writer)
    if args.stream:
        from .streaming import quantize_streamed

        model = None
        report = quantize_streamed(args.model, calib, args.save, cfg, tokenizer=tok, spill=args.spill, **common)
    else:
        model = _model(args.model, args.gguf_file)
        report = quantize_model(model, calib, cfg, **common)
    say(report.table())
    say(f"quantized {len(report.layers)} layers in {report.seconds:.1f} s")
    if args.save and not args.stream and comm.is_writer:
        from .checkpoint import save

        save(model, report, args.save, tok)
    if args.save and comm.is_writer:
        layout = "GPTVQ (lrgptq's gptvq layout)" if cfg.vq_dim else "GPTQ"
        say(f"saved the {layout} checkpoint to {args.save}")
    if eval_ids is not None and comm.is_writer:
        if args.stream:
            from .checkpoint import load

            model = load(args.save, dtype=torch.float32)
        say(f"perplexity (window {args.window}): {perplexity(model, eval_ids, args.window, args.max_windows):.3f}")
    if args.report and comm.is_writer:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"config": cfg.to_dict(), "layers": report.layers, "seconds": report.seconds}, f, indent=1)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import perplexity

    preflight.model_dir(args.model, args.gguf_file)
    preflight.at_least(args.window, "--window", 2, "a window scores each token after its first")
    preflight.at_least(args.max_windows, "--max-windows", 1, "perplexity windows")
    text = preflight.text_file(args.text, "--text")
    tok = _tokenizer(args.model, args.gguf_file)
    ids = _eval_ids(tok, text, "--text", args.text, args.window)
    model = _model(args.model, args.gguf_file)
    print(f"perplexity (window {args.window}): {perplexity(model, ids, args.window, args.max_windows):.3f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo's data helpers load only here, never with the library

    run_demo(bits=args.bits, methods=args.methods, nsamples=args.nsamples, seqlen=args.seqlen,
             window=args.window, max_windows=args.max_windows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrgptq", description="Post-training weight quantization of LLMs (GPTQ family).")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a local Hugging Face model with calibration text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("model", help="local model directory (config.json + weights, or a GGUF with --gguf-file)")
    q.add_argument("--gguf-file", help="GGUF file name inside the model directory (dequantized on load)")
    q.add_argument("--calib", required=True, help="text file of calibration prose")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--eval-text", help="text file to report perplexity on after quantizing (keep it disjoint from --calib)")
    q.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    q.add_argument("--max-windows", type=int, help="cap on perplexity windows")
    q.add_argument("--save", help="write the quantized model here as a GPTQ checkpoint (safetensors + configs)")
    q.add_argument("--report", help="write the per-layer report as JSON here")
    q.add_argument("--stream", action="store_true",
                   help="never load the whole model: read one block at a time from the safetensors files and "
                        "write it to --save at once; rerun the same command to resume a stopped run")
    q.add_argument("--spill", action="store_true",
                   help="with --stream: keep the activations between blocks in a file under --save, not in memory")
    q.add_argument("--distributed", action="store_true",
                   help="share the work between the processes of a torchrun launch (gloo on CPU, NCCL on GPU): "
                        "torchrun --nproc-per-node N -m lrgptq.cli quantize --distributed ...")
    _add_quant_options(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a local model on a text file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model")
    e.add_argument("--gguf-file")
    e.add_argument("--text", required=True, help="text file (scored in non-overlapping windows)")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--max-windows", type=int)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="quantize the packaged model with each method and print perplexities",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--bits", type=int, nargs="+", default=[3], help="bit widths to compare")
    d.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gptq-act", "lrgptq", "gptvq"],
                   help="methods to compare: rtn, gptq, gptq-act (act-order GPTQ, the baseline), lrgptq, "
                        "gptvq (2-D codebooks at about the same bits per weight)")
    d.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    d.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    d.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    d.add_argument("--max-windows", type=int, default=20, help="perplexity windows")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def say_warning(message, category, *_rest, **_kw) -> None:
        print(f"lrgptq {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each warning once, as a line of the command's output
        warnings.showwarning = say_warning
        try:
            return args.func(args)
        except (ValueError, RuntimeError, OSError) as err:
            print(f"lrgptq {args.command}: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
