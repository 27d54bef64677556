"""GPTVQ checkpoints: a quantized tiny model saves in the gptvq layout and loads back computing the
very weights the engine chose; the layout is read back independently; malformed files are refused."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq.nn_vq import VQLinear, unpack_codes  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tiny_models import ARCHS, VOCAB, output_of  # noqa: E402


def quantized(order="pivot"):
    torch.manual_seed(0)
    model = ARCHS["llama"]().eval()
    ids = torch.randint(0, VOCAB, (4, 32))
    cfg = lrgptq.QuantConfig(bits=2, vq_dim=2, vq_group_cols=16, vq_group_rows=8, order=order)
    return model, lrgptq.quantize_model(model, ids, cfg, progress=False), ids


@pytest.mark.parametrize("order", ["pivot", "identity"])
def test_round_trip_computes_the_engine_weights(tmp_path, order):
    model, report, ids = quantized(order)
    saved = lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    assert saved.checkpoint_format == "gptvq"
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptvq" and qc["vq_dim"] == 2 and qc["bits"] == 2
    loaded = lrgptq.load(tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name, res in report.results.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, VQLinear)
        W = model.get_submodule(name).weight.detach()
        assert torch.equal(m.dequantize(), W), name
        # Independently of VQLinear: unpack the stored bytes and look up by hand.
        codes = unpack_codes(tensors[f"{name}.qweight"], 4, W.shape[1] // 2)
        C = tensors[f"{name}.codebook_scales"].float()[..., None, None] * tensors[f"{name}.codebooks"].float()
        perm = tensors[f"{name}.perm"].long() if f"{name}.perm" in tensors else torch.arange(W.shape[1])
        assert (f"{name}.perm" in tensors) == (order == "pivot")
        n, v = torch.meshgrid(torch.arange(W.shape[0]), torch.arange(W.shape[1] // 2), indexing="ij")
        Wp = C[(v * 2) // 16, n // 8, codes.long()].reshape(W.shape)
        W2 = torch.empty_like(Wp)
        W2[:, perm] = Wp
        assert torch.equal(W2, W), name
    assert torch.allclose(output_of(loaded, ids), output_of(model, ids), rtol=1e-4, atol=1e-4)


def test_malformed_layers_are_refused(tmp_path):
    model, report, _ = quantized()
    lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    name = next(iter(report.results))
    for key, bad, msg in (
        ("codebooks", lambda t: t[:, :, :3], "codebooks is"),
        ("codebook_scales", lambda t: t.float(), "codebook_scales is"),
        ("perm", lambda t: torch.zeros_like(t), "not a permutation"),
        ("codebooks", lambda t: torch.full_like(t, -128), "-128"),
    ):
        broken = dict(tensors)
        broken[f"{name}.{key}"] = bad(tensors[f"{name}.{key}"]).contiguous()
        save_file(broken, str(path), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=msg):
            lrgptq.load(tmp_path / "ckpt")
    broken = dict(tensors)
    del broken[f"{name}.codebooks"]
    save_file(broken, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        lrgptq.load(tmp_path / "ckpt")
