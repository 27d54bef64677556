"""The GPTQ checkpoint layout (docs/design.md §9), as transformers/optimum, GPTQModel and vLLM read it.

Per quantized linear ``<name>`` (the module path in the model's state dict):

- ``<name>.qweight`` int32 (ceil(in·bits/32), out): codes packed along the inputs, LSB first;
- ``<name>.qzeros`` int32 (groups, ceil(out·bits/32)): zero points packed along the outputs;
- ``<name>.scales`` (groups, out), float16 unless the caller asks for bfloat16 or float32;
- ``<name>.g_idx`` int32 (in): each input's group (not monotonic with act-order);
- ``<name>.bias`` (out), in the scales' dtype, when the layer has one.

The bit rule (csrc/bitpack.h): one little-endian stream per column, 3-bit values straddling
words; a count that does not fill the last word leaves its high bits zero (GPTQModel's ceil
rule; AutoGPTQ's floor rule reads the same bytes whenever 32 divides the count).

Zero points. ``checkpoint_format`` "gptq" (v1) stores z − 1 and readers add 1 back; "gptq_v2"
stores z. An asymmetric z = 0 has no v1 encoding: z − 1 = −1 either spills into the neighbouring
field (readers that add 1 to the whole word) or reads back as 2^bits (readers that add 1 to the
field), so "gptq" refuses such a model with ValueError; nothing is clamped. "auto" (the default,
:func:`default_format`) decides by the grid, as measured with the readers (docs/interop.md):
symmetric grids are written as v1, which every reader takes (vLLM's Marlin kernel included);
asymmetric grids as gptq_v2, because GPTQModel refuses any asymmetric v1 file that it did not
write itself, while transformers (+optimum) and vLLM's gptq kernel read gptq_v2's zero points
as stored.

``desc_act`` is true when any layer's columns were quantized out of order (act-order or pivoted
order): readers that see false assume g_idx = i // group_size and may ignore g_idx.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from ..models import is_linear, weight_matrix
from ..limits import LAYOUT_BITS, sequential_g_idx
from ..nn import QuantLinear, ZERO_OFFSETS
from .. import ops
from .base import Prepared, check_finite, check_scales

QUANT_METHOD = "gptq"
FORMATS = tuple(ZERO_OFFSETS)  # "gptq" (v1: stores z − 1), "gptq_v2" (stores z)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Settings:
    """The quantization_config fields a GPTQ reader relies on."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str


def zero_point_layers(report: Any) -> Dict[str, int]:
    """Layers with asymmetric zero points equal to 0, and how many each has."""
    if report.config.sym:
        return {}
    out = {}
    for name, res in report.results.items():
        n = int((res.zeros == 0).sum())
        if n:
            out[name] = n
    return out


def default_format(sym: bool) -> str:
    """What ``checkpoint_format="auto"`` writes for a symmetric (``sym``) or asymmetric grid:
    the format that GPTQModel, transformers (+optimum) and vLLM all load (docs/interop.md)."""
    return "gptq" if sym else "gptq_v2"


def choose_format(report: Any, requested: str) -> Tuple[str, Dict[str, int]]:
    """The checkpoint_format to write, and the layers with asymmetric zero points equal to 0
    (which only gptq_v2 can hold)."""
    zero = zero_point_layers(report)
    if requested == "auto":
        return default_format(report.config.sym), zero
    if requested not in FORMATS:
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}, got {requested!r}")
    if requested == "gptq" and zero:
        listed = ", ".join(f"{n} ({c})" for n, c in list(zero.items())[:5])
        more = f" and {len(zero) - 5} more" if len(zero) > 5 else ""
        raise ValueError(
            f"checkpoint_format 'gptq' (v1) stores z − 1 and cannot hold the asymmetric zero points equal "
            f"to 0 in {listed}{more}; write checkpoint_format='gptq_v2' (what 'auto' writes for asymmetric "
            "grids), or quantize with sym=True"
        )
    return requested, zero


def _linear(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not is_linear(module):
        kind = "missing" if module is None else f"a {type(module).__name__}, not a linear layer"
        raise ValueError(f"the report quantized {name!r}, but in this model it is {kind}; pass the quantized model")
    return module


def _blocks(layers: List[dict]) -> Tuple[Optional[str], Optional[List[List[str]]]]:
    """block_name_to_quantize and modules_in_block_to_quantize (from the report's rows, whose
    names are ``<blocks>.<i>.<module>``), when every block agrees."""
    paths: Set[str] = set()
    per_block: Dict[int, Set[str]] = {}
    for row in layers:
        name, i = row["name"], row.get("block")
        cut = name.find(f".{i}.")
        if i is None or cut < 0:
            return None, None
        paths.add(name[:cut])
        per_block.setdefault(i, set()).add(name[cut + len(f".{i}.") :])
    if len(paths) != 1 or not per_block:
        return None, None
    sets = list(per_block.values())
    modules = [sorted(sets[0])] if all(s == sets[0] for s in sets) else None
    return paths.pop(), modules


def _version() -> str:
    try:
        return importlib.metadata.version("lrgptq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_request(cfg: Any, checkpoint_format: str, dtype: torch.dtype) -> None:
    """ValueError unless a quantization with ``cfg`` can be written in ``checkpoint_format``
    ("auto" or one of FORMATS) with its float tensors in ``dtype``."""
    if cfg.bits not in LAYOUT_BITS:
        raise ValueError(f"the GPTQ layout holds bits {LAYOUT_BITS}; this model was quantized to {cfg.bits} bits")
    if checkpoint_format not in ("auto",) + FORMATS:
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}, got {checkpoint_format!r}")
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"dtype (of scales and the tensors that are not quantized) must be one of "
                         f"{SCALE_DTYPES}, got {dtype}")


def prepare(
    model: nn.Module, report: Any, checkpoint_format: str = "auto", dtype: torch.dtype = torch.float16
) -> Prepared:
    """Packs every layer of ``report`` (a ModelReport of ``model``) into a QuantLinear."""
    cfg = report.config
    check_request(cfg, checkpoint_format, dtype)
    fmt, zero = choose_format(report, checkpoint_format)
    modules: Dict[str, nn.Module] = {}
    desc_act = False
    for name, res in report.results.items():
        linear = _linear(model, name)
        shape = tuple(weight_matrix(linear).shape)
        if shape != tuple(res.codes.shape):
            raise ValueError(f"{name}: the report's codes are {tuple(res.codes.shape)}, the model's weight {shape}")
        scales = res.scales.to(dtype)
        if not bool(torch.isfinite(scales).all()) or bool(((scales == 0) & (res.scales != 0)).any()):
            raise ValueError(f"{name}: scales overflow or underflow {dtype}; save with dtype=torch.float32")
        modules[name] = QuantLinear.pack(
            res.codes, scales, res.zeros, res.g_idx, cfg.bits, cfg.group_size, linear.bias, fmt, dtype
        )
        desc_act |= not torch.equal(res.perm.cpu(), torch.arange(len(res.perm)))
    lm_head = any(n == "lm_head" or n.endswith(".lm_head") for n in modules)
    info = {"checkpoint_format": fmt, "zero_point_layers": zero, "desc_act": desc_act, "lm_head": lm_head}
    qc = quantization_config(cfg, report.layers, info, getattr(report, "true_sequential", True), dtype)
    return Prepared(modules, qc, info)


def final_format(formats: List[str]) -> str:
    """The checkpoint_format of a checkpoint whose parts were prepared in ``formats`` (a streamed
    run decides block by block): gptq_v2 as soon as one part needs it."""
    return "gptq_v2" if "gptq_v2" in formats else (formats[0] if formats else "gptq")


def convert(tensors: Dict[str, torch.Tensor], fmt: str, to: str, cfg: Any) -> Dict[str, torch.Tensor]:
    """A part's tensors written in format ``fmt`` rewritten in format ``to``: the zero points
    stored as z − 1 (v1) or z (v2)."""
    shift = ZERO_OFFSETS[fmt] - ZERO_OFFSETS[to]
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        out_features = tensors[key[: -len("qzeros")] + "scales"].shape[1]
        z = ops.unpack_bits(tensors[key], cfg.bits, 1, out_features).to(torch.int32) + shift
        out[key] = ops.pack_bits(z, cfg.bits, 1)
    return out


def quantization_config(
    cfg: Any, layers: List[dict], info: Dict[str, Any], true_sequential: bool, dtype: torch.dtype
) -> Dict[str, Any]:
    """The ``quantization_config`` block for a model quantized with ``cfg`` (a QuantConfig), whose
    report rows are ``layers``, packed as ``info`` says (checkpoint_format, desc_act, lm_head)
    with scales in ``dtype``."""
    block_path, in_block = _blocks(layers)
    qc: Dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": bool(info.get("desc_act", False)),
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "true_sequential": true_sequential,
        "checkpoint_format": info["checkpoint_format"],
        "lm_head": bool(info.get("lm_head", False)),
    }
    # damp_percent is the Cholesky route's damping; the other routes do not damp H (and readers
    # reject 0), so it is written only where it means what GPTQ readers take it to mean (not for
    # damp='auto', chosen per layer: meta.lrgptq and the layer reports hold it).
    if cfg.route == "cholesky" and isinstance(cfg.damp, float) and 0 < cfg.damp < 1:
        qc["damp_percent"] = cfg.damp
    if block_path is not None:
        qc["block_name_to_quantize"] = block_path
    if in_block is not None:
        qc["modules_in_block_to_quantize"] = in_block
    qc["meta"] = {
        "quantizer": [f"lrgptq:{_version()}"],
        "lrgptq": {**cfg.to_dict(), "scale_dtype": str(dtype).replace("torch.", "")},
    }
    return qc


def _flag(qc: dict, key: str, default: bool, where: str) -> bool:
    v = qc.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}: quantization_config.{key} must be true or false, got {v!r}")
    return v


def parse_config(qc: Any, where: str) -> Settings:
    """A validated view of a loaded quantization_config."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    bits = qc.get("bits")
    if isinstance(bits, bool) or bits not in LAYOUT_BITS:
        raise ValueError(f"{where}: quantization_config.bits must be one of {LAYOUT_BITS}, got {bits!r}")
    gs = qc.get("group_size", -1)
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise ValueError(f"{where}: quantization_config.group_size must be -1 or a positive integer, got {gs!r}")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in FORMATS:
        raise ValueError(f"{where}: quantization_config.checkpoint_format must be one of {FORMATS}, got {fmt!r}")
    return Settings(bits, gs, _flag(qc, "sym", True, where), _flag(qc, "desc_act", False, where), fmt)


def quantized_names(keys: Iterable[str]) -> Set[str]:
    return {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}


def load_module(
    settings: Settings, name: str, linear: nn.Module, tensors: Dict[str, torch.Tensor], where: str
) -> QuantLinear:
    """The QuantLinear that replaces ``linear``, from its checkpoint tensors (keys without the
    ``<name>.`` prefix). Every shape, dtype and value the layout constrains is checked."""
    out_f, in_f = weight_matrix(linear).shape
    has_bias = linear.bias is not None
    expected = set(TENSORS) | ({"bias"} if has_bias else set())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise ValueError(f"{where}: tensor {name}.{missing[0]} is missing (a quantized layer needs {sorted(expected)})")
    if extra:
        raise ValueError(f"{where}: unexpected tensor {name}.{extra[0]} for a layer with bias={has_bias}")
    scales = tensors["scales"]
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"{where}: {name}.scales must be float16, bfloat16 or float32, got {scales.dtype}")
    s = settings
    m = QuantLinear(in_f, out_f, s.bits, s.group_size, has_bias, s.checkpoint_format, scales.dtype)
    for key, t in tensors.items():
        want = m._buffers[key]
        dtype_ok = t.dtype == want.dtype or (key == "bias" and t.is_floating_point())
        if not dtype_ok or tuple(t.shape) != tuple(want.shape):
            raise ValueError(
                f"{where}: {name}.{key} is {t.dtype} {tuple(t.shape)}, but a {s.bits}-bit layer with "
                f"in_features={in_f}, out_features={out_f}, group_size={s.group_size} needs {want.dtype} "
                f"{tuple(want.shape)} (does quantization_config match the tensors?)"
            )
        m._buffers[key] = t.contiguous()
    _check_values(m, settings, name, where)
    return m


def _check_values(m: QuantLinear, s: Settings, name: str, where: str) -> None:
    """What shapes cannot show: g_idx in range and as desc_act says, zero points as the format
    and sym say, scales finite, > 0 and without overflow, a finite bias."""
    G = m.scales.shape[0]
    g = m.g_idx
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= G):
        raise ValueError(f"{where}: {name}.g_idx holds groups outside 0..{G - 1}")
    if not s.desc_act:
        if not torch.equal(g, sequential_g_idx(m.in_features, s.group_size)):
            raise ValueError(
                f"{where}: quantization_config.desc_act is false but {name}.g_idx is not i // group_size "
                "(an act-order layer): readers that trust desc_act would compute wrong weights"
            )
    maxq = (1 << s.bits) - 1
    check_scales(m.scales, maxq, f"{name}.scales", where)
    if m.bias is not None:
        check_finite(m.bias, f"{name}.bias", where)
    stored = ops.unpack_bits(m.qzeros, s.bits, 1, m.out_features)
    if m.zero_offset == 1 and bool((stored == maxq).any()):
        raise ValueError(
            f"{where}: {name}.qzeros holds the v1 field {maxq} (z − 1 = −1 from an asymmetric z = 0), "
            "which readers decode differently; such a layer needs checkpoint_format gptq_v2"
        )
    if s.sym and not bool((stored.to(torch.int32) + m.zero_offset == 1 << (s.bits - 1)).all()):
        raise ValueError(
            f"{where}: quantization_config.sym is true but {name}'s zero points are not 2^(bits-1) = "
            f"{1 << (s.bits - 1)}"
        )
