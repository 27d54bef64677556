"""The checkpoint writer: what ``lrgptq.save`` and ``lrgptq.streaming.quantize_streamed`` both
write, and how.

A checkpoint directory holds safetensors files (one ``model.safetensors``, or several with
``model.safetensors.index.json``), ``quantize_config.json``, the tokenizer's files when given,
and ``config.json`` (the model's transformers config with the ``quantization_config`` block),
written last. What a quantized layer becomes on disk, the ``quantization_config`` block, the
choice between a layout's variants (GPTQ v1/v2 zero points) are the layout's
business (``lrgptq.formats``, chosen by ``formats.for_config``); this module does the rest.

:class:`CheckpointWriter` packs a model's results in one go (``save``) or part by part (a
streamed run packs block by block): each part records the layout's decisions in its ``info``,
and :meth:`CheckpointWriter.finish` merges them, rewriting any part written in a variant the
whole checkpoint does not use. Every file is synced; :func:`save_file_atomic` and
:func:`write_json_atomic` write under a temporary name and rename into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import formats, moe
from .pipeline import ModelReport

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Part:
    """A packed part of a model: its tensors as the checkpoint stores them, the packed module per
    layer name (what a reader rebuilds) and the layout's decisions (``checkpoint_format``, ...)."""

    tensors: Dict[str, torch.Tensor]
    modules: Dict[str, nn.Module]
    info: Dict[str, Any]
    layers: List[dict] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return tensor_bytes(self.tensors)


class CheckpointWriter:
    """Writes ``model`` quantized with ``config`` (a QuantConfig) as a checkpoint in the layout
    ``formats.for_config(config)``: ``checkpoint_format`` (``"auto"`` or one of the layout's
    variants) and ``dtype`` (of scales and of every tensor that is not quantized) as in
    :func:`lrgptq.save`; ``true_sequential`` as the quantization ran."""

    def __init__(self, model: nn.Module, config: Any, *, checkpoint_format: str = "auto",
                 dtype: torch.dtype = torch.float16, true_sequential: bool = True) -> None:
        self.model, self.config, self.dtype = model, config, dtype
        self.requested, self.true_sequential = checkpoint_format, true_sequential
        self.layout = formats.for_config(config)
        self.layout.check_request(config, checkpoint_format, dtype)

    def pack(self, results: Dict[str, Any], layers: List[dict],
             include: Optional[Callable[[str], bool]] = None) -> Part:
        """Packs ``results`` (layer name -> LayerResult, with their report ``layers``) and the
        model's other tensors whose state-dict key ``include`` accepts (default: all)."""
        report = ModelReport(self.config, list(layers), dict(results), true_sequential=self.true_sequential)
        # Fused MoE experts with quantized members are written per expert (docs/moe.md).
        with moe.unfused(self.model, only=moe.holders(results).__contains__):
            prepared = self.layout.prepare(self.model, report, self.requested, self.dtype)
            tensors = tensors_to_save(self.model, prepared.modules, self.dtype, include)
        return Part(tensors, prepared.modules, dict(prepared.info), list(layers))

    def merge(self, infos: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The decisions of the whole checkpoint from those of its parts."""
        zero = {n: c for info in infos for n, c in info.get("zero_point_layers", {}).items()}
        return {
            "checkpoint_format": self.layout.final_format([info["checkpoint_format"] for info in infos]),
            "zero_point_layers": zero,
            "desc_act": any(info.get("desc_act", False) for info in infos),
            "lm_head": any(info.get("lm_head", False) for info in infos),
        }

    def convert(self, tensors: Dict[str, torch.Tensor], info: Dict[str, Any], to: str) -> Dict[str, torch.Tensor]:
        """A part's tensors, packed as ``info`` says, rewritten in the variant ``to``."""
        return self.layout.convert(tensors, info["checkpoint_format"], to, self.config)

    def quantization_config(self, layers: List[dict], info: Dict[str, Any]) -> Dict[str, Any]:
        """The layout's ``quantization_config`` block for the whole checkpoint."""
        return self.layout.quantization_config(self.config, layers, info, self.true_sequential, self.dtype)

    def write_configs(self, root: Path, quantization_config: Dict[str, Any], tokenizer: Any = None) -> None:
        """quantize_config.json, the tokenizer's files and, last, config.json (atomically each)."""
        write_json_atomic(root / "quantize_config.json", quantization_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(root))
        write_json_atomic(root / "config.json", model_config(self.model, self.dtype, quantization_config))


def tensors_to_save(
    model: nn.Module,
    packed: Dict[str, nn.Module],
    dtype: torch.dtype,
    include: Optional[Callable[[str], bool]] = None,
) -> Dict[str, torch.Tensor]:
    """The model's state less the quantized layers' float weights (the rest cast to ``dtype``),
    plus their packed tensors. A tied parameter (e.g. lm_head = embed_tokens) is written once;
    loaders re-tie it. ``include``: which state-dict keys to consider (default all)."""
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in packed or (include is not None and not include(key)):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = cast_checked(key, t.detach().cpu(), dtype)
    for name, module in packed.items():
        for key, t in module.state_dict().items():
            out[f"{name}.{key}"] = t.contiguous()
    # safetensors refuses tensors that share memory; copy any that still do (views of one buffer).
    owners: Dict[int, str] = {}
    for key, t in out.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in owners and t.numel():
            out[key] = t.clone()
        owners.setdefault(ptr, key)
    return out


def cast_checked(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor cast to the checkpoint's ``dtype`` (ValueError if that overflows), others as is."""
    if t.is_floating_point() and t.dtype != dtype:
        cast = t.to(dtype)
        if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(t).all()):
            raise ValueError(f"{key} overflows {dtype}; save with dtype=torch.float32 (or bfloat16)")
        t = cast
    return t.contiguous()


def tensor_bytes(tensors: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def model_config(model: nn.Module, dtype: torch.dtype, quantization_config: Dict[str, Any]) -> Dict[str, Any]:
    """config.json's content: the model's transformers config, its dtype, the quantization block."""
    cfg = model.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    for key in ("dtype", "torch_dtype"):  # transformers 5 reads "dtype", 4.x "torch_dtype"
        if key == "dtype" or key in cfg:
            cfg[key] = str(dtype).replace("torch.", "")
    cfg["quantization_config"] = quantization_config
    return cfg


def write_shards(tensors: Dict[str, torch.Tensor], root: Path, max_bytes: int) -> List[str]:
    """The tensors in safetensors files of at most ``max_bytes`` (a tensor larger than that gets
    a file of its own), in order; with more than one file, the index too. Returns the file names."""
    shards: List[List[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, keys in zip(names, shards):
        save_file_atomic({k: tensors[k] for k in keys}, root / fname)
    if len(shards) > 1:
        write_index(root, {k: fname for fname, keys in zip(names, shards) for k in keys}, tensor_bytes(tensors))
        names.append(INDEX)
    return names


def write_index(root: Path, weight_map: Dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which file holds each tensor."""
    write_json_atomic(root / INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def save_file_atomic(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """Writes a safetensors file under a temporary name, syncs it, then renames it into place."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        writer_mode(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no stray temporary file
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """A JSON file written and synced under a temporary name, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync(path: Path) -> None:
    """Syncs a file or a directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writer_mode(path: Path) -> None:
    """Gives ``path`` the mode any writer would (0777 for a directory, 0666 for a file, less the
    umask): mkdtemp makes directories 0700 and safetensors writes files 0600."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _umask() -> int:
    """The process' umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
