"""The CLI's checks of every path and option, made before a model is loaded: a mistake is found
in a second, not after hours of quantization. Each failure is a ValueError that names the option,
the path and the fix (the CLI prints it as its error line and exits 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpoint, formats

# What a Hugging Face tokenizer is saved as (fast, sentencepiece, BPE and WordPiece files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def model_dir(path: str, gguf_file: Optional[str] = None) -> Path:
    """A local model directory with a config (or the GGUF file) and a tokenizer."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"model directory {path} does not exist (lrgptq reads local directories only: download "
                         "the model first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`)")
    if not root.is_dir():
        raise ValueError(f"model {path} is not a directory (a model directory holds config.json, the weights and "
                         "the tokenizer's files)")
    if gguf_file:
        if not (root / gguf_file).is_file():
            raise ValueError(f"--gguf-file {gguf_file}: no such file in {path}")
        return root
    if not (root / "config.json").is_file():
        raise ValueError(f"model directory {path} has no config.json: not a Hugging Face model directory")
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"model directory {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
                         "copy the model's tokenizer there")
    return root


def quantized_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a checkpoint lrgptq.load reads (config.json with a
    quantization_config whose quant_method is one of lrgptq's layouts)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = checkpoint.read_json(cfg).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in formats.LAYOUTS


def text_file(path: str, option: str) -> str:
    """The UTF-8 text of the regular file ``path`` given to ``option``; not empty."""
    try:
        checkpoint.regular_file(Path(path))
        data = Path(path).read_bytes()
    except (ValueError, OSError) as err:
        raise ValueError(f"{option} {path}: cannot read it ({err})") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {path}: not UTF-8 text (byte {err.start} is {data[err.start]:#04x}); convert "
                         "it, e.g. `iconv -f latin1 -t utf-8`") from err
    if not text.strip():
        raise ValueError(f"{option} {path}: the file is empty")
    return text


def output_file(path: str, option: str) -> None:
    """``path`` can be written as a file: not a directory, in an existing writable directory."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable by this user")


def save_dir(save: str, model: str, stream: bool) -> None:
    """``--save`` is neither the model's directory nor inside it, and passes the target rule of
    what will write it (``lrgptq.save``, or the streamed run's)."""
    out, src = Path(save).resolve(), Path(model).resolve()
    if out == src or src in out.parents:
        raise ValueError(f"--save {save} is {'the model directory' if out == src else 'inside the model directory'} "
                         f"{model}; refusing to write the checkpoint there (it would replace or mix with the model's "
                         "files): save to a new directory")
    if stream:
        from .streaming import MANIFEST

        checkpoint.check_target(out, MANIFEST, "write a streamed checkpoint")
    else:
        checkpoint.check_save_target(out)


def at_least(value: Optional[int], option: str, least: int, why: str) -> None:
    if value is not None and value < least:
        raise ValueError(f"{option} must be >= {least} ({why}), got {value}")


def tokens(tokenizer: Any, text: str, option: str, path: str) -> torch.Tensor:
    """The token ids of ``text`` (1, T), at least one."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError(f"{option} {path}: the tokenizer finds no tokens in it")
    return ids

