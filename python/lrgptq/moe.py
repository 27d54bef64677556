"""Mixture-of-experts layers whose experts are fused 3-D parameters (transformers 5).

transformers 5 stores the experts of Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE (and others built on
the same class) in one module holding ``gate_up_proj`` (E, 2·I, H) and ``down_proj`` (E, H, I),
and gpt-oss's transposed with gate/up columns interleaved and biases (:class:`Chunked`,
:class:`Interleaved`), called as ``experts(hidden_states, top_k_index, top_k_weights)``. Each
expert's three matrices are layers of their own, each with its own inputs: the tokens the router
sends to it.

lrgptq quantizes them as linears by swapping such a module, for the time it works on it, for an
:class:`ExpertList`: one :class:`ExpertMLP` per expert whose ``gate_proj``, ``up_proj`` and
``down_proj`` are ``nn.Linear`` modules with weights (and biases) that are *views* of the fused
parameters (writing a quantized weight into them writes into the fused tensor), run with the same
routing as the fused module. Every linear tool then applies unchanged: forward pre-hooks see each
expert's routed tokens only, weights are backed up and restored as any linear's, and the
checkpoint holds per-expert tensors under per-expert names (``<experts>.<e>.gate_proj.qweight``,
...), the names GPTQModel reads. ``lrgptq.load`` builds the same :class:`ExpertList` with
``QuantLinear`` experts.

Discovery is generic: any module inside a block that holds 3-D parameters directly is taken for
an experts module; one whose parameters are in neither layout, or whose forward computes something
else than the per-expert replay on a few random tokens, raises ValueError naming it and the way
out (``skip=``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

GATE_UP, DOWN = "gate_up_proj", "down_proj"
ROLES = ("gate_proj", "up_proj", "down_proj")  # the per-expert names GPTQModel and vLLM read
Matrix = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (weight (out, in), bias (out) or None)


def _act_times_up(act_fn: Callable, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act_fn(gate) * up


def _interleaved_glu(alpha: float, limit: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gate on the two halves of its fused output: gate = even columns, up = odd ones of
    [first, second]; (clamp(up, ±limit) + 1) · g · sigmoid(α g), g = min(gate, limit)."""
    both = torch.cat([first, second], dim=-1)
    gate, up = both[..., 0::2].clamp(max=limit), both[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class Chunked:
    """``gate_up_proj`` (E, 2·I, H), the gate's I rows first, ``down_proj`` (E, H, I), no biases,
    ``act_fn(gate) · up``: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE (transformers 5)."""

    params = frozenset({GATE_UP, DOWN})
    description = f"{GATE_UP} (E, 2·I, H) with the gate's rows first and {DOWN} (E, H, I), no biases, an act_fn"

    def matches(self, m: nn.Module, p: Dict[str, torch.Tensor]) -> bool:
        gu, dn = p[GATE_UP], p[DOWN]
        return (gu.dim() == 3 and dn.dim() == 3 and gu.shape[0] == dn.shape[0] and gu.shape[1] == 2 * dn.shape[2]
                and gu.shape[2] == dn.shape[1] and callable(getattr(m, "act_fn", None)))

    def dims(self, m: nn.Module) -> Tuple[int, int, int]:
        E, _, H = getattr(m, GATE_UP).shape
        return E, H, getattr(m, DOWN).shape[2]

    def matrices(self, m: nn.Module, e: int) -> List[Matrix]:
        gu, I = getattr(m, GATE_UP)[e], self.dims(m)[2]
        return [(gu[:I], None), (gu[I:], None), (getattr(m, DOWN)[e], None)]

    def combine(self, m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return functools.partial(_act_times_up, m.act_fn)


class Interleaved:
    """gpt-oss: ``gate_up_proj`` (E, H, 2·I) stored transposed with gate and up columns
    interleaved, ``down_proj`` (E, I, H) transposed, biases ``gate_up_proj_bias`` (E, 2·I) and
    ``down_proj_bias`` (E, H), the clamped GLU with the module's ``alpha`` and ``limit``.

    As GPTQModel (its Defuser) splits them, ``gate_proj`` holds the *first half* of the fused
    output columns and ``up_proj`` the second (each half mixes gate and up columns); the gate is
    applied to the two halves put back together. Rows are independent given the shared factor, so
    which rows go to which name changes no code, only what a reader must do with them."""

    params = frozenset({GATE_UP, DOWN, GATE_UP + "_bias", DOWN + "_bias"})
    description = (f"gpt-oss's {GATE_UP} (E, H, 2·I) with gate/up columns interleaved, {DOWN} (E, I, H), their "
                   "_bias tensors, alpha and limit")

    def matches(self, m: nn.Module, p: Dict[str, torch.Tensor]) -> bool:
        gu, dn, gub, dnb = p[GATE_UP], p[DOWN], p[GATE_UP + "_bias"], p[DOWN + "_bias"]
        return (gu.dim() == 3 and dn.dim() == 3 and gu.shape[0] == dn.shape[0] and gu.shape[2] == 2 * dn.shape[1]
                and gu.shape[1] == dn.shape[2] and tuple(gub.shape) == (gu.shape[0], gu.shape[2])
                and tuple(dnb.shape) == (dn.shape[0], dn.shape[2])
                and all(isinstance(getattr(m, a, None), (int, float)) for a in ("alpha", "limit")))

    def dims(self, m: nn.Module) -> Tuple[int, int, int]:
        E, H, _ = getattr(m, GATE_UP).shape
        return E, H, getattr(m, DOWN).shape[1]

    def matrices(self, m: nn.Module, e: int) -> List[Matrix]:
        gu, gub = getattr(m, GATE_UP)[e], getattr(m, GATE_UP + "_bias")[e]
        I = self.dims(m)[2]
        return [(gu[:, :I].t(), gub[:I]), (gu[:, I:].t(), gub[I:]),
                (getattr(m, DOWN)[e].t(), getattr(m, DOWN + "_bias")[e])]

    def combine(self, m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return functools.partial(_interleaved_glu, float(m.alpha), float(m.limit))


LAYOUTS = (Chunked(), Interleaved())
Layout = Union[Chunked, Interleaved]


class ExpertMLP(nn.Module):
    """One expert: down_proj(combine(gate_proj(x), up_proj(x))), combine = act(gate) · up for
    most architectures."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.combine(self.gate_proj(x), self.up_proj(x)))


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
    def view_of(cls, fused: nn.Module, layout: Layout) -> "ExpertList":
        """Experts whose linear weights (and biases) are views of ``fused``'s parameters (no copy)."""
        combine = layout.combine(fused)
        return cls([ExpertMLP(*(_view_linear(W, b) for W, b in layout.matrices(fused, e)), combine)
                    for e in range(layout.dims(fused)[0])])

    @classmethod
    def empty_like(cls, fused: nn.Module, layout: Layout) -> "ExpertList":
        """Experts shaped as ``fused``'s, with weights on the meta device (no memory), for a
        loader to replace or fill."""
        combine = layout.combine(fused)
        experts = []
        for e in range(layout.dims(fused)[0]):
            mats = layout.matrices(fused, e)
            experts.append(ExpertMLP(*(nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device="meta")
                                       for W, b in mats), combine))
        return cls(experts)


def _view_linear(W: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(W.detach(), requires_grad=False)  # shares the fused tensor's storage
    if b is not None:
        lin.bias = nn.Parameter(b.detach(), requires_grad=False)
    return lin


def layout_of(name: str, module: nn.Module) -> Layout:
    """The layout in which ``module`` (at ``name``) holds its 3-D parameters; ValueError naming
    it, its parameters and the way out when lrgptq does not know it."""
    params = dict(module.named_parameters(recurse=False))
    for layout in LAYOUTS:
        if set(params) == layout.params and layout.matches(module, params):
            return layout
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in params.items())
    known = "; or ".join(layout.description for layout in LAYOUTS)
    raise ValueError(
        f"{name} ({type(module).__name__}) holds 3-D parameters ({shapes}) in a layout lrgptq does not know: it "
        f"reads experts modules holding {known} (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, gpt-oss in transformers "
        f"5). Leave it in full precision with skip=[{name.rpartition('.')[2] or name!r}] (docs/moe.md)"
    )


def check_routing(name: str, fused: nn.Module, layout: Layout, view: ExpertList, tokens: int = 4) -> None:
    """ValueError unless ``view`` computes what ``fused`` computes, on a few random tokens routed
    to random experts: the parameter layout alone does not say that the module's forward is
    transformers' loop (each routed expert's down(combine(gate, up)), weighted by the router, summed
    over the top-k). Skipped on the meta device (nothing to compute with)."""
    p = getattr(fused, GATE_UP)
    if p.device.type == "meta":
        return
    E, H, _ = layout.dims(fused)
    gen = torch.Generator().manual_seed(0)
    k = min(2, E)
    h = torch.randn(tokens, H, generator=gen).to(p.device, p.dtype)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).to(p.device)
    w = torch.rand(tokens, k, generator=gen).to(p.device, p.dtype)
    fix = f"leave it in full precision with skip=[{name.rpartition('.')[2] or name!r}] (docs/moe.md)"
    with torch.no_grad():
        try:
            want = fused(h, idx, w)
        except Exception as err:  # any failure: the module is not called as lrgptq calls it
            raise ValueError(f"{name} ({type(fused).__name__}) cannot be called as (hidden_states, top_k_index, "
                             f"top_k_weights) ({type(err).__name__}: {err}); {fix}") from err
        got = view(h, idx, w)
    exact = p.dtype in (torch.float32, torch.float64)
    tol = (1e-4 if exact else 3e-2) * float(want.abs().max()) + 1e-6
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or float((want - got).abs().max()) > tol:
        raise ValueError(
            f"{name} ({type(fused).__name__}) holds {GATE_UP} and {DOWN} as lrgptq reads them, but its forward "
            f"computes something else than each routed expert's {DOWN}(combine(gate, up)) weighted by the router "
            f"(checked on {tokens} random tokens); {fix}")


def fused_experts(root: nn.Module, skip: Sequence[str] = (),
                  only: Optional[Callable[[str], bool]] = None) -> Dict[str, Tuple[nn.Module, Layout]]:
    """The modules under ``root`` that hold 3-D parameters directly, with their layouts, by name,
    less those whose name contains a ``skip`` entry or that ``only`` refuses; ValueError for one
    whose layout is unknown."""
    found = {}
    for name, m in root.named_modules():
        if isinstance(m, ExpertList) or not any(p.dim() == 3 for p in m.parameters(recurse=False)):
            continue
        if any(s in name for s in skip) or (only is not None and not only(name)):
            continue
        found[name] = (m, layout_of(name, m))
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
        for name, (m, layout) in fused.items():
            view = ExpertList.view_of(m, layout)
            check_routing(name, m, layout, view)
            views[name] = view
            _swap(root, name, view)
        yield views
    finally:
        for name in views:
            _swap(root, name, fused[name][0])


def unfuse_for_load(model: nn.Module, quantized: Sequence[str]) -> List[str]:
    """Replaces every fused experts module of ``model`` that the checkpoint holds per expert (a
    name ``<module>.<e>.<role>`` among ``quantized``) by an empty :class:`ExpertList` for the
    loader to fill; returns their names."""
    found = fused_experts(model, only=holders(quantized).__contains__)
    for name, (m, layout) in found.items():
        _swap(model, name, ExpertList.empty_like(m, layout))
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
