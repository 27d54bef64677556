"""quantize_streamed: quantize a model from its safetensors files without ever holding all of it.

The model is built with every parameter on the meta device (buffers such as rotary tables are
real: they are computed, not stored). The parameters outside the blocks (embeddings, norms) are
read only to catch the first block's inputs, then dropped. Each block is then read from the
files (mmap), upcast to float32, quantized by the same per-block step as ``quantize_model``
(:class:`lrgptq.pipeline.BlockStep`), written to its own safetensors file, and dropped. Peak
memory: one block in float32 + the calibration activations + the accumulators (+ the
embedding while the first inputs are caught). With ``spill=True`` the activations between blocks
live in a file (memory-mapped) instead of in memory.

Output: a GPTQ checkpoint (what ``lrgptq.load`` and other GPTQ readers take): one
``model-block-NNNNN.safetensors`` per block, ``model-rest.safetensors`` (the tensors outside the
blocks), ``model.safetensors.index.json``, ``quantize_config.json`` and, written last,
``config.json``. Every file is written under a temporary name and renamed into place; the
manifest ``lrgptq-stream.json`` records each finished block after its file is in place, and the
run's key (a hash of the model's config and files, the quantization settings and the calibration
tokens). A run stopped after block k restarts at block k + 1: the inputs of that block are read
back from the spill file, or recomputed by running blocks 0..k with the weights their files hold.

The next block always sees the weights the checkpoint holds (dequantized from what was written,
scales in ``dtype``), so a resumed run writes the same bytes as an uninterrupted one. With
``dtype=torch.float32`` these are exactly the engine's weights, as in ``quantize_model``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from . import checkpoint
from .calib import Calib, calibration_batches
from .capture import BlockInput, first_block_inputs
from .config import QuantConfig
from .distributed import Comm
from .formats import gptq
from .linear import QuantResult
from .models import find_blocks, set_weight_matrix
from .nn import QuantLinear
from .pipeline import BlockStep, ModelReport, _progress, eval_mode, next_inputs
from . import ops

MANIFEST = "lrgptq-stream.json"
REST = "model-rest.safetensors"
VERSION = 1


def block_file(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the context lands on the meta device (no memory);
    buffers stay real, so what a module computes at construction (rotary tables) is kept."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(model_dir: Path) -> nn.Module:
    """The architecture of ``model_dir``/config.json with its parameters on the meta device."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with params_on_meta(), checkpoint._no_init():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _load_params(module: nn.Module, prefix: str, files: Dict[str, Path], where: Path) -> None:
    """Reads every parameter of ``module`` (state-dict names under ``prefix``) from the files,
    upcast to float32; a parameter the files lack must be tied to one they hold. The files are
    mapped only meanwhile: pages of a mapping left open would count as the process' memory."""
    missing = []
    with checkpoint._Reader(files) as read:
        for name, param in module.named_parameters(remove_duplicate=False):
            key = prefix + name
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if key in files:
                t = read(key)
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(f"{files[key]}: {key} is {tuple(t.shape)}, the model needs {tuple(param.shape)}")
                owner._parameters[leaf] = nn.Parameter(t.float() if t.is_floating_point() else t, requires_grad=False)
            elif param.device.type == "meta":
                missing.append((owner, leaf, key))
    if missing and hasattr(module, "tie_weights"):
        module.tie_weights()
    for owner, leaf, key in missing:
        if owner._parameters[leaf].device.type == "meta":
            raise ValueError(f"{where}: tensor {key} is missing from the model's safetensors files")


def _drop_params(module: nn.Module) -> None:
    """Gives the memory of ``module``'s parameters back: each goes back to the meta device."""
    for sub in module.modules():
        for leaf, p in sub._parameters.items():
            if p is not None and p.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    _trim_heap()


def _trim_heap() -> None:
    """Returns freed heap pages to the system (glibc's malloc_trim). Without it, blocks of mixed
    sizes fragment the heap and the resident size creeps up by about a megabyte per block."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _run_key(model_dir: Path, files: Dict[str, Path], model: nn.Module, batches: List[Any],
             settings: Dict[str, Any]) -> str:
    """What a resumed run must share with the run that wrote the manifest."""
    h = hashlib.sha256()
    sizes = {str(p.name): p.stat().st_size for p in set(files.values())}
    h.update(json.dumps({"config": model.config.to_dict(), "files": sizes, **settings},
                        sort_keys=True, default=str).encode())
    for b in batches:
        ids = b["input_ids"] if isinstance(b, dict) else b
        h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _open_manifest(out: Path, key: str, comm: Comm) -> Dict[str, Any]:
    path = out / MANIFEST
    if comm.is_writer:
        if path.is_file():
            manifest = checkpoint._read_json(path)
            if manifest.get("key") != key:
                raise ValueError(
                    f"{path}: this directory holds a streamed run of another model, settings or calibration "
                    "data; resume with the same ones, or write to a new directory"
                )
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty directory nor a streamed run; refusing to write there")
        else:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json_atomic(path, {"version": VERSION, "key": key, "blocks": {}})
    comm.barrier()
    return checkpoint._read_json(path)


def _stored_weights(block: nn.Module, prefix: str, modules: Dict[str, QuantLinear]) -> None:
    """Sets each quantized linear of ``block`` to the weights its packed tensors hold."""
    for name, packed in modules.items():
        set_weight_matrix(block.get_submodule(name[len(prefix):]), packed.dequantize(torch.float32))


def _read_block(out: Path, entry: Dict[str, Any], cfg: QuantConfig, block: nn.Module, prefix: str) -> None:
    """Puts a finished block's written weights back into ``block`` (for recomputing activations)."""
    from safetensors.torch import load_file

    path = out / entry["file"]
    tensors = load_file(str(path))
    settings = gptq.Settings(cfg.bits, cfg.group_size, cfg.sym, True, entry["checkpoint_format"])
    modules = {}
    for name in gptq.quantized_names(tensors):
        linear = block.get_submodule(name[len(prefix):])
        own = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
        modules[name] = gptq.load_module(settings, name, linear, own, str(path))
    _stored_weights(block, prefix, modules)


def _spill_path(out: Path, comm: Comm) -> Path:
    return out / f"activations-rank{comm.rank}.pt"


def _spill(path: Path, block: int, inputs: List[BlockInput]) -> List[BlockInput]:
    """Writes the hidden states entering ``block`` to ``path`` and returns inputs that read them
    memory-mapped from there."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"block": block, "hidden": [args[0] for args, _ in inputs]}, tmp)
    os.replace(tmp, path)
    return _unspill(path, block, inputs)


def _unspill(path: Path, block: int, inputs: List[BlockInput]) -> Optional[List[BlockInput]]:
    if not path.is_file():
        return None
    saved = torch.load(path, mmap=True, weights_only=True)
    if saved.get("block") != block or len(saved["hidden"]) != len(inputs):
        return None
    return [((h,) + args[1:], kw) for h, (args, kw) in zip(saved["hidden"], inputs)]


@torch.no_grad()
def quantize_streamed(
    model_dir: Any,
    calib: Calib,
    out_dir: Any,
    config: Optional[QuantConfig] = None,
    *,
    tokenizer: Any = None,
    blocks: Optional[str] = None,
    skip: Sequence[str] = (),
    true_sequential: bool = True,
    max_length: int = 2048,
    checkpoint_format: str = "auto",
    dtype: torch.dtype = torch.float16,
    spill: bool = False,
    comm: Optional[Comm] = None,
    progress: bool = True,
    on_block: Optional[Callable[[int], None]] = None,
) -> ModelReport:
    """Quantizes the model in ``model_dir`` (a transformers directory: config.json and safetensors
    files) block by block into a GPTQ checkpoint in ``out_dir``, resuming a run stopped there.

    ``calib``, ``tokenizer``, ``blocks``, ``skip``, ``true_sequential``, ``max_length`` and
    ``comm``: as in :func:`lrgptq.quantize_model`. ``checkpoint_format`` and ``dtype``: as in
    :func:`lrgptq.save`. ``spill``: keep the activations between blocks in a file in ``out_dir``
    instead of in memory. ``on_block(i)`` is called once block ``i`` is safely on disk. The
    report has a row per layer (also those of blocks a previous run finished) and no ``results``
    (the codes are on disk, not in memory).
    """
    cfg = config if config is not None else QuantConfig()
    comm = comm if comm is not None else Comm()
    if checkpoint_format not in ("auto",) + gptq.FORMATS:
        raise ValueError(f"checkpoint_format must be 'auto' or one of {gptq.FORMATS}, got {checkpoint_format!r}")
    if dtype not in gptq.SCALE_DTYPES:
        raise ValueError(f"dtype (of scales and the tensors that are not quantized) must be one of "
                         f"{gptq.SCALE_DTYPES}, got {dtype}")
    start = time.perf_counter()
    src, out = Path(model_dir), Path(out_dir).absolute()
    files = checkpoint._tensor_files(src)
    model = empty_model(src)
    all_batches = calibration_batches(calib, tokenizer, max_length=max_length)
    block_path, block_list = find_blocks(model, blocks)
    settings = {"quant": cfg.to_dict(), "skip": sorted(skip), "true_sequential": true_sequential,
                "blocks": block_path, "format": checkpoint_format, "dtype": str(dtype)}
    key = _run_key(src, files, model, all_batches, settings)
    batches = comm.split(all_batches)
    manifest = _open_manifest(out, key, comm)
    done: Dict[str, Any] = manifest["blocks"]
    report = ModelReport(cfg, true_sequential=true_sequential)
    bar = _progress(len(block_list), progress and comm.is_writer)
    step = BlockStep(cfg, block_path, report, tuple(skip), true_sequential, comm, None, bar)
    rtn = cfg.route == "rtn"
    first = 0
    while str(first) in done:
        report.layers.extend(done[str(first)]["layers"])
        first += 1
    try:
        with eval_mode(model):
            inputs: List[BlockInput] = []
            if not rtn and first < len(block_list):
                inputs = _first_inputs(model, block_path, files, src, block_list[0], batches)
                inputs = _resume_inputs(model, block_path, block_list, first, inputs, done, cfg, out,
                                        files, src, comm, spill)
            if bar is not None:
                bar.update(first)
            for i in range(first, len(block_list)):
                block, prefix = block_list[i], f"{block_path}.{i}."
                _load_params(block, prefix, files, src)
                results = step.quantize_block(i, block, inputs)
                rows = [r for r in report.layers if r["block"] == i]
                entry = _write_block(model, out, i, prefix, results, rows, cfg, true_sequential, checkpoint_format, dtype,
                                     comm, block)
                if not rtn:
                    inputs = next_inputs(block, inputs)
                    if spill:
                        inputs = _spill(_spill_path(out, comm), i + 1, inputs)
                comm.barrier()
                if comm.is_writer:  # the block's file is in place: record it
                    done[str(i)] = entry
                    checkpoint.write_json_atomic(out / MANIFEST, manifest)
                _drop_params(block)
                if bar is not None:
                    bar.update(1)
                if on_block is not None:
                    on_block(i)
            if comm.is_writer:
                _finish(model, out, manifest, block_path, cfg, true_sequential, checkpoint_format, dtype, files,
                        tokenizer)
            comm.barrier()
    finally:
        if bar is not None:
            bar.close()
    _spill_path(out, comm).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def _first_inputs(model: nn.Module, block_path: str, files: Dict[str, Path], src: Path,
                  block: nn.Module, batches: List[Any]) -> List[BlockInput]:
    """The first block's inputs, with the parameters outside the blocks loaded only meanwhile."""
    parent_path, _, leaf = block_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = parent._modules[leaf]
    parent._modules[leaf] = nn.ModuleList()  # hide the blocks: load only what lies outside them
    try:
        _load_params(model, "", files, src)
    finally:
        parent._modules[leaf] = blocks
    try:
        return first_block_inputs(model, block, batches)
    finally:
        _drop_params(model)


def _resume_inputs(model: nn.Module, block_path: str, block_list: nn.ModuleList, first: int,
                   inputs: List[BlockInput], done: Dict[str, Any], cfg: QuantConfig, out: Path,
                   files: Dict[str, Path], src: Path, comm: Comm, spill: bool) -> List[BlockInput]:
    """The inputs of block ``first``: from the spill file, or by running the finished blocks with
    the weights their files hold."""
    if first == 0:
        return inputs
    if spill:
        back = _unspill(_spill_path(out, comm), first, inputs)
        if back is not None:
            return back
    for i in range(first):
        block, prefix = block_list[i], f"{block_path}.{i}."
        _load_params(block, prefix, files, src)
        _read_block(out, done[str(i)], cfg, block, prefix)
        inputs = next_inputs(block, inputs)
        _drop_params(block)
    return inputs


def _write_block(model: nn.Module, out: Path, i: int, prefix: str, results: Dict[str, QuantResult],
                 rows: List[dict], cfg: QuantConfig, true_sequential: bool, request: str, dtype: torch.dtype,
                 comm: Comm, block: nn.Module) -> Dict[str, Any]:
    """Packs block ``i`` (every rank: the next block needs the stored weights), writes its file
    (rank 0) and returns its manifest entry."""
    part = SimpleNamespace(config=cfg, results=results, layers=rows, true_sequential=true_sequential)
    prepared = gptq.prepare(model, part, request, dtype)
    tensors = checkpoint._tensors_to_save(model, prepared.modules, dtype, include=lambda k: k.startswith(prefix))
    if comm.is_writer:
        checkpoint.save_file_atomic(tensors, out / block_file(i))
    _stored_weights(block, prefix, prepared.modules)
    info = prepared.info
    return {"file": block_file(i), "checkpoint_format": info["checkpoint_format"], "desc_act": info["desc_act"],
            "zero_point_layers": info["zero_point_layers"], "layers": rows, "keys": sorted(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def _to_v2(path: Path, bits: int) -> None:
    """Rewrites a block file's v1 zero points (z − 1) as v2 (z)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        out_features = tensors[key[: -len("qzeros")] + "scales"].shape[1]
        z = ops.unpack_bits(tensors[key], bits, 1, out_features).to(torch.int32) + 1
        tensors[key] = ops.pack_bits(z, bits, 1)
    checkpoint.save_file_atomic(tensors, path)


def _finish(model: nn.Module, out: Path, manifest: Dict[str, Any], block_path: str, cfg: QuantConfig,
            true_sequential: bool, checkpoint_format: str, dtype: torch.dtype, files: Dict[str, Path],
            tokenizer: Any) -> None:
    """Writes the tensors outside the blocks, the index and the configs (config.json last)."""
    entries = [manifest["blocks"][k] for k in sorted(manifest["blocks"], key=int)]
    fmt = checkpoint_format
    if fmt == "auto":
        fmt = gptq.default_format(cfg.sym)
    for e in entries:
        if e["checkpoint_format"] != fmt:
            _to_v2(out / e["file"], cfg.bits)
            e["checkpoint_format"] = fmt
            checkpoint.write_json_atomic(out / MANIFEST, manifest)
    wanted = [k for k in model.state_dict() if not k.startswith(block_path + ".")]
    with checkpoint._Reader(files) as read:
        rest = {k: checkpoint.cast_checked(k, read(k), dtype) for k in wanted if k in files}
    checkpoint.save_file_atomic(rest, out / REST)
    weight_map = {k: e["file"] for e in entries for k in e["keys"]}
    weight_map.update({k: REST for k in rest})
    total = sum(t.numel() * t.element_size() for t in rest.values())
    total += sum(e["bytes"] for e in entries)
    checkpoint.write_json_atomic(out / checkpoint.INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    layers = [r for e in entries for r in e["layers"]]
    qc = gptq.quantization_config(cfg, layers, any(e["desc_act"] for e in entries), fmt, False, true_sequential,
                                  dtype)
    checkpoint.write_json_atomic(out / "quantize_config.json", qc)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    checkpoint.write_json_atomic(out / "config.json", checkpoint.model_config(model, dtype, qc))
