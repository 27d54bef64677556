"""Save a quantized model as a checkpoint the ecosystem loads, and load it back.

A checkpoint is a directory: ``config.json`` (the model's transformers config with a
``quantization_config`` block), ``quantize_config.json`` (the same block, for AutoGPTQ-style
readers), the tensors in safetensors files (``model.safetensors``, or shards with
``model.safetensors.index.json``) and, when given, the tokenizer's files. What a quantized layer
becomes on disk is the layout's business (``formats/``, chosen by ``quant_method``).

Writes are atomic: everything goes to a hidden temporary directory beside ``out_dir``, which is
renamed into place only once complete, so a crash never leaves a complete-looking checkpoint;
an existing ``out_dir`` (which must be empty or a checkpoint) is replaced only after success, by
two renames (a directory cannot be swapped in one): a crash between them leaves no ``out_dir``
and the old checkpoint intact in a hidden ``.<name>.old-*`` directory beside it.

``load`` checks everything it reads: a malformed checkpoint (unreadable or truncated file,
missing or unexpected tensor, wrong shape or dtype, a config that disagrees with the tensors)
raises ValueError naming the file and the tensor, never a crash or a silently wrong model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from . import formats

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PathLike = Union[str, os.PathLike]


@dataclass
class Saved:
    """What ``save`` wrote and decided."""

    path: Path
    checkpoint_format: str
    files: List[str]
    tensor_bytes: int
    zero_point_layers: Dict[str, int] = field(default_factory=dict)  # layers with z = 0 -> count


def save(
    model: nn.Module,
    report: Any,
    out_dir: PathLike,
    tokenizer: Any = None,
    *,
    checkpoint_format: str = "auto",
    dtype: torch.dtype = torch.float16,
    max_shard_size: int = 4 * 2**30,
) -> Saved:
    """Writes ``model`` (quantized in place by ``quantize_model``, which returned ``report``)
    as a GPTQ checkpoint in ``out_dir`` (a GPTVQ quantization, ``vq_dim`` > 0, in lrgptq's
    ``gptvq`` layout: docs/vq.md).

    ``checkpoint_format``: ``"auto"`` (v1 ``"gptq"`` for a symmetric grid, ``"gptq_v2"`` for an
    asymmetric one: what GPTQModel, transformers and vLLM all load, docs/interop.md), ``"gptq"``
    (ValueError if an asymmetric z = 0, which v1 cannot store) or ``"gptq_v2"``. ``dtype``: the
    checkpoint's float dtype (scales, biases and every tensor that is not quantized), float16 as the readers expect;
    float32 keeps a float32 model and the engine's scales exactly. ``max_shard_size``: bytes per
    safetensors file. The model is not changed.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("lrgptq.save needs a transformers model (with .config); got " + type(model).__name__)
    if not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    prepared = formats.for_config(report.config).prepare(model, report, checkpoint_format, dtype)
    tensors = _tensors_to_save(model, prepared.modules, dtype)
    cfg = model_config(model, dtype, prepared.quantization_config)
    with _atomic_dir(out_dir) as tmp:
        files = _write_shards(tensors, tmp, max_shard_size)
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "quantize_config.json", prepared.quantization_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    fmt, zero = prepared.info["checkpoint_format"], prepared.info["zero_point_layers"]
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return Saved(Path(out_dir).absolute(), fmt, files, size, zero)


def model_config(model: nn.Module, dtype: torch.dtype, quantization_config: Dict[str, Any]) -> Dict[str, Any]:
    """config.json's content: the model's transformers config, its dtype, the quantization block."""
    cfg = model.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    for key in ("dtype", "torch_dtype"):  # transformers 5 reads "dtype", 4.x "torch_dtype"
        if key == "dtype" or key in cfg:
            cfg[key] = str(dtype).replace("torch.", "")
    cfg["quantization_config"] = quantization_config
    return cfg


def load(path: PathLike, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuilds the model saved in ``path``: the transformers architecture from config.json, its
    quantized linears replaced by QuantLinear, every tensor loaded and checked. ``dtype``: cast
    the float tensors that are not quantized (e.g. torch.float32 to run a float16 checkpoint on
    a CPU); None keeps the checkpoint's. QuantLinear computes in float32 whatever its scales'
    dtype and returns its input's dtype."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (a checkpoint is a directory with config.json)")
    cfg_path = root / "config.json"
    config = _read_json(cfg_path)
    qc = config.get("quantization_config")
    if qc is None:
        raise ValueError(f"{cfg_path}: no quantization_config, so this is not a quantized checkpoint")
    layout = formats.layout(qc.get("quant_method") if isinstance(qc, dict) else None, str(cfg_path))
    settings = layout.parse_config(qc, str(cfg_path))
    qc_path = root / "quantize_config.json"
    if qc_path.exists():
        other = layout.parse_config(_read_json(qc_path), str(qc_path))
        if other != settings:
            raise ValueError(f"{qc_path} says {other}, but {cfg_path} says {settings}: which one is true?")
    files = _tensor_files(root)
    quantized = layout.quantized_names(files)
    if not quantized:
        raise ValueError(f"{root}: no quantized layer in the tensors (no '<layer>.qweight')")
    model = _build(root, config)
    with _Reader(files) as read:
        for name in sorted(quantized):
            linear = _quantizable(model, name, files[f"{name}.qweight"])
            prefix = name + "."
            tensors = {k[len(prefix) :]: read(k) for k in files if k.startswith(prefix)}
            module = layout.load_module(settings, name, linear, tensors, str(files[f"{name}.qweight"]))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        rest = [k for k in files if k.rpartition(".")[0] not in quantized]
        tensors = {k: read(k) for k in rest}
        if dtype is not None:
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        _load_rest(model, tensors, quantized, files)
    model.eval()
    return model


# ----------------------------------------------------------------------------- saving


def _tensors_to_save(
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


def _write_shards(tensors: Dict[str, torch.Tensor], root: Path, max_bytes: int) -> List[str]:
    from safetensors.torch import save_file

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
        save_file({k: tensors[k] for k in keys}, str(root / fname), metadata={"format": "pt"})
        _fsync(root / fname)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: fname for fname, keys in zip(names, shards) for k in keys}
        _write_json(root / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        names.append(INDEX)
    return names


def save_file_atomic(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """Writes a safetensors file under a temporary name, syncs it, then renames it into place."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _fsync(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``_write_json`` under a temporary name, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_json(tmp, obj)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_dir(out_dir: PathLike) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that becomes ``out_dir`` when the block succeeds."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} is a non-empty directory that is not a checkpoint; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "replaced")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "replaced", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def _tensor_files(root: Path) -> Dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    from safetensors import safe_open

    index = root / INDEX
    if index.exists():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names")
        for fname in set(wm.values()):
            if Path(fname).name != fname or not (root / fname).is_file():
                raise ValueError(f"{index}: names {fname!r}, which is not a file in {root}")
        return {k: root / v for k, v in wm.items()}
    single = root / SINGLE
    if not single.is_file():
        raise ValueError(f"{root}: no {SINGLE} and no {INDEX}")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{single}: not a readable safetensors file ({err})") from err


class _Reader:
    """Reads tensors by name from their files, turning any read failure into a ValueError."""

    def __init__(self, files: Dict[str, Path]) -> None:
        self.files = files
        self.stack = contextlib.ExitStack()
        self.handles: Dict[Path, Any] = {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def __call__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[key]
        try:
            if path not in self.handles:
                self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
            return self.handles[path].get_tensor(key)
        except Exception as err:  # truncated, corrupt, or a name the index promised but the file lacks
            raise ValueError(f"{path}: cannot read tensor {key} ({err})") from err


def _no_init() -> contextlib.AbstractContextManager:
    """transformers' context that skips random initialisation (its home moved in v5)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            module = __import__(where, fromlist=["no_init_weights"])
            return module.no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _build(root: Path, config: Dict[str, Any]) -> nn.Module:
    import transformers

    where = root / "config.json"
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{where}: architectures must name a transformers model class, got {archs!r}")
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(root))
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # lrgptq replaces the layers itself
        with _no_init():
            return cls(cfg)
    except Exception as err:  # transformers' own errors for a config it cannot build
        raise ValueError(f"{where}: transformers cannot build {arch} from it ({type(err).__name__}: {err})") from err


def _quantizable(model: nn.Module, name: str, where: Path) -> nn.Module:
    from .models import is_linear

    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not is_linear(module):
        what = "no such module" if module is None else type(module).__name__
        raise ValueError(f"{where}: {name}.qweight quantizes {name}, which in this architecture is {what}")
    return module


def _load_rest(model: nn.Module, tensors: Dict[str, torch.Tensor], quantized: set, files: Dict[str, Path]) -> None:
    """Loads the non-quantized tensors, checked against the model's own. A tensor the files leave
    out must come back by tying (e.g. lm_head = embed_tokens, which ``save`` writes once)."""
    expected = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if k.rpartition(".")[0] not in quantized
    }
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{files[extra[0]]}: unexpected tensor {extra[0]}: the model has no such parameter")
    for k, t in tensors.items():
        want = expected[k]
        floats = t.is_floating_point() and want.is_floating_point()
        same_kind = floats or (not t.is_floating_point() and t.dtype == want.dtype)
        if tuple(t.shape) != tuple(want.shape) or not same_kind:
            raise ValueError(
                f"{files[k]}: {k} is {t.dtype} {tuple(t.shape)}, the model needs {want.dtype} {tuple(want.shape)}"
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in expected if k not in tensors]
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {t.data_ptr() for t in tensors.values()}
    now = model.state_dict(keep_vars=True)
    for k in list(tensors) + missing:
        if now[k].data_ptr() not in loaded:
            raise ValueError(f"tensor {k} is missing from the checkpoint's files and is not tied to one there")
