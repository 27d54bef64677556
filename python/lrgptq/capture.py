"""Hooks that catch what enters a module: the first block's inputs, and each linear's inputs."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

from .models import is_conv1d


class StopForward(Exception):
    """Raised by a hook once what it waited for is caught; ends the forward pass early."""


BlockInput = Tuple[Tuple[Any, ...], Dict[str, Any]]


def first_block_inputs(model: nn.Module, block: nn.Module, batches: List[Any]) -> List[BlockInput]:
    """Runs each calibration batch up to ``block`` and returns the (args, kwargs) it received."""
    caught: List[BlockInput] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                if isinstance(batch, dict):
                    model(**batch)
                else:
                    model(batch)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(caught) != len(batches):
        raise RuntimeError("the calibration batches did not all reach the first block")
    return caught


@contextlib.contextmanager
def input_hooks(
    modules: Dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None], stop_when_all_seen: bool = False
) -> Iterator[Callable[[], None]]:
    """Streams every input of each module to ``sink(name, X)``; the hooks are always removed.

    The hooks run before each module computes (forward pre-hooks), so with ``stop_when_all_seen``
    the forward pass is cut short (``StopForward``) as soon as the last module has its input,
    before it multiplies: neither that module nor the rest of the block runs. The context yields a
    ``reset`` to call before each forward pass, so each pass waits for every module.
    """
    handles = []
    seen: set = set()

    def make(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            sink(name, args[0].detach())
            if stop_when_all_seen:
                seen.add(name)
                if len(seen) == len(modules):
                    raise StopForward

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(name)))
        yield seen.clear
    finally:
        for h in handles:
            h.remove()


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]
