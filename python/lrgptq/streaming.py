"""quantize_streamed: quantize a model from its safetensors files without ever holding all of it.

The model is built with every parameter on the meta device (buffers such as rotary tables are
real: they are computed, not stored). The parameters outside the blocks (embeddings, norms) are
read only to catch the first block's inputs, then dropped. Each block is then read from the
files (mmap), upcast to float32, quantized by the same per-block step as ``quantize_model``
(:class:`lrgptq.pipeline.BlockStep`), written to its own safetensors file, and dropped. Peak
memory: one block in float32 + the calibration activations + the accumulators (+ the
embedding while the first inputs are caught). With ``spill=True`` the activations between blocks
live in a file (memory-mapped) instead of in memory. A block whose fused MoE experts (3-D
parameters) hold more than ``expert_budget`` bytes in float32 keeps them in a scratch file in the
output directory, mapped shared and filled one expert at a time from the model's files: each
expert's pages are read when its tokens are caught, quantized and written back, and the kernel
writes them out and drops them under memory pressure, so the block is worked on expert by expert
and its experts never need to fit in memory together.

Output: the checkpoint ``lrgptq.save`` writes (GPTQ, or the gptvq layout for a GPTVQ config),
through the same :class:`lrgptq.writer.CheckpointWriter`, in other files: one
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
import math
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from . import checkpoint, moe
from .advice import warn_after_run, warn_unused_options
from .calib import Calib, calibration_batches, vocab_size
from .capture import BlockInput, first_block_inputs
from .config import QuantConfig
from .distributed import Comm
from .models import find_blocks, set_weight_matrix
from .pipeline import BlockStep, ModelReport, eval_mode, next_inputs, progress_bar
from .results import LayerResult
from .writer import (CheckpointWriter, cast_checked, save_file_atomic, tensor_bytes, write_index,
                     write_json_atomic)

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
    with params_on_meta(), checkpoint.no_init():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _load_params(module: nn.Module, prefix: str, files: Dict[str, Path], where: Path,
                 scratch: Optional["ExpertFiles"] = None) -> None:
    """Reads every parameter of ``module`` (state-dict names under ``prefix``) from the files,
    upcast to float32; a parameter the files lack must be tied to one they hold. The files are
    mapped only meanwhile: pages of a mapping left open would count as the process' memory.
    Fused MoE experts (3-D) are read expert by expert (:func:`expert_reader`: fused or per-expert
    tensors in the files); with ``scratch`` they are mapped from scratch files instead of held
    in memory (:func:`load_experts`)."""
    missing = []
    with checkpoint.TensorReader(files) as read:
        for name, param in module.named_parameters(remove_duplicate=False):
            key = prefix + name
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            expert = (expert_reader(read, key, tuple(param.shape), files)
                      if param.dim() == 3 and param.is_floating_point() else None)
            if expert is not None:  # fused MoE experts, read expert by expert
                t = load_experts(expert, key, tuple(param.shape), where, scratch)
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            elif key in files:
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


# transformers 5 saves fused experts per expert (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek, ... share
# this layout): the rows of each expert's fused matrix, in order, are these matrices stacked.
PER_EXPERT = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def expert_reader(read: checkpoint.TensorReader, key: str, shape: tuple,
                  files: Dict[str, Path]) -> Optional[Callable[[int], torch.Tensor]]:
    """Expert e of the fused parameter ``key`` (shape (E, ...)), read alone: its slice of the 3-D
    tensor when the files hold it under the model's name, else its per-expert matrices as
    transformers 5 saves them (``<experts>.<e>.gate_proj.weight`` and ``up_proj`` stacked for
    ``gate_up_proj``, ``<experts>.<e>.down_proj.weight``). None: the files hold neither."""
    if key in files:
        part = read.slice(key)
        if tuple(part.get_shape()) != shape:
            raise ValueError(f"{files[key]}: {key} is {tuple(part.get_shape())}, the model needs {shape}")
        return lambda e: part[e : e + 1][0]
    path, _, leaf = key.rpartition(".")
    names = [[f"{path}.{e}.{role}.weight" for role in PER_EXPERT.get(leaf, ())] for e in range(shape[0])]
    if not names or not names[0] or any(n not in files for per in names for n in per):
        return None
    return lambda e: torch.cat([read(n) for n in names[e]])


class ExpertFiles:
    """Scratch files for one block's fused experts, each mapped shared, so that their pages are the
    files' and not anonymous memory: the kernel reads an expert's pages in when it is used and may
    drop them under memory pressure once they are written back. :meth:`flush` writes them back:
    cgroup v1 has no per-cgroup writeback, so under its memory cap dirty pages may wait for the
    system-wide flusher while the cap is reached."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.maps: List[mmap.mmap] = []

    def empty(self, key: str, shape: tuple) -> torch.Tensor:
        """A float32 tensor of ``shape`` in a new scratch file for parameter ``key``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        size = 4 * math.prod(shape)
        with open(self.folder / f"{key}.f32", "w+b") as f:
            f.truncate(size)
            mm = mmap.mmap(f.fileno(), size)  # MAP_SHARED: writes go to the file
        self.maps.append(mm)
        return torch.frombuffer(mm, dtype=torch.float32).view(shape)

    def flush(self) -> None:
        """Writes every dirty page back to the files (they stay mapped, now droppable)."""
        for mm in self.maps:
            mm.flush()

    def close(self) -> None:
        """Unmaps (once no tensor holds a mapping) and deletes the files."""
        for mm in self.maps:
            with contextlib.suppress(BufferError):  # a tensor still views it: unmapped when freed
                mm.close()
        self.maps = []
        shutil.rmtree(self.folder, ignore_errors=True)


def load_experts(expert: Callable[[int], torch.Tensor], key: str, shape: tuple, where: Path,
                 files: Optional[ExpertFiles] = None) -> torch.Tensor:
    """The fused parameter ``key`` in float32, filled one expert (index of the first dimension) at
    a time from ``expert(e)``: in memory, or with ``files`` in a mapped scratch file, written back
    expert by expert (:class:`ExpertFiles`)."""
    t = torch.empty(shape, dtype=torch.float32) if files is None else files.empty(key, shape)
    for e in range(shape[0]):
        try:
            x = expert(e)
        except Exception as err:  # a truncated or corrupt file
            raise ValueError(f"{where}: cannot read expert {e} of {key} ({err})") from err
        if tuple(x.shape) != shape[1:]:
            raise ValueError(f"{where}: expert {e} of {key} is {tuple(x.shape)}, the model needs {shape[1:]}")
        t[e].copy_(x)
        if files is not None:
            files.flush()
    return t


def fused_expert_bytes(block: nn.Module) -> int:
    """Float32 bytes of ``block``'s 3-D parameters (fused MoE experts), from their shapes."""
    return sum(4 * p.numel() for p in block.parameters() if p.dim() == 3)


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


def _stored_weights(block: nn.Module, prefix: str, modules: Dict[str, nn.Module],
                    after: Callable[[], None] = lambda: None) -> None:
    """Sets each quantized linear of ``block`` to the weights its packed module holds (MoE
    experts through views of their fused parameters); ``after()`` follows each."""
    with moe.unfused(block):
        for name, packed in modules.items():
            set_weight_matrix(block.get_submodule(name[len(prefix):]), packed.dequantize())
            after()


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


class _Run:
    """One streamed run: the model read from ``src`` (``files``: tensor name -> file), the
    checkpoint written to ``out`` by ``writer``, the manifest of the blocks already there."""

    def __init__(self, src: Path, out: Path, model: nn.Module, block_path: str, blocks: nn.ModuleList,
                 writer: CheckpointWriter, comm: Comm, spill: bool, expert_budget: Optional[int] = None) -> None:
        self.src, self.out, self.model, self.writer, self.comm, self.spill = src, out, model, writer, comm, spill
        self.files = checkpoint.tensor_files(src)
        self.block_path, self.blocks = block_path, blocks
        self.manifest: Dict[str, Any] = {}
        self.spill_path = out / f"activations-rank{comm.rank}.pt"
        self.expert_budget = expert_budget
        self.scratch = ExpertFiles(out / f"experts-rank{comm.rank}")  # the mapped experts of the block at hand

    @property
    def done(self) -> Dict[str, Any]:
        """Block index (a string) -> its manifest entry, for the blocks whose file is in place."""
        return self.manifest["blocks"]

    def prefix(self, i: int) -> str:
        return f"{self.block_path}.{i}."

    def open_manifest(self, key: str) -> None:
        """Reads the manifest of a run with this ``key`` in ``out``, or starts one (rank 0)."""
        path = self.out / MANIFEST
        if self.comm.is_writer:
            if checkpoint.check_target(self.out, MANIFEST, "write a streamed checkpoint"):
                if checkpoint.read_json(path).get("key") != key:
                    raise ValueError(
                        f"{path}: this directory holds a streamed run of another model, settings or calibration "
                        "data; resume with the same ones, or write to a new directory"
                    )
            else:
                self.out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, {"version": VERSION, "key": key, "blocks": {}})
        self.comm.barrier()
        self.manifest = checkpoint.read_json(path)

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its parameters read from the model's files (float32); its fused
        experts mapped from a scratch file when they hold more than the budget."""
        block = self.blocks[i]
        mapped = self.expert_budget is not None and fused_expert_bytes(block) > self.expert_budget
        _load_params(block, self.prefix(i), self.files, self.src, self.scratch if mapped else None)
        return block

    def after_layer(self) -> None:
        """Once a layer holds its quantized weight: mapped experts written back; with a budget,
        the heap's free pages returned (a subset's runs free 8 MB accumulators between the 1 MB
        codes they keep: left in the heap, the holes grew a 1.5 GB MoE block's resident size by
        ~0.6 GB)."""
        self.scratch.flush()
        if self.expert_budget is not None:
            _trim_heap()

    def drop_block(self, block: nn.Module) -> None:
        """Gives a block's memory back, and its mapped experts' scratch files."""
        _drop_params(block)
        self.scratch.close()

    def first_inputs(self, batches: List[Any]) -> List[BlockInput]:
        """The first block's inputs, with the parameters outside the blocks loaded only meanwhile."""
        parent_path, _, leaf = self.block_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        parent._modules[leaf] = nn.ModuleList()  # hide the blocks: load only what lies outside them
        try:
            _load_params(self.model, "", self.files, self.src)
        finally:
            parent._modules[leaf] = self.blocks
        try:
            return first_block_inputs(self.model, self.blocks[0], batches)
        finally:
            _drop_params(self.model)

    def resume_inputs(self, first: int, inputs: List[BlockInput]) -> List[BlockInput]:
        """The inputs of block ``first``: from the spill file, or by running the finished blocks
        with the weights their files hold."""
        if first == 0:
            return inputs
        if self.spill:
            back = _unspill(self.spill_path, first, inputs)
            if back is not None:
                return back
        for i in range(first):
            block = self.load_block(i)
            self.read_block(i, block)
            inputs = next_inputs(block, inputs)
            self.drop_block(block)
        return inputs

    def write_block(self, i: int, block: nn.Module, results: Dict[str, LayerResult], rows: List[dict]) -> None:
        """Packs block ``i`` (every rank: the next block needs the stored weights), writes its
        file (rank 0), sets ``block``'s weights to what the file holds; once every rank is there,
        records it in the manifest."""
        prefix = self.prefix(i)
        part = self.writer.pack(results, rows, include=lambda k: k.startswith(prefix))
        if self.comm.is_writer:
            save_file_atomic(part.tensors, self.out / block_file(i))
        _stored_weights(block, prefix, part.modules, self.scratch.flush)
        self.comm.barrier()
        if self.comm.is_writer:  # the block's file is in place: record it
            self.done[str(i)] = {"file": block_file(i), **part.info, "layers": rows, "keys": sorted(part.tensors),
                                 "bytes": part.bytes}
            write_json_atomic(self.out / MANIFEST, self.manifest)

    def read_block(self, i: int, block: nn.Module) -> None:
        """Puts a finished block's written weights back into ``block`` (for recomputing activations)."""
        from safetensors.torch import load_file

        entry, prefix, layout = self.done[str(i)], self.prefix(i), self.writer.layout
        path = self.out / entry["file"]
        tensors = load_file(str(path))
        settings = layout.parse_config(self.writer.quantization_config(entry["layers"], entry), str(path))
        modules = {}
        with moe.unfused(block):
            for name in layout.quantized_names(tensors):
                own = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
                modules[name] = layout.load_module(settings, name, block.get_submodule(name[len(prefix):]), own,
                                                   str(path))
        _stored_weights(block, prefix, modules, self.scratch.flush)

    def finish(self, tokenizer: Any) -> None:
        """Writes the tensors outside the blocks, the index and the configs (config.json last)."""
        from safetensors.torch import load_file

        entries = [self.done[k] for k in sorted(self.done, key=int)]
        info = self.writer.merge(entries)
        for e in entries:
            if e["checkpoint_format"] != info["checkpoint_format"]:
                path = self.out / e["file"]
                save_file_atomic(self.writer.convert(load_file(str(path)), e, info["checkpoint_format"]), path)
                e["checkpoint_format"] = info["checkpoint_format"]
                write_json_atomic(self.out / MANIFEST, self.manifest)
        # The model's parameters are on the meta device: the tensors outside the blocks come from the files.
        wanted = [k for k in self.model.state_dict() if k in self.files and not k.startswith(self.block_path + ".")]
        with checkpoint.TensorReader(self.files) as read:
            tensors = {k: cast_checked(k, read(k), self.writer.dtype) for k in wanted}
        save_file_atomic(tensors, self.out / REST)
        weight_map = {k: e["file"] for e in entries for k in e["keys"]}
        weight_map.update({k: REST for k in tensors})
        write_index(self.out, weight_map, tensor_bytes(tensors) + sum(e["bytes"] for e in entries))
        layers = [r for e in entries for r in e["layers"]]
        self.writer.write_configs(self.out, self.writer.quantization_config(layers, info), tokenizer)


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
    expert_budget: Optional[int] = None,
    comm: Optional[Comm] = None,
    progress: bool = True,
    on_block: Optional[Callable[[int], None]] = None,
) -> ModelReport:
    """Quantizes the model in ``model_dir`` (a transformers directory: config.json and safetensors
    files) block by block into a checkpoint in ``out_dir`` (as :func:`lrgptq.save` writes it:
    GPTQ, or gptvq for a GPTVQ config), resuming a run stopped there.

    ``calib``, ``tokenizer``, ``blocks``, ``skip``, ``true_sequential``, ``max_length`` and
    ``comm``: as in :func:`lrgptq.quantize_model`. ``checkpoint_format`` and ``dtype``: as in
    :func:`lrgptq.save`. ``spill``: keep the activations between blocks in a file in ``out_dir``
    instead of in memory. ``expert_budget``: bytes; a block whose fused MoE experts take more
    in float32 maps them from a scratch file in ``out_dir`` and is worked on expert by expert,
    and a subset whose accumulators and factors would take more (an MoE's experts) is captured,
    factored and quantized in runs of layers that fit, one forward pass per run (None: no bound;
    0: every block with fused experts mapped, one expert per run). The checkpoint is the same
    byte for byte either way, so a resumed run may use another budget. ``on_block(i)``
    is called once block ``i`` is safely on disk. The
    report has a row per layer (also those of blocks a previous run finished) and no ``results``
    (the codes are on disk, not in memory).
    """
    cfg = config if config is not None else QuantConfig.for_method("lrgptq")
    comm = comm if comm is not None else Comm()
    warn_unused_options(cfg)
    start = time.perf_counter()
    src, out = Path(model_dir), Path(out_dir).absolute()
    model = empty_model(src)
    writer = CheckpointWriter(model, cfg, checkpoint_format=checkpoint_format, dtype=dtype,
                              true_sequential=true_sequential)
    all_batches = calibration_batches(calib, tokenizer, max_length=max_length, vocab_size=vocab_size(model))
    block_path, block_list = find_blocks(model, blocks)
    if expert_budget is not None and expert_budget < 0:
        raise ValueError(f"expert_budget={expert_budget}: give bytes >= 0, or None to hold every block in memory")
    run = _Run(src, out, model, block_path, block_list, writer, comm, spill, expert_budget)
    settings = {"quant": cfg.to_dict(), "skip": sorted(skip), "true_sequential": true_sequential,
                "blocks": block_path, "format": checkpoint_format, "dtype": str(dtype)}
    key = _run_key(src, run.files, model, all_batches, settings)
    batches = comm.split(all_batches)
    run.open_manifest(key)
    report = ModelReport(cfg, true_sequential=true_sequential)
    bar = progress_bar(len(block_list), progress and comm.is_writer)
    step = BlockStep(cfg, block_path, report, tuple(skip), true_sequential, comm, None, bar,
                     on_layer=run.after_layer, accumulator_budget=expert_budget)
    rtn = cfg.route == "rtn"
    first = 0
    while str(first) in run.done:
        report.layers.extend(run.done[str(first)]["layers"])
        first += 1
    try:
        with eval_mode(model):
            inputs: List[BlockInput] = []
            if not rtn and first < len(block_list):
                inputs = run.resume_inputs(first, run.first_inputs(batches))
            if bar is not None:
                bar.update(first)
            for i in range(first, len(block_list)):
                block = run.load_block(i)
                results = step.quantize_block(i, block, inputs)
                run.write_block(i, block, results, [r for r in report.layers if r["block"] == i])
                del results  # the block's codes are on disk: not held through the next block
                if not rtn:
                    inputs = next_inputs(block, inputs)
                    if spill:
                        inputs = _spill(run.spill_path, i + 1, inputs)
                run.drop_block(block)
                if bar is not None:
                    bar.update(1)
                if on_block is not None:
                    on_block(i)
            if comm.is_writer:
                run.finish(tokenizer)
            comm.barrier()
    finally:
        if bar is not None:
            bar.close()
        run.scratch.close()  # GBs of mapped experts: never left behind
    run.spill_path.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    warn_after_run(report.layers, cfg)
    return report
