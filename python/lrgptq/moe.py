"""Mixture-of-experts layers whose experts are fused 3-D parameters (transformers 5).

transformers 5 stores the experts of Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE (and others built on
the same class) in one module holding ``gate_up_proj`` (E, 2·I, H) and ``down_proj`` (E, H, I),
called as ``experts(hidden_states, top_k_index, top_k_weights)``. Each expert's three matrices
are layers of their own, each with its own inputs: the tokens the router sends to it.

lrgptq quantizes them as linears by swapping such a module, for the time it works on it, for an
:class:`ExpertList`: one :class:`ExpertMLP` per expert whose ``gate_proj``, ``up_proj`` and
``down_proj`` are ``nn.Linear`` modules with weights that are *views* of the fused parameters
(writing a quantized weight into them writes into the fused tensor), run with the same routing as
the fused module. Every linear tool then applies unchanged: forward pre-hooks see each expert's
routed tokens only, weights are backed up and restored as any linear's, and the checkpoint holds
per-expert tensors under per-expert names (``<experts>.<e>.gate_proj.qweight``, ...), the names
GPTQModel and vLLM read. ``lrgptq.load`` builds the same :class:`ExpertList` with
``QuantLinear`` experts.

Discovery is generic: any module inside a block that holds 3-D parameters directly is taken for
an experts module; one whose layout is not the one above (gpt-oss: transposed, interleaved
gate/up, biases) raises ValueError naming it, its parameters and the way out (``skip=``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

GATE_UP, DOWN = "gate_up_proj", "down_proj"
ROLES = ("gate_proj", "up_proj", "down_proj")  # the per-expert names GPTQModel and vLLM read


class ExpertMLP(nn.Module):
    """One expert: down_proj(act(gate_proj(x)) · up_proj(x))."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: Callable) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """The experts of a MoE layer as separate modules (children ``0`` .. ``E-1``), called as the
    fused module is: ``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``. Each
    expert runs on the tokens routed to it; its output, times the token's routing weight, is
    summed into the token's row, in the order transformers' loop does it."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        E = len(self)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)  # (E+1, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == E:  # transformers' "no expert" index
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            h = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    @classmethod
    def view_of(cls, fused: nn.Module) -> "ExpertList":
        """Experts whose linear weights are views of ``fused``'s parameters (no copy)."""
        gate_up, down = getattr(fused, GATE_UP), getattr(fused, DOWN)
        I = down.shape[2]
        experts = []
        for e in range(gate_up.shape[0]):
            mats = (gate_up[e, :I], gate_up[e, I:], down[e])
            experts.append(ExpertMLP(*(_view_linear(W) for W in mats), fused.act_fn))
        return cls(experts)

    @classmethod
    def empty_like(cls, fused: nn.Module) -> "ExpertList":
        """Experts shaped as ``fused``'s, with weights on the meta device (no memory), for a
        loader to replace or fill."""
        E, _, H = getattr(fused, GATE_UP).shape
        I = getattr(fused, DOWN).shape[2]
        shapes = ((H, I), (H, I), (I, H))
        return cls([ExpertMLP(*(nn.Linear(i, o, bias=False, device="meta") for i, o in shapes), fused.act_fn)
                    for _ in range(E)])


def _view_linear(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(W.detach(), requires_grad=False)  # shares the fused tensor's storage
    return lin


def check_layout(name: str, module: nn.Module) -> None:
    """ValueError unless ``module`` (at ``name``) holds its 3-D parameters as lrgptq reads them."""
    params = dict(module.named_parameters(recurse=False))
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in params.items())
    gu, dn = params.get(GATE_UP), params.get(DOWN)
    known = (
        set(params) == {GATE_UP, DOWN} and gu.dim() == 3 and dn.dim() == 3
        and gu.shape[0] == dn.shape[0] and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]
        and callable(getattr(module, "act_fn", None))
    )
    if not known:
        raise ValueError(
            f"{name} ({type(module).__name__}) holds 3-D parameters ({shapes}) in a layout lrgptq does not know: "
            f"it reads experts modules holding only {GATE_UP} (E, 2·I, H) with the gate's rows first and {DOWN} "
            f"(E, H, I), no biases, with an act_fn (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE in transformers 5). "
            f"Leave it in full precision with skip=[{name.rpartition('.')[2] or name!r}] (docs/moe.md)"
        )


def fused_experts(root: nn.Module, skip: Sequence[str] = (),
                  only: Optional[Callable[[str], bool]] = None) -> Dict[str, nn.Module]:
    """The modules under ``root`` that hold 3-D parameters directly (by name), less those whose
    name contains a ``skip`` entry or that ``only`` refuses; ValueError for one whose layout is
    unknown."""
    found = {}
    for name, m in root.named_modules():
        if isinstance(m, ExpertList) or not any(p.dim() == 3 for p in m.parameters(recurse=False)):
            continue
        if any(s in name for s in skip) or (only is not None and not only(name)):
            continue
        check_layout(name, m)
        found[name] = m
    return found


def _swap(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


@contextlib.contextmanager
def unfused(root: nn.Module, skip: Sequence[str] = (),
            only: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, ExpertList]]:
    """Within the context, every fused experts module under ``root`` (less ``skip``; of those, the
    ones ``only`` accepts by name) is replaced by an :class:`ExpertList` of views of its weights;
    yields them by name. The fused modules are always put back, holding whatever was written into
    the views."""
    fused = fused_experts(root, skip, only)
    views: Dict[str, ExpertList] = {}
    try:
        for name, m in fused.items():
            views[name] = ExpertList.view_of(m)
            _swap(root, name, views[name])
        yield views
    finally:
        for name in views:
            _swap(root, name, fused[name])


def unfuse_for_load(model: nn.Module, quantized: Sequence[str]) -> List[str]:
    """Replaces every fused experts module of ``model`` that the checkpoint holds per expert (a
    name ``<module>.<e>.<role>`` among ``quantized``) by an empty :class:`ExpertList` for the
    loader to fill; returns their names."""
    found = fused_experts(model, only=holders(quantized).__contains__)
    for name, m in found.items():
        _swap(model, name, ExpertList.empty_like(m))
    return list(found)


def expert_subsets(path: str, experts: ExpertList, linears: Dict[str, nn.Module]) -> List[List[List[str]]]:
    """GPTQ's order inside the experts at ``path``: first every expert's gate and up (one group
    per expert: both read its routed tokens, so one factor serves both), then every expert's down
    (whose inputs, act(gate)·up, are computed with the quantized gate and up). Names are those of
    ``linears`` (skipped ones are left out)."""
    first = [[n for n in (f"{path}.{e}.gate_proj", f"{path}.{e}.up_proj") if n in linears]
             for e in range(len(experts))]
    second = [[f"{path}.{e}.down_proj"] for e in range(len(experts)) if f"{path}.{e}.down_proj" in linears]
    return [s for s in ([g for g in first if g], second) if s]


def owner(name: str, paths: Sequence[str]) -> Optional[str]:
    """Which of the expert-list ``paths`` holds the layer ``name`` (None: a dense layer)."""
    for p in paths:
        if name.startswith(p + "."):
            return p
    return None


def holders(names: Iterable[str]) -> Set[str]:
    """The module paths that per-expert layer names ``<path>.<e>.<role>`` among ``names`` point to."""
    return {expert_index(n)[0] for n in names if n.rpartition(".")[2] in ROLES}


def expert_index(name: str) -> Tuple[str, str, str]:
    """(experts path, expert, role) of a per-expert layer name ``<path>.<e>.<role>``."""
    rest, _, role = name.rpartition(".")
    path, _, e = rest.rpartition(".")
    return path, e, role
