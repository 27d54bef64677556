"""Finding the stack of blocks and the linear layers inside a model, for any architecture.

Discovery is generic: the blocks are the longest ``nn.ModuleList`` whose members hold linear
layers (``nn.Linear`` or transformers' ``Conv1D``, which stores its weight transposed). A user
can name the blocks (a dotted path) when discovery picks the wrong list.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: y = x @ weight + bias, weight is (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    """Writes an (out_features, in_features) matrix back in the module's own layout and dtype."""
    with torch.no_grad():
        module.weight.copy_((W.t() if is_conv1d(module) else W).to(module.weight.dtype))


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"the model has no submodule {path!r}; name the block list as a dotted path") from err


def find_blocks(model: nn.Module, path: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The (name, ModuleList) of the model's repeated blocks."""
    if path is not None:
        blocks = get_submodule(model, path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{path!r} is a {type(blocks).__name__}, not an nn.ModuleList of blocks")
        return path, blocks
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(is_linear(m) for m in block.modules()) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"no list of blocks with linear layers found in {type(model).__name__}; "
            "pass blocks='<dotted path to the nn.ModuleList>'"
        )
    return best[1], best[2]


def find_linears(block: nn.Module, skip: Tuple[str, ...] = ()) -> Dict[str, nn.Module]:
    """The block's linear layers by name, less those whose name contains a ``skip`` entry and
    those with a single output: a scalar gate (Qwen2-MoE's ``shared_expert_gate``), which
    GPTQModel and vLLM read in full precision."""
    return {
        name: m
        for name, m in block.named_modules()
        if is_linear(m) and weight_matrix(m).shape[0] > 1 and not any(s in name for s in skip)
    }
