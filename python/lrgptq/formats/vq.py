"""The GPTVQ checkpoint layout (lrgptq's own; quant_method ``gptvq``), documented in docs/vq.md.

Per quantized linear ``<name>``:

- ``<name>.qweight`` uint8 (out, ceil(in/dim · bits·dim / 8)): row n's codebook indices, one per
  ``dim`` consecutive columns of the order ``perm``, bits·dim bits each, packed LSB first;
- ``<name>.codebooks`` int8 (ceil(in/group_cols), ceil(out/group_rows), 2^(bits·dim), dim);
- ``<name>.codebook_scales`` float16 (same first two dims): a codebook's values are scale · int8;
- ``<name>.perm`` int16 (int32 when in > 32767), only when the columns were not quantized in order;
- ``<name>.bias`` when the layer has one, in the checkpoint's float dtype.

W[n, perm[v·dim + a]] = codebook_scales[cg, rg] · codebooks[cg, rg, index(n, v), a] with
cg = v·dim // group_cols and rg = n // group_rows (−1: one group). The float16 scale times an
int8 is exact in float32, so a saved layer computes the engine's weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Set

import torch
from torch import nn

from ..limits import VQ_DIMS, vq_bits_ok, vq_bits_rule
from ..models import weight_matrix
from ..nn_vq import VQLinear
from .base import Prepared, check_finite, check_scales
from .gptq import SCALE_DTYPES, _blocks, _linear, _version

QUANT_METHOD = "gptvq"


@dataclass(frozen=True)
class Settings:
    bits: int
    dim: int
    group_cols: int
    group_rows: int


def check_request(cfg: Any, checkpoint_format: str, dtype: torch.dtype) -> None:
    """ValueError unless a quantization with ``cfg`` can be written in this layout with its float
    tensors in ``dtype``."""
    if checkpoint_format not in ("auto", QUANT_METHOD):
        raise ValueError(f"a GPTVQ model is written in the {QUANT_METHOD!r} layout; got checkpoint_format "
                         f"{checkpoint_format!r}")
    if not cfg.vq_codebook_int8:
        raise ValueError("the gptvq layout stores int8 codebooks; quantize with QuantConfig.vq_codebook_int8=True")
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"dtype (of biases and the tensors that are not quantized) must be one of "
                         f"{SCALE_DTYPES}, got {dtype}")


def prepare(model: nn.Module, report: Any, checkpoint_format: str = "auto",
            dtype: torch.dtype = torch.float16) -> Prepared:
    """Packs every layer of ``report`` (a ModelReport of a GPTVQ quantization) into a VQLinear."""
    cfg = report.config
    check_request(cfg, checkpoint_format, dtype)
    modules: Dict[str, nn.Module] = {}
    for name, res in report.results.items():
        linear = _linear(model, name)
        shape = tuple(weight_matrix(linear).shape)
        if shape != (res.codes.shape[0], res.codes.shape[1] * res.dim):
            raise ValueError(f"{name}: the report's codes are {tuple(res.codes.shape)} for dim {res.dim}, "
                             f"the model's weight {shape}")
        modules[name] = VQLinear.pack(res, linear.bias, dtype)
    info = {"checkpoint_format": QUANT_METHOD, "zero_point_layers": {}}
    qc = quantization_config(cfg, report.layers, info, getattr(report, "true_sequential", True), dtype)
    return Prepared(modules, qc, info)


def final_format(formats: List[str]) -> str:
    """One format for every part: the gptvq layout has no variants."""
    return QUANT_METHOD


def convert(tensors: Dict[str, torch.Tensor], fmt: str, to: str, cfg: Any) -> Dict[str, torch.Tensor]:
    """The layout has one format: nothing to rewrite."""
    return tensors


def quantization_config(cfg: Any, layers: List[dict], info: Dict[str, Any], true_sequential: bool,
                        dtype: torch.dtype) -> Dict[str, Any]:
    """The ``quantization_config`` block for a GPTVQ quantization with ``cfg`` whose report rows
    are ``layers`` (``info`` and ``dtype``: as the GPTQ layout's, unused here)."""
    block_path, in_block = _blocks(layers)
    qc: Dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "bits": cfg.bits,
        "vq_dim": cfg.vq_dim,
        "group_cols": cfg.vq_group_cols,
        "group_rows": cfg.vq_group_rows,
        "codebook_bits": 8,
        "true_sequential": true_sequential,
    }
    if block_path is not None:
        qc["block_name_to_quantize"] = block_path
    if in_block is not None:
        qc["modules_in_block_to_quantize"] = in_block
    qc["meta"] = {"quantizer": [f"lrgptq:{_version()}"], "lrgptq": cfg.to_dict()}
    return qc


def _int(qc: dict, key: str, ok, where: str, want: str) -> int:
    v = qc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
        raise ValueError(f"{where}: quantization_config.{key} must be {want}, got {v!r}")
    return v


def parse_config(qc: Any, where: str) -> Settings:
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    dim = _int(qc, "vq_dim", lambda v: v in VQ_DIMS, where, f"one of {VQ_DIMS}")
    bits = _int(qc, "bits", lambda v: vq_bits_ok(v, dim), where, vq_bits_rule(dim))
    gc = _int(qc, "group_cols", lambda v: v == -1 or (v > 0 and v % dim == 0), where,
              f"-1 or a positive multiple of {dim}")
    gr = _int(qc, "group_rows", lambda v: v == -1 or v > 0, where, "-1 or positive")
    if qc.get("codebook_bits", 8) != 8:
        raise ValueError(f"{where}: quantization_config.codebook_bits must be 8 (int8 codebooks)")
    return Settings(bits, dim, gc, gr)


def quantized_names(keys: Iterable[str]) -> Set[str]:
    return {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}


def load_module(settings: Settings, name: str, linear: nn.Module, tensors: Dict[str, torch.Tensor],
                where: str) -> VQLinear:
    """The VQLinear that replaces ``linear``; every shape, dtype and index range checked."""
    out_f, in_f = weight_matrix(linear).shape
    s = settings
    if in_f % s.dim:
        raise ValueError(f"{where}: {name} has in_features={in_f}, not a multiple of vq_dim={s.dim}")
    has_bias, ordered = linear.bias is not None, "perm" in tensors
    m = VQLinear(in_f, out_f, s.dim, s.bits, s.group_cols, s.group_rows, has_bias, ordered,
                 tensors["bias"].dtype if "bias" in tensors else torch.float16)
    expected = {k for k, b in m._buffers.items() if b is not None and k not in m._non_persistent_buffers_set}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise ValueError(f"{where}: tensor {name}.{missing[0]} is missing (a gptvq layer needs {sorted(expected)})")
    if extra:
        raise ValueError(f"{where}: unexpected tensor {name}.{extra[0]} for a layer with bias={has_bias}")
    for key, t in tensors.items():
        want = m._buffers[key]
        if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{where}: {name}.{key} is {t.dtype} {tuple(t.shape)}, but a {s.dim}-D {s.bits}-bit "
                             f"layer with in_features={in_f}, out_features={out_f}, groups {s.group_cols}x"
                             f"{s.group_rows} needs {want.dtype} {tuple(want.shape)}")
        m._buffers[key] = t.contiguous()
    if ordered and not torch.equal(torch.sort(m.perm.long()).values, torch.arange(in_f)):
        raise ValueError(f"{where}: {name}.perm is not a permutation of 0..{in_f - 1}")
    if bool((m.codebooks == -128).any()):
        raise ValueError(f"{where}: {name}'s codebooks hold -128 (int8 values are in -127..127)")
    check_scales(m.codebook_scales, 127, f"{name}.codebook_scales", where)
    if has_bias:
        check_finite(m.bias, f"{name}.bias", where)
    m.unpack()
    return m
