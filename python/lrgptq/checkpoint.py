"""Save a quantized model as a checkpoint the ecosystem loads, and load it back.

A checkpoint is a directory: ``config.json`` (the model's transformers config with a
``quantization_config`` block), ``quantize_config.json`` (the same block, for AutoGPTQ-style
readers), the tensors in safetensors files (``model.safetensors``, or shards with
``model.safetensors.index.json``) and, when given, the tokenizer's files. What a quantized layer
becomes on disk is the layout's business (``formats/``, chosen by ``quant_method``); the files
are written by :class:`lrgptq.writer.CheckpointWriter`, which streamed runs use too.

Where ``save`` writes: ``out_dir`` must not exist, or be an empty directory, or be a checkpoint
lrgptq wrote, recognised by its marker file ``lrgptq.json`` (written by every save; it lists
the files that save wrote). Anything else is refused with ValueError before anything is
written: a Hugging Face model directory (it has a config.json but no marker), a directory of the
user's files, or an lrgptq checkpoint to which files were added since (they would be deleted).
The same rule, with the streaming manifest as the marker, guards ``quantize_streamed``'s output
(``check_target``).

Writes are atomic: everything goes to a hidden temporary directory beside ``out_dir``, which is
renamed into place only once complete, so a crash never leaves a complete-looking checkpoint;
an existing ``out_dir`` is replaced only after success, by two renames (a directory cannot be
swapped in one): a crash between them leaves no ``out_dir`` and the old checkpoint intact in a
hidden ``.<name>.old-*`` directory beside it. The directory and its files get the mode any
other writer would give them (0777 and 0666 less the process' umask).

``load`` checks everything it reads: a malformed checkpoint (unreadable or truncated file,
missing or unexpected tensor, wrong shape or dtype, a config that disagrees with the tensors,
NaN or Inf in any float tensor, scales that are not finite and > 0) raises ValueError naming the
file and the tensor, never a crash, a hang or a silently wrong model. It opens only regular files
(a FIFO or a link to a device is refused without reading it) and bounds what it parses: JSON
files up to ``MAX_JSON_BYTES``, indexes up to ``MAX_TENSORS`` entries, safetensors headers up to
``MAX_HEADER_BYTES`` (safetensors' own limit).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from . import formats, moe
from .formats.base import all_finite, check_finite
from .writer import INDEX, SINGLE, CheckpointWriter, write_json_atomic, write_shards, writer_mode
from .writer import fsync as _fsync

MARKER = "lrgptq.json"  # what save writes into every checkpoint: {"written_by": "lrgptq", "files": [...]}
# Bounds on what load parses. A transformers config is a few KB; the index of a 1T-parameter
# MoE (60 layers × 384 experts × 3 linears × 4 tensors) has under 300 000 entries in ~30 MB.
MAX_JSON_BYTES = 64 * 2**20
MAX_TENSORS = 1_000_000
MAX_HEADER_BYTES = 100_000_000
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

    ``checkpoint_format``: ``"auto"`` (``"gptq_v2"`` for an asymmetric grid, v1 ``"gptq"`` for a
    symmetric one: what GPTQModel and transformers+optimum both load, docs/interop.md), ``"gptq"``
    (ValueError if an asymmetric z = 0, which v1 cannot store) or ``"gptq_v2"``. ``dtype``: the checkpoint's float
    dtype (scales, biases and every tensor that is not quantized), float16 as the readers expect;
    float32 keeps a float32 model and the engine's scales exactly. ``max_shard_size``: bytes per
    safetensors file. The model is not changed.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("lrgptq.save needs a transformers model (with .config); got " + type(model).__name__)
    if not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    check_save_target(Path(out_dir).absolute())  # before any work; _atomic_dir checks again
    writer = CheckpointWriter(model, report.config, checkpoint_format=checkpoint_format, dtype=dtype,
                              true_sequential=getattr(report, "true_sequential", True))
    part = writer.pack(report.results, report.layers)
    qc = writer.quantization_config(report.layers, part.info)
    with _atomic_dir(out_dir) as tmp:
        files = write_shards(part.tensors, tmp, max_shard_size)
        writer.write_configs(tmp, qc, tokenizer)
    return Saved(Path(out_dir).absolute(), part.info["checkpoint_format"], files, part.bytes,
                 part.info["zero_point_layers"])


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
    config = read_json(cfg_path)
    qc = config.get("quantization_config")
    if qc is None:
        raise ValueError(f"{cfg_path}: no quantization_config, so this is not a quantized checkpoint")
    layout = formats.layout(qc.get("quant_method") if isinstance(qc, dict) else None, str(cfg_path))
    settings = layout.parse_config(qc, str(cfg_path))
    qc_path = root / "quantize_config.json"
    if qc_path.exists():
        other = layout.parse_config(read_json(qc_path), str(qc_path))
        if other != settings:
            raise ValueError(f"{qc_path} says {other}, but {cfg_path} says {settings}: which one is true?")
    files = tensor_files(root)
    quantized = layout.quantized_names(files)
    if not quantized:
        raise ValueError(f"{root}: no quantized layer in the tensors (no '<layer>.qweight')")
    model = _build(root, config)
    moe.unfuse_for_load(model, quantized)  # fused MoE experts stored per expert (docs/moe.md)
    linears = {name: _quantizable(model, name, files[f"{name}.qweight"]) for name in sorted(quantized)}
    by_layer: Dict[str, List[str]] = {}
    for k in files:
        owner = k.rpartition(".")[0]
        if owner in quantized:
            by_layer.setdefault(owner, []).append(k)
    with TensorReader(files) as read:
        for name, linear in linears.items():
            prefix = name + "."
            tensors = {k[len(prefix) :]: read(k) for k in by_layer[name]}
            module = layout.load_module(settings, name, linear, tensors, str(files[f"{name}.qweight"]))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        rest = [k for k in files if k.rpartition(".")[0] not in quantized]
        tensors = {k: read(k) for k in rest}
        for k, t in tensors.items():  # as stored, before any cast
            check_finite(t, k, str(files[k]))
        if dtype is not None:
            # finite as stored (checked above), so only a tensor the cast changes can overflow
            cast = {k for k, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
            tensors = {k: t.to(dtype) if k in cast else t for k, t in tensors.items()}
            over = [k for k in cast if tensors[k].numel() and not all_finite(tensors[k])]
            if over:
                raise ValueError(f"{files[over[0]]}: {over[0]} overflows {dtype}; load with dtype=torch.float32 "
                                 "(or None, the checkpoint's own)")
        _load_rest(model, tensors, quantized, files)
    model.eval()
    return model


# ----------------------------------------------------------------------------- saving


def check_target(out: Path, marker: str, action: str) -> bool:
    """The rule for a directory lrgptq writes into: ``out`` may not exist or be an empty
    directory (False), or hold ``marker``, the file lrgptq writes into its own directories (True);
    anything else raises ValueError saying why and what to do. ``action`` says what would happen
    there, for the message."""
    out = Path(out).absolute()
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; refusing to {action} there: choose a directory path")
    names = os.listdir(out)
    if not names:
        return False
    if marker in names:
        return True
    what = "a model directory (it has config.json)" if "config.json" in names else f"{len(names)} files or directories"
    raise ValueError(
        f"{out} holds {what} but no {marker}, so lrgptq did not write it; refusing to {action} there. "
        "Choose a new or empty directory (a checkpoint of an older lrgptq has no marker: delete it "
        "yourself if that is what it is)"
    )


def check_save_target(out: Path) -> None:
    """``check_target`` for ``save``, which also refuses a checkpoint that holds files its marker
    does not list (the user's, added since: replacing the directory would delete them)."""
    if not check_target(out, MARKER, "replace it with a checkpoint (which would delete what it holds)"):
        return
    marker = read_json(out / MARKER)
    listed = marker.get("files")
    if marker.get("written_by") != "lrgptq" or not isinstance(listed, list):
        raise ValueError(f"{out / MARKER}: not an lrgptq marker (no written_by/files); refusing to replace {out}")
    foreign = sorted(set(os.listdir(out)) - set(map(str, listed)) - {MARKER})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{out} is an lrgptq checkpoint, but holds files that save did not write ({shown}); refusing to "
            "replace it, which would delete them: move them out, or save to another directory"
        )


@contextlib.contextmanager
def _atomic_dir(out_dir: PathLike) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that becomes ``out_dir`` when the block succeeds;
    ``out_dir`` must pass ``check_save_target``, and a marker listing the files is written last."""
    out = Path(out_dir).absolute()
    check_save_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            writer_mode(p)
        write_json_atomic(tmp / MARKER, {"written_by": "lrgptq", "files": sorted(os.listdir(tmp))})
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


def regular_file(path: Path, limit: Optional[int] = None) -> int:
    """The size of ``path``, which must be a regular file (a link to one is fine) of at most
    ``limit`` bytes; ValueError otherwise. Nothing is read: a FIFO, a device or a socket is refused
    without opening it for reading (which could block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: missing") from err
    except OSError as err:
        raise ValueError(f"{path}: cannot stat it ({err})") from err
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, device, socket or directory); refusing to read it")
    if limit is not None and st.st_size > limit:
        raise ValueError(f"{path}: {st.st_size} bytes, more than the {limit} this reader accepts")
    return st.st_size


def read_json(path: Path) -> Dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as err:
        raise ValueError(f"{path}: missing") from err
    except OSError as err:
        raise ValueError(f"{path}: not readable ({err})") from err
    st = os.fstat(fd)  # of what was opened: no swap between a check and the read
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a FIFO, device, socket or directory); refusing to read it")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path}: {st.st_size} bytes, more than the {MAX_JSON_BYTES} (MAX_JSON_BYTES) "
                             "lrgptq parses as JSON")
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: more than the {MAX_JSON_BYTES} bytes (MAX_JSON_BYTES) lrgptq parses as JSON")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not readable JSON ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def tensor_files(root: Path) -> Dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    from safetensors import safe_open

    index = root / INDEX
    if os.path.lexists(index):
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names")
        if len(wm) > MAX_TENSORS:
            raise ValueError(f"{index}: {len(wm)} tensors, more than the {MAX_TENSORS} (MAX_TENSORS) lrgptq loads")
        for fname in set(wm.values()):
            if Path(fname).name != fname or not (root / fname).is_file():
                raise ValueError(f"{index}: names {fname!r}, which is not a file in {root}")
            _check_header(root / fname)
        return {k: root / v for k, v in wm.items()}
    single = root / SINGLE
    if not os.path.lexists(single):
        raise ValueError(f"{root}: no {SINGLE} and no {INDEX}")
    _check_header(single)
    try:
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{single}: not a readable safetensors file ({err})") from err


def _check_header(path: Path) -> None:
    """A regular file whose safetensors header length is within ``MAX_HEADER_BYTES``."""
    size = regular_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 0 or n > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"{path}: not a readable safetensors file (header length {n}; the file has {size} bytes "
                         f"and lrgptq reads headers up to {MAX_HEADER_BYTES} bytes)")


class TensorReader:
    """Reads tensors by name from their files, turning any read failure into a ValueError."""

    def __init__(self, files: Dict[str, Path]) -> None:
        self.files = files
        self.stack = contextlib.ExitStack()
        self.handles: Dict[Path, Any] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def __call__(self, key: str) -> torch.Tensor:
        return self._read(key, lambda h: h.get_tensor(key))

    def slice(self, key: str) -> Any:
        """``key`` as a safetensors slice: ``get_shape()``, and ``[a:b]`` reads those rows alone."""
        return self._read(key, lambda h: h.get_slice(key))

    def _read(self, key: str, get: Any) -> Any:
        from safetensors import safe_open

        path = self.files[key]
        try:
            if path not in self.handles:
                self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
            return get(self.handles[path])
        except Exception as err:  # truncated, corrupt, or a name the index promised but the file lacks
            raise ValueError(f"{path}: cannot read tensor {key} ({err})") from err


def no_init() -> contextlib.AbstractContextManager:
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
        with no_init():
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
