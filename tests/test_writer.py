"""The checkpoint writer (lrgptq.writer): a model packed part by part (as a streamed run packs
block by block) merges into what packing it whole gives: the same decisions, the same
quantization_config and the same tensors; a part in the other GPTQ variant converts exactly."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq.writer import CheckpointWriter  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402

VQ = dict(vq_dim=2, bits=2, vq_group_cols=16, vq_group_rows=8)


def _quantized(gen, cfg, zero_in_block_1=False):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = ARCHS["llama"]().eval()
    if zero_in_block_1:  # no negative weight: asymmetric grids with z = 0, which GPTQ v1 cannot hold
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.abs_()
    ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
    report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(**cfg), progress=False)
    return model, report


def _by_block(report, i):
    rows = [r for r in report.layers if r["block"] == i]
    return {r["name"]: report.results[r["name"]] for r in rows}, rows


@pytest.mark.parametrize("cfg,zero", [(dict(bits=4, group_size=32), True), (dict(bits=4, group_size=32), False),
                                      (dict(bits=3, group_size=16, order="act", route="cholesky",
                                            accumulator="gram"), False),
                                      (VQ, False)])
def test_parts_merge_into_the_whole(gen, cfg, zero):
    model, report = _quantized(gen, cfg, zero)
    writer = CheckpointWriter(model, report.config, dtype=torch.float32)
    whole = writer.pack(report.results, report.layers)
    parts = []
    for i in range(2):
        prefix = f"model.layers.{i}."
        parts.append(writer.pack(*_by_block(report, i), include=lambda k, p=prefix: k.startswith(p)))
    info = writer.merge([p.info for p in parts])
    # "auto" writes gptq_v2 for asymmetric grids whatever their zero points (docs/interop.md)
    want = {"gptvq"} if "vq_dim" in cfg else {"gptq" if report.config.sym else "gptq_v2"}
    assert {info["checkpoint_format"], whole.info["checkpoint_format"]} == want
    for key in ("zero_point_layers", "desc_act", "lm_head"):
        assert info.get(key) == whole.info.get(key, info.get(key)), key
    assert ("model.layers.1.mlp.up_proj" in info["zero_point_layers"]) == zero
    assert writer.quantization_config(report.layers, info) == writer.quantization_config(report.layers, whole.info)
    for part in parts:
        tensors = part.tensors
        if part.info["checkpoint_format"] != info["checkpoint_format"]:
            tensors = writer.convert(tensors, part.info, info["checkpoint_format"])
        assert tensors.keys() <= whole.tensors.keys()
        for k, t in tensors.items():
            assert t.dtype == whole.tensors[k].dtype and torch.equal(t, whole.tensors[k]), k
    # under "auto" every part takes the whole's format: no part needs converting
    assert all(p.info["checkpoint_format"] == info["checkpoint_format"] for p in parts)


def test_a_v1_part_converts_to_v2_and_back(gen):
    model, report = _quantized(gen, dict(bits=3, group_size=16))
    v1 = CheckpointWriter(model, report.config, checkpoint_format="gptq").pack(report.results, report.layers)
    v2 = CheckpointWriter(model, report.config, checkpoint_format="gptq_v2").pack(report.results, report.layers)
    writer = CheckpointWriter(model, report.config)
    there = writer.convert(v1.tensors, v1.info, "gptq_v2")
    back = writer.convert(v2.tensors, v2.info, "gptq")
    assert any(k.endswith(".qzeros") for k in there)
    for k in v1.tensors:
        assert torch.equal(there[k], v2.tensors[k]) and torch.equal(back[k], v1.tensors[k]), k


@pytest.mark.parametrize("cfg,kwargs,match", [
    (dict(bits=4), dict(checkpoint_format="gptq_v3"), "checkpoint_format must be 'auto' or one of"),
    (dict(bits=4), dict(dtype=torch.int8), "dtype .* must be one of"),
    (VQ, dict(checkpoint_format="gptq"), "written in the 'gptvq' layout"),
    (VQ, dict(dtype=torch.float64), "dtype .* must be one of"),
])
def test_a_request_the_layout_cannot_write_is_refused_up_front(cfg, kwargs, match):
    model = ARCHS["llama"]().eval()
    with pytest.raises(ValueError, match=match):
        CheckpointWriter(model, lrgptq.QuantConfig(**cfg), **kwargs)


def test_auto_writes_without_a_warning_whatever_the_zero_points(gen):
    # "auto" writes gptq_v2 for an asymmetric grid whatever its zero points (docs/interop.md), so a
    # zero point of 0 decides nothing and nothing is warned.
    model, report = _quantized(gen, dict(bits=4, group_size=32), zero_in_block_1=True)
    auto = CheckpointWriter(model, report.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = auto.pack(report.results, report.layers).info
    assert info["checkpoint_format"] == "gptq_v2" and info["zero_point_layers"]



@pytest.mark.parametrize("what", ["safetensors", "json"])
def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, what):
    from lrgptq import writer

    target = tmp_path / ("x.safetensors" if what == "safetensors" else "x.json")
    with pytest.raises((TypeError, ValueError)):
        if what == "safetensors":
            writer.save_file_atomic({"a": "not a tensor"}, target)
        else:
            cycle = {}
            cycle["self"] = cycle  # json refuses a circular reference midway through the write
            writer.write_json_atomic(target, cycle)
    assert list(tmp_path.iterdir()) == []
