"""quantize_model: walk the blocks, capture each linear's inputs, quantize, feed the next block.

For each block: its linears are split into sequential subsets (the layers that read the same
input, in execution order: q/k/v, then o, then gate/up, then down). With ``true_sequential``
each subset's inputs are captured after the subsets before it were quantized. Fused MoE experts
(transformers 5's 3-D parameters) are per-expert linears for the time their block is quantized
(lrgptq.moe): every expert's gate/up in one subset, then every expert's down. The block is then
re-run to produce the next block's inputs from the quantized block. If anything fails, every
weight already changed is put back and the hooks are gone.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import moe
from .accumulate import Accumulator
from .advice import warn_after_run, warn_unused_options
from .calib import Calib, calibration_batches, vocab_size
from .capture import BlockInput, StopForward, first_block_inputs, in_features, input_hooks
from .config import QuantConfig
from .distributed import Comm
from .linear import factorize_shared, make_accumulator, quantize_shared
from .models import find_blocks, find_linears, set_weight_matrix, weight_matrix
from .results import LayerResult


@dataclass
class ModelReport:
    """What quantize_model did: a row per layer, and the engine's result per layer name."""

    config: QuantConfig
    layers: List[dict] = field(default_factory=list)
    results: Dict[str, LayerResult] = field(default_factory=dict)
    seconds: float = 0.0
    true_sequential: bool = True  # as quantize_model ran (checkpoints record it)

    def table(self) -> str:
        head = f"{'layer':<48} {'shape':>12} {'tokens':>7} {'rank':>6} {'loss':>11} {'clip %':>7} {'note'}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r['d_out']}x{r['d']}"
            note = r.get("note", "")
            if r.get("damp_retries"):
                note = (note + f" damp raised x10^{r['damp_retries']}").strip()
            if "damp_auto" in r:
                note = (note + f" damp={r['damp_auto']} (auto)").strip()
            clip = f"{100 * r['clip_rate']:.3f}" if "clip_rate" in r else "-"
            rows.append(f"{r['name']:<48} {shape:>12} {r['tokens']:>7} {r['rank']:>6} {r['loss']:>11.4g} {clip:>7} "
                        f"{note}")
        return "\n".join(rows)


def _run_block(block: nn.Module, inputs: List[BlockInput]) -> List[Any]:
    return [block(*args, **kwargs) for args, kwargs in inputs]


def _feed_block(block: nn.Module, inputs: List[BlockInput], reset: Callable[[], None]) -> None:
    """Runs every batch through ``block`` for its hooks' sake; a hook may cut a pass short."""
    for args, kwargs in inputs:
        reset()
        try:
            block(*args, **kwargs)
        except StopForward:
            pass


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def sequential_subsets(
    block: nn.Module, linears: Dict[str, nn.Module], sample: BlockInput,
    experts: Optional[Dict[str, nn.Module]] = None,
) -> List[List[List[str]]]:
    """The block's linears as subsets in the order they first run, each a list of groups: the
    layers of a group read one tensor (so one factor serves them all). The layers of an MoE
    ``experts`` list (path -> :class:`lrgptq.moe.ExpertList`) come as two subsets where the list
    first runs: every expert's gate and up, then every expert's down (``moe.expert_subsets``)."""
    experts = experts or {}
    first_seen: Dict[str, Tuple[int, tuple]] = {}
    alive: List[torch.Tensor] = []  # held so that no freed input's address is reused by the next

    def sink(name: str, X: torch.Tensor) -> None:
        if name not in first_seen:
            alive.append(X)
            first_seen[name] = (X.data_ptr(), tuple(X.shape))

    dense = {n: m for n, m in linears.items() if moe.owner(n, list(experts)) is None}
    with input_hooks({**dense, **experts}, sink):
        block(*sample[0], **sample[1])
    subsets: Dict[Any, List[List[str]]] = {}
    for name in first_seen:  # dicts keep insertion (= execution) order
        if name in experts:
            subsets.update({(name, k): s for k, s in enumerate(moe.expert_subsets(name, experts[name], linears))})
        else:
            subsets.setdefault(first_seen[name], [[]])[0].append(name)
    out = list(subsets.values())
    unseen = [n for n in dense if n not in first_seen]  # layers no token of this batch reached
    if unseen:
        out.append([[n] for n in unseen])
    for name in experts:
        if name not in first_seen:
            out.extend(moe.expert_subsets(name, experts[name], linears))
    return out


@dataclass
class BlockStep:
    """What quantizing one block needs besides the block and its inputs; the in-memory walk
    (quantize_model) and the streamed one (streaming.quantize_streamed) share it."""

    config: QuantConfig
    block_path: str
    report: ModelReport
    skip: Tuple[str, ...] = ()
    true_sequential: bool = True
    comm: Comm = field(default_factory=Comm)
    backups: Optional[List[Tuple[nn.Module, torch.Tensor]]] = None  # weights to restore on failure
    bar: Any = None
    on_layer: Optional[Callable[[], None]] = None  # called once each layer holds its quantized weight
    # Bytes the accumulators and factors of one subset may take at once (None: no bound): a subset
    # whose layers need more (an MoE's 128 experts) is captured, factored and quantized in runs
    # that fit, one forward pass per run. Exact: a subset's layers never read each other's outputs.
    accumulator_budget: Optional[int] = None

    def quantize_block(self, i: int, block: nn.Module, inputs: List[BlockInput]) -> Dict[str, LayerResult]:
        """Quantizes block ``i``'s linears in place (subset by subset), fills the report's rows and
        returns the engine's result per layer name."""
        with moe.unfused(block, self.skip) as experts:  # fused MoE experts as per-expert linears
            return self._quantize_linears(i, block, inputs, find_linears(block, self.skip), experts)

    def _quantize_linears(self, i: int, block: nn.Module, inputs: List[BlockInput], linears: Dict[str, nn.Module],
                          experts: Dict[str, nn.Module]) -> Dict[str, LayerResult]:
        cfg, comm = self.config, self.comm
        rtn = cfg.route == "rtn"
        if rtn:  # no inputs needed: one subset, no capture, no forward passes
            subsets = [[[n] for n in linears]]
        elif self.true_sequential:
            # Which layers share an input is read from one batch; every rank must use rank 0's
            # answer (an MoE expert that rank 0's batch misses may be reached on another rank).
            subsets = comm.broadcast(sequential_subsets(block, linears, inputs[0], experts))
        else:
            subsets = [[[n] for n in linears]]
        results: Dict[str, LayerResult] = {}
        budget = self.accumulator_budget if self.true_sequential and not rtn else None
        for groups in (run for subset in subsets for run in budget_runs(subset, linears, cfg, budget)):
            modules = {n: linears[n] for g in groups for n in g}
            source = {n: g[0] for g in groups for n in g}
            # Layers that read one tensor share one accumulator and one factor.
            readers = {g[0]: modules[g[0]] for g in groups}
            accs = {
                n: make_accumulator(cfg, in_features(m), m.weight.device,
                                    token_offset=comm.token_offset)
                for n, m in readers.items()
            }
            if not rtn:
                prefix = f"{self.block_path}.{i}."
                with input_hooks(readers, lambda n, X: accumulate(accs[n], X, prefix + n),
                                 stop_when_all_seen=True) as reset:
                    _feed_block(block, inputs, reset)
            factors = factorize_shared(accs, cfg, comm)  # dealt out over the ranks
            for n, m in modules.items():
                name = f"{self.block_path}.{i}.{n}"
                t0 = time.perf_counter()
                res = quantize_shared(weight_matrix(m), factors[source[n]], cfg, comm, name)
                if self.backups is not None:
                    self.backups.append((m, m.weight.detach().clone()))
                set_weight_matrix(m, res.weight)
                res.weight = torch.empty(0)  # the module holds it; keep only what packing needs
                if self.on_layer is not None:
                    self.on_layer()
                results[name] = res
                row = {"name": name, "block": i, "d_out": res.shape[0], "d": res.shape[1],
                       "seconds": time.perf_counter() - t0, **res.report}
                self.report.layers.append(row)
                if self.bar is not None:
                    self.bar.set_postfix_str(f"{n} rank {res.rank} loss {res.loss:.3g}")
        return results


def budget_runs(groups: List[List[str]], linears: Dict[str, nn.Module], config: QuantConfig,
                budget: Optional[int]) -> List[List[List[str]]]:
    """A subset's groups in consecutive runs whose accumulators and factors (twice the
    accumulator's float64 state per group) fit ``budget`` bytes; a run holds at least one group.
    None: one run."""
    if budget is None:
        return [groups]
    runs: List[List[List[str]]] = [[]]
    used = 0
    for g in groups:
        d = in_features(linears[g[0]])
        need = 2 * 8 * d * (config.sketch_size if config.accumulator == "sketch" else d)
        if runs[-1] and used + need > budget:
            runs.append([])
            used = 0
        runs[-1].append(g)
        used += need
    return runs


def accumulate(acc: Accumulator, X: torch.Tensor, layer: str) -> None:
    """``acc.add(X)`` for the inputs of ``layer``; NaN or Inf in them is a ValueError that names
    the block and the layer (the accumulator alone cannot)."""
    try:
        acc.add(X)
    except (RuntimeError, ValueError) as err:
        if bool(torch.isfinite(X).all()):
            raise
        raise ValueError(
            f"{layer}: the calibration activations reaching this layer hold NaN or Inf (the blocks before it "
            f"overflowed, or the model's weights hold them): run the model in float32, check its weights, "
            f"or leave the block out with skip= ({err})"
        ) from err


def next_inputs(block: nn.Module, inputs: List[BlockInput]) -> List[BlockInput]:
    """The next block's inputs: this block's outputs, with the same extra arguments."""
    outputs = _run_block(block, inputs)
    return [((_hidden(out),) + args[1:], kwargs) for out, (args, kwargs) in zip(outputs, inputs)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode without a KV cache for the walk; the model's own settings come back after."""
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: Calib,
    config: Optional[QuantConfig] = None,
    *,
    tokenizer: Any = None,
    blocks: Optional[str] = None,
    skip: Sequence[str] = (),
    true_sequential: bool = True,
    max_length: int = 2048,
    progress: bool = True,
    comm: Optional[Comm] = None,
) -> ModelReport:
    """Quantizes every linear layer inside ``model``'s blocks in place (but single-output gates,
    which readers keep in full precision), and every expert of fused MoE experts modules, each
    from the tokens routed to it (docs/moe.md); returns a report.

    ``calib``: a list of strings (with ``tokenizer``), a LongTensor of token ids (N, L), or an
    iterable of such tensors or of dicts with ``input_ids``. ``config``: the ``lrgptq`` preset
    (``QuantConfig.for_method("lrgptq")``) when not given. ``blocks``: dotted path of the
    block list when discovery picks the wrong one. ``skip``: substrings of layer names to leave
    in full precision. ``comm``: a :class:`lrgptq.distributed.Distributed` to share the work
    between the processes of a torch.distributed group (every rank calls this with the same
    model and calibration data, and every rank ends with the whole quantized model). The model's
    weights hold the dequantized values afterwards; each layer's result (a
    :class:`lrgptq.results.LayerResult`: codes and grid or codebooks) is in ``report.results``
    for packing, whose ``weight`` is left empty (the module holds it: a second copy of every
    weight would double the model's memory).

    ``calib`` is checked before the first block (ValueError naming it: empty, not token ids, ids
    outside the embedding's vocabulary); NaN or Inf reaching a layer names the block and layer.
    Warnings (once per run): options without effect, no layer quantized, layers with fewer
    calibration tokens than inputs.
    """
    cfg = config if config is not None else QuantConfig.for_method("lrgptq")
    comm = comm if comm is not None else Comm()
    warn_unused_options(cfg)
    start = time.perf_counter()
    batches = comm.split(calibration_batches(calib, tokenizer, max_length=max_length, vocab_size=vocab_size(model)))
    block_path, block_list = find_blocks(model, blocks)
    report = ModelReport(cfg, true_sequential=true_sequential)
    backups: List[Tuple[nn.Module, torch.Tensor]] = []
    bar = progress_bar(len(block_list), progress and comm.is_writer)
    step = BlockStep(cfg, block_path, report, tuple(skip), true_sequential, comm, backups, bar)
    try:
        with eval_mode(model):
            rtn = cfg.route == "rtn"
            inputs = [] if rtn else first_block_inputs(model, block_list[0], batches)
            for i, block in enumerate(block_list):
                report.results.update(step.quantize_block(i, block, inputs))
                if not rtn:
                    inputs = next_inputs(block, inputs)
                if bar is not None:
                    bar.update(1)
    except BaseException:
        for module, weight in reversed(backups):
            with torch.no_grad():
                module.weight.copy_(weight)
        raise
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - start
    warn_after_run(report.layers, cfg)
    return report


def progress_bar(total: int, enabled: bool) -> Optional[Any]:
    """A tqdm bar over ``total`` blocks, or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="blocks", unit="block")
