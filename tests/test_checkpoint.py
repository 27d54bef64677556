"""Save and load GPTQ checkpoints: exact round trips, the layout read back independently, the
zero-point decision, atomic writes, and a loader that turns every malformed file into a
ValueError (named cases and a fuzz run)."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq.formats.gptq import zero_point_layers  # noqa: E402
from lrgptq.models import weight_matrix  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import gptq_ref  # noqa: E402
from tiny_models import ARCHS, VOCAB, output_of  # noqa: E402

ACT = dict(route="cholesky", accumulator="gram", order="act")  # GPTQ with act-order: g_idx not monotonic


def quantized(arch="llama", seed=0, **cfg):
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    ids = torch.randint(0, VOCAB, (4, 32))
    report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(**{"bits": 4, "group_size": 32, **cfg}),
                                   progress=False)
    return model, report, ids


def logits(model, ids):
    with torch.no_grad():
        return output_of(model, ids)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_round_trip_is_exact_for_every_architecture(tmp_path, arch):
    # float32 scales keep the engine's grid exactly: the loaded layers must dequantize to the
    # very weights the in-memory quantized model holds, bit for bit.
    model, report, ids = quantized(arch, bits=3, **ACT)
    saved = lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    assert saved.checkpoint_format in ("gptq", "gptq_v2")
    loaded = lrgptq.load(tmp_path / "ckpt")
    for name, res in report.results.items():
        q = loaded.get_submodule(name)
        assert isinstance(q, lrgptq.QuantLinear), name
        assert torch.equal(q.codes(), res.codes), name
        assert torch.equal(q.zeros(), res.zeros.int()), name
        assert torch.equal(q.g_idx, res.g_idx), name
        assert torch.equal(q.dequantize(), weight_matrix(model.get_submodule(name))), name
    ref, out = logits(model, ids), logits(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), f"{arch}: logits moved"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_every_width_with_the_lrgptq_route(tmp_path, bits):
    model, report, ids = quantized(bits=bits, group_size=48)  # svdqr, pivoted order, short last group
    lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    loaded = lrgptq.load(tmp_path / "ckpt")
    for name in report.results:
        assert torch.equal(loaded.get_submodule(name).dequantize(), weight_matrix(model.get_submodule(name)))
    ref, out = logits(model, ids), logits(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("cfg", [
    dict(sym=True, group_size=-1),  # symmetric, one group per row
    dict(static_groups=True, **ACT),  # act-order with static groups: g_idx stays i // group_size
    dict(bits=3, group_size=48, **ACT),  # 3 bits, groups that do not align with 32-input blocks
])
def test_round_trip_other_grids(tmp_path, cfg):
    model, report, ids = quantized(**cfg)
    saved = lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert (qc["sym"], qc["group_size"], qc["static_groups"]) == (
        report.config.sym, report.config.group_size, report.config.static_groups)
    loaded = lrgptq.load(tmp_path / "ckpt")
    for name, res in report.results.items():
        assert torch.equal(loaded.get_submodule(name).dequantize(), weight_matrix(model.get_submodule(name)))
        if cfg.get("static_groups"):
            gsz = report.config.group_size
            assert torch.equal(res.g_idx, (torch.arange(res.g_idx.numel()) // gsz).int())
    if report.config.sym:  # v1 stores z - 1 = 2^(bits-1) - 1 in every field
        assert saved.checkpoint_format == "gptq"
        with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
            qz = f.get_tensor("model.layers.0.self_attn.q_proj.qzeros").tolist()
        assert set(sum(gptq_ref.qzeros_values(qz, 4, 64), [])) == {7}
    ref, out = logits(model, ids), logits(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_round_trip_with_features_not_multiples_of_32(tmp_path):
    # hidden 80 and intermediate 136: 3-bit streams that end inside a word (zero padding, the
    # readers' ceil rule), partial pack blocks and a short last group.
    import transformers

    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=136, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(bits=3, group_size=48, **ACT), progress=False)
    lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    loaded = lrgptq.load(tmp_path / "ckpt")
    down = loaded.model.layers[0].mlp.down_proj
    assert down.qweight.shape == (gptq_ref.words_for(136, 3), 80) == (13, 80)
    assert down.qzeros.shape == (3, gptq_ref.words_for(80, 3)) == (3, 8)
    for name in report.results:
        assert torch.equal(loaded.get_submodule(name).dequantize(), weight_matrix(model.get_submodule(name)))
    ref, out = logits(model, ids), logits(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_widths_outside_the_layout_are_refused(tmp_path):
    model, report, _ = quantized(bits=5, route="rtn")
    with pytest.raises(ValueError, match=r"holds bits \(2, 3, 4, 8\); this model was quantized to 5 bits"):
        lrgptq.save(model, report, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_default_float16_checkpoint_rounds_the_grid_only(tmp_path):
    model, report, ids = quantized(**ACT)
    lrgptq.save(model, report, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "float16"
    assert lrgptq.load(tmp_path / "ckpt").model.embed_tokens.weight.dtype == torch.float16
    loaded = lrgptq.load(tmp_path / "ckpt", dtype=torch.float32)  # float16 tensors, float32 compute
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    for name, res in report.results.items():
        q = loaded.get_submodule(name)
        assert q.scales.dtype == torch.float16
        g = res.g_idx.long()
        expect = res.scales.half().float()[g].t() * (res.codes.float() - res.zeros[g].t())
        assert torch.equal(q.codes(), res.codes) and torch.equal(q.dequantize(), expect), name
    ref, out = logits(model, ids), logits(loaded, ids)
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()  # scales and embeddings rounded to 11 bits


@pytest.mark.parametrize("bits", [3, 4])
def test_checkpoint_read_back_with_the_documented_formula(tmp_path, bits):
    # Not our unpacker: plain Python integers (tests/gptq_ref.py) on the raw file tensors.
    model, report, _ = quantized(bits=bits, **ACT)
    lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32, checkpoint_format="gptq")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        for name in report.results:
            t = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
            assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
            W = gptq_ref.dequantize(t["qweight"].tolist(), t["qzeros"].tolist(), t["scales"].double().tolist(),
                                    t["g_idx"].tolist(), bits, v1=True)
            # float32 scale × small integer is exact in float64, so rounding it once matches.
            W = torch.tensor(W, dtype=torch.float64).float()
            assert torch.equal(W, weight_matrix(model.get_submodule(name))), name


def test_config_records_the_layout(tmp_path):
    model, report, _ = quantized(**ACT)
    lrgptq.save(model, report, tmp_path / "act")
    cfg = json.loads((tmp_path / "act" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == json.loads((tmp_path / "act" / "quantize_config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "static_groups",
                               "true_sequential", "checkpoint_format", "lm_head", "damp_percent")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
        "static_groups": False, "true_sequential": True, "checkpoint_format": qc["checkpoint_format"],
        "lm_head": False, "damp_percent": 0.01}
    assert qc["checkpoint_format"] in ("gptq", "gptq_v2")
    assert qc["block_name_to_quantize"] == "model.layers"
    assert "self_attn.q_proj" in qc["modules_in_block_to_quantize"][0]
    meta = qc["meta"]["lrgptq"]
    assert (meta["route"], meta["accumulator"], meta["order"], meta["scale_dtype"]) == (
        "cholesky", "gram", "act", "float16")
    # In order, and a route that does not damp H: desc_act false, no damp_percent. (svdqr with
    # order="identity" still moves columns past the rank last, which is act-order for readers.)
    m2, r2, _ = quantized(route="rtn", order="identity")
    lrgptq.save(m2, r2, tmp_path / "id")
    qc2 = json.loads((tmp_path / "id" / "config.json").read_text())["quantization_config"]
    assert qc2["desc_act"] is False and "damp_percent" not in qc2 and qc2["meta"]["lrgptq"]["truncation"] == "rel"


def _with_zero_points(seed=0):
    # Non-negative weights give min-max groups with xmin = 0, so z = round(-xmin/scale) = 0.
    torch.manual_seed(seed)
    model = ARCHS["llama"]().eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.abs_()
    report = lrgptq.quantize_model(model, torch.randint(0, VOCAB, (2, 16)),
                                   lrgptq.QuantConfig(bits=4, group_size=32, route="rtn"), progress=False)
    return model, report


def test_zero_point_zero_is_an_explicit_decision(tmp_path):
    model, report = _with_zero_points()
    assert int((report.results["model.layers.0.mlp.up_proj"].zeros == 0).sum()) > 0
    saved = lrgptq.save(model, report, tmp_path / "auto", dtype=torch.float32)
    assert saved.checkpoint_format == "gptq_v2" and "model.layers.0.mlp.up_proj" in saved.zero_point_layers
    qc = json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2"
    loaded = lrgptq.load(tmp_path / "auto")
    for name in report.results:
        assert torch.equal(loaded.get_submodule(name).dequantize(), weight_matrix(model.get_submodule(name)))
    with pytest.raises(ValueError, match=r"'gptq' \(v1\) .* cannot hold .* model\.layers\.0\.mlp\.up_proj"):
        lrgptq.save(model, report, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_auto_format_is_v1_for_symmetric_and_v2_for_asymmetric_grids(tmp_path, bits, sym):
    # docs/interop.md: GPTQModel refuses asymmetric v1 files it did not write, and every reader
    # (GPTQModel, transformers + optimum, vLLM) takes asymmetric gptq_v2 and symmetric v1. The
    # rule depends on the grid alone: these models have no z = 0, and no warning is given.
    model, report, ids = quantized(bits=bits, sym=sym, **ACT)
    assert not zero_point_layers(report)
    want = "gptq" if sym else "gptq_v2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = lrgptq.save(model, report, tmp_path / "auto", dtype=torch.float32)
    assert saved.checkpoint_format == want and saved.zero_point_layers == {}
    for name in ("config.json", "quantize_config.json"):
        qc = json.loads((tmp_path / "auto" / name).read_text())
        assert qc.get("quantization_config", qc)["checkpoint_format"] == want, name
    loaded = lrgptq.load(tmp_path / "auto")
    for name in report.results:
        q = loaded.get_submodule(name)
        assert q.checkpoint_format == want, name
        assert torch.equal(q.dequantize(), weight_matrix(model.get_submodule(name))), name
    # The other format on request, read back to the same weights (v1 needs no z = 0 here).
    other = "gptq_v2" if sym else "gptq"
    assert lrgptq.save(model, report, tmp_path / other, checkpoint_format=other,
                       dtype=torch.float32).checkpoint_format == other
    a, b = lrgptq.load(tmp_path / other), lrgptq.load(tmp_path / "auto")
    for name in report.results:
        assert torch.equal(a.get_submodule(name).dequantize(), b.get_submodule(name).dequantize()), name


def test_shards_index_and_tokenizer(tmp_path):
    class Tok:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")

    model, report, ids = quantized("gpt2", **ACT)  # Conv1D layers, tied lm_head
    saved = lrgptq.save(model, report, tmp_path / "ckpt", Tok(), max_shard_size=40_000, dtype=torch.float32)
    assert len(saved.files) > 2 and "model.safetensors.index.json" in saved.files
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings: written once
    loaded = lrgptq.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ref, out = logits(model, ids), logits(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_writes_are_atomic(tmp_path, monkeypatch):
    model, report, _ = quantized(route="rtn")
    out = tmp_path / "ckpt"
    lrgptq.save(model, report, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(lrgptq.writer, "write_json_atomic", boom)
    with pytest.raises(OSError, match="disk full"):
        lrgptq.save(model, report, out, dtype=torch.float32)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    lrgptq.save(model, report, out, dtype=torch.float32)  # success replaces it
    assert lrgptq.load(out).model.layers[0].self_attn.q_proj.scales.dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="lrgptq did not write it; refusing to replace it"):
        lrgptq.save(model, report, tmp_path / "data")


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_never_replaces_a_directory_it_did_not_write(tmp_path):
    model, report, _ = quantized(route="rtn")
    hf = tmp_path / "hf-model"  # what every Hugging Face model directory looks like: config.json + weights
    model.save_pretrained(hf)
    (hf / "README.md").write_text("my notes")
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("1,2")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, message in ((hf, r"a model directory \(it has config\.json\) but no lrgptq\.json"),
                            (user, r"holds 1 files or directories but no lrgptq\.json.*new or empty directory"),
                            (a_file, r"is not a directory")):
        before = _snapshot(target) if target.is_dir() else target.read_bytes()
        with pytest.raises(ValueError, match=message):
            lrgptq.save(model, report, target)
        assert (_snapshot(target) if target.is_dir() else target.read_bytes()) == before, target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "hf-model", "user"]  # no temporary left


def test_save_replaces_only_its_own_files(tmp_path):
    model, report, _ = quantized(route="rtn")
    empty = tmp_path / "empty"
    empty.mkdir()
    lrgptq.save(model, report, empty)  # an empty directory is fine
    marker = json.loads((empty / "lrgptq.json").read_text())
    assert marker["written_by"] == "lrgptq"
    assert sorted(marker["files"]) == sorted(p.name for p in empty.iterdir() if p.name != "lrgptq.json")
    lrgptq.save(model, report, empty, dtype=torch.float32)  # its own checkpoint: replaced
    (empty / "notes.txt").write_text("mine")  # a file the user added since
    with pytest.raises(ValueError, match=r"files that save did not write \(notes\.txt\).*move them out"):
        lrgptq.save(model, report, empty)
    assert (empty / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_gets_the_umask_like_any_writer(tmp_path, umask):
    from lrgptq.streaming import quantize_streamed

    model, report, ids = quantized(route="rtn")
    model.save_pretrained(tmp_path / "model")
    old = os.umask(umask)
    try:
        lrgptq.save(model, report, tmp_path / "ckpt")
        quantize_streamed(tmp_path / "model", ids, tmp_path / "streamed", lrgptq.QuantConfig(route="rtn"),
                          progress=False)
    finally:
        os.umask(old)
    for out in ("ckpt", "streamed"):
        assert stat.S_IMODE((tmp_path / out).stat().st_mode) == 0o777 & ~umask, out
        for p in (tmp_path / out).iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, f"{out}/{p.name}"


def test_a_killed_save_leaves_no_complete_looking_checkpoint(tmp_path):
    # The process dies (no cleanup at all) after the tensors are written, before config.json.
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import lrgptq, lrgptq.writer as ck
        from tiny_models import ARCHS, VOCAB
        model = ARCHS["llama"]().eval()
        report = lrgptq.quantize_model(model, torch.randint(0, VOCAB, (1, 8)),
                                       lrgptq.QuantConfig(route="rtn"), progress=False)
        ck.write_json_atomic = lambda path, obj: os._exit(3)
        lrgptq.save(model, report, {str(tmp_path / "ckpt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert not (tmp_path / "ckpt").exists()
    left = list(tmp_path.iterdir())
    assert all(p.name.startswith(".ckpt.tmp-") for p in left) and left  # hidden, and never config-complete
    assert not any((p / "config.json").exists() for p in left)


# ----------------------------------------------------------------------------- malformed files


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    model, report, ids = quantized(**ACT)
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    lrgptq.save(model, report, root, checkpoint_format="gptq")
    return root, ids


def _edit_config(root, fn, name="config.json"):
    path = root / name
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _qc(key, value):
    """A consistent lie: the same wrong value in config.json and quantize_config.json."""
    def edit(root):
        _edit_config(root, lambda c: c["quantization_config"].__setitem__(key, value))
        _edit_config(root, lambda c: c.__setitem__(key, value), "quantize_config.json")
    return edit


def _edit_tensors(fn):
    def edit(root):
        path = root / "model.safetensors"
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return edit


Q = "model.layers.0.self_attn.q_proj"
MALFORMED = {
    "truncated file": (lambda r: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:5000]),
                       r"model\.safetensors: not a readable safetensors file"),
    "not safetensors": (lambda r: (r / "model.safetensors").write_bytes(b"\x10" * 64), r"not a readable safetensors"),
    "no tensors file": (lambda r: (r / "model.safetensors").unlink(), r"no model\.safetensors"),
    "no config": (lambda r: (r / "config.json").unlink(), r"config\.json: missing"),
    "config not json": (lambda r: (r / "config.json").write_text("{"), r"config\.json: not readable JSON"),
    "config a list": (lambda r: (r / "config.json").write_text("[]"), r"must hold a JSON object"),
    "not quantized": (lambda r: _edit_config(r, lambda c: c.pop("quantization_config")), r"not a quantized"),
    "quant method": (_qc("quant_method", "awq"), r"quant_method is 'awq'"),
    "quant method a list": (_qc("quant_method", ["gptq"]), r"quant_method is \['gptq'\]"),  # found by the fuzzer
    "bits not in set": (_qc("bits", 5), r"bits must be one of \(2, 3, 4, 8\), got 5"),
    "bits a string": (_qc("bits", "4"), r"bits must be one of .* got '4'"),
    "bits lie": (_qc("bits", 8), r"model\.layers\.0\.mlp\.down_proj\.qweight is torch\.int32 \(16, 64\), but an? "
                                 r"8-bit layer .* needs torch\.int32 \(32, 64\)"),
    "group size lie": (_qc("group_size", 64), r"\.(qzeros|scales) is .* group_size=64"),
    "group size zero": (_qc("group_size", 0), r"group_size must be -1 or a positive integer"),
    "sym lie": (_qc("sym", True), r"sym is true but model\.layers\.0\.\S+'s zero points"),
    "desc_act lie": (_qc("desc_act", False), r"desc_act is false but model\.layers\.0\.\S+\.g_idx"),
    "format unknown": (_qc("checkpoint_format", "marlin"), r"checkpoint_format must be one of"),
    "format lie": (_qc("checkpoint_format", "gptq_v2"), None),  # may load (z off by one) or fail sym/v1 checks
    "configs disagree": (lambda r: _edit_config(r, lambda c: c.__setitem__("bits", 8), "quantize_config.json"),
                         r"quantize_config\.json says .* which one is true"),
    "unknown architecture": (lambda r: _edit_config(r, lambda c: c.__setitem__("architectures", ["Nope"])),
                             r"architectures must name a transformers model class"),
    "model config lie": (lambda r: _edit_config(r, lambda c: c.__setitem__("num_hidden_layers", 3)),
                         r"model\.layers\.2\..* is missing"),
    "missing scales": (_edit_tensors(lambda t: t.pop(f"{Q}.scales")), rf"tensor {Q}\.scales is missing"),
    "missing norm": (_edit_tensors(lambda t: t.pop("model.norm.weight")), r"model\.norm\.weight is missing"),
    "extra tensor": (_edit_tensors(lambda t: t.__setitem__("extra.thing", torch.zeros(2))),
                     r"unexpected tensor extra\.thing"),
    "qweight dtype": (_edit_tensors(lambda t: t.__setitem__(f"{Q}.qweight", t[f"{Q}.qweight"].long())),
                      rf"{Q}\.qweight is torch\.int64"),
    "scales dtype": (_edit_tensors(lambda t: t.__setitem__(f"{Q}.scales", t[f"{Q}.scales"].int())),
                     rf"{Q}\.scales must be float16, bfloat16 or float32"),
    "embedding shape": (_edit_tensors(lambda t: t.__setitem__("model.embed_tokens.weight",
                                                              t["model.embed_tokens.weight"][:-1].clone())),
                        r"model\.embed_tokens\.weight is torch\.float16 \(95, 64\)"),
    "g_idx out of range": (_edit_tensors(lambda t: t[f"{Q}.g_idx"].__setitem__(0, 99)), rf"{Q}\.g_idx holds groups"),
    "nan scales": (_edit_tensors(lambda t: t[f"{Q}.scales"].__setitem__((0, 0), float("nan"))), r"NaN or Inf"),
    "v1 zero field of ones": (_edit_tensors(lambda t: t[f"{Q}.qzeros"].fill_(-1)), r"holds the v1 field 15"),
    "qweight on a norm": (_edit_tensors(lambda t: t.__setitem__("model.norm.qweight", torch.zeros(1, 1).int())),
                          r"quantizes model\.norm, which in this architecture is LlamaRMSNorm"),
    "index names a missing file": (
        lambda r: (r / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "nope.safetensors"}})),
        r"names 'nope\.safetensors', which is not a file"),
    "nan in a norm weight": (_edit_tensors(lambda t: t["model.norm.weight"].__setitem__(3, float("nan"))),
                             r"model\.safetensors: model\.norm\.weight holds 1 NaN or Inf"),
    "inf in the embedding": (_edit_tensors(lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0), float("inf"))),
                             r"model\.embed_tokens\.weight holds 1 NaN or Inf"),
    "zero scale": (_edit_tensors(lambda t: t[f"{Q}.scales"].__setitem__((0, 1), 0.0)),
                   rf"{Q}\.scales holds scales <= 0 \(smallest 0\)"),
    "negative scale": (_edit_tensors(lambda t: t[f"{Q}.scales"].__setitem__((0, 1), -0.5)),
                       rf"{Q}\.scales holds scales <= 0 \(smallest -0\.5\)"),
    "scale that overflows": (_edit_tensors(lambda t: t.__setitem__(f"{Q}.scales", t[f"{Q}.scales"].float().index_fill_(
        1, torch.tensor([0]), 3e38))), rf"{Q}\.scales holds a scale \(3e\+38\) whose weights .* overflow float32"),
    "config nested too deep": (lambda r: (r / "config.json").write_text("[" * 100_000), r"not readable JSON"),
    "config too large": (lambda r: os.truncate(r / "config.json", 65 * 2**20), r"more than the 67108864"),
    "index of a million layers": (
        lambda r: (r / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {f"l.{i}.qweight": "model.safetensors" for i in range(1_000_001)}})),
        r"1000001 tensors, more than the 1000000 \(MAX_TENSORS\)"),
    "index escapes the directory": (
        lambda r: (r / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x"}})),
        r"not a file in"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_names_what_is_wrong(pristine, tmp_path, case):
    root = tmp_path / "ckpt"
    shutil.copytree(pristine[0], root)
    mutate, message = MALFORMED[case]
    mutate(root)
    if message is None:
        try:
            lrgptq.load(root)
        except ValueError:
            pass
        return
    with pytest.raises(ValueError, match=message):
        lrgptq.load(root)


def _load_within(root, seconds):
    """lrgptq.load(root) in a thread: what it raised, or a failure if it is still blocked after
    ``seconds`` (a reader stuck on a FIFO never returns)."""
    out = {}

    def run():
        try:
            lrgptq.load(root)
            out["result"] = "loaded"
        except Exception as err:  # noqa: BLE001  (handed to the test)
            out["result"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"lrgptq.load({root}) still blocked after {seconds} s")
    return out["result"]


def test_a_cast_that_overflows_is_refused(tmp_path):
    model, report, _ = quantized(route="rtn")
    with torch.no_grad():
        model.model.norm.weight[5] = 1e5  # finite in float32, Inf in float16
    lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    lrgptq.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"model\.norm\.weight overflows torch\.float16; load with dtype=torch\.float32"):
        lrgptq.load(tmp_path / "ckpt", dtype=torch.float16)


@pytest.mark.parametrize("name", ["config.json", "quantize_config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "link to /dev/urandom", "directory"])
def test_only_regular_files_are_read(pristine, tmp_path, name, kind):
    root = tmp_path / "ckpt"
    shutil.copytree(pristine[0], root)
    (root / name).unlink()
    if kind == "fifo":
        os.mkfifo(root / name)
    elif kind == "directory":
        (root / name).mkdir()
    else:
        (root / name).symlink_to("/dev/urandom")
    err = _load_within(root, 20)
    assert isinstance(err, ValueError) and re.search(rf"{re.escape(name)}: not a regular file", str(err)), err


def _mutations(gen, root):
    """Random damage of one kind to a copy of a checkpoint; returns a description."""
    r = lambda n: int(torch.randint(0, n, (1,), generator=gen))  # noqa: E731
    st = root / "model.safetensors"
    kind = r(7)
    if kind == 6:  # a field of the model's own config set to a plausible wrong value
        keys = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "num_hidden_layers", "architectures", "tie_word_embeddings", "model_type", "dtype"]
        key = keys[r(len(keys))]
        values = [None, 0, -1, 1, 3, 32, 128, "64", True, [], ["LlamaModel"], "float64", "gpt2", 1e9]
        value = values[r(len(values))]
        _edit_config(root, lambda c: c.__setitem__(key, value))
        return f"config.{key} = {value!r}"
    if kind == 0:
        data = st.read_bytes()
        cut = r(len(data))
        st.write_bytes(data[:cut])
        return f"truncate at {cut}"
    if kind in (1, 2):  # flip bytes in the header (kind 1) or anywhere (kind 2)
        data = bytearray(st.read_bytes())
        span = 8 + int.from_bytes(data[:8], "little") if kind == 1 else len(data)
        spots = [r(span) for _ in range(1 + r(4))]
        for i in spots:
            data[i] ^= 1 << r(8)
        st.write_bytes(bytes(data))
        return f"flip bits at {spots}"
    if kind == 3:  # a quantization_config field set to a plausible wrong value, or removed
        keys = ["bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method", "static_groups"]
        key = keys[r(len(keys))]
        values = [None, -1, 0, 1, 2, 3, 8, 16, 32, 128, "4", True, False, [], {}, "gptq", "gptq_v2", 1e9]
        value = values[r(len(values))]
        if value is None:
            _edit_config(root, lambda c: c["quantization_config"].pop(key, None))
        else:
            _edit_config(root, lambda c: c["quantization_config"].__setitem__(key, value))
        return f"quantization_config.{key} = {value!r}"
    tensors = load_file(str(st))
    keys = sorted(tensors)
    key = keys[r(len(keys))]
    if kind == 4:
        del tensors[key]
        what = f"drop {key}"
    else:  # replace a tensor by one of another dtype or shape
        t = tensors[key]
        options = [t.to(torch.int64), t.to(torch.float16), t.flatten(), t[..., :-1].clone() if t.dim() else t,
                   torch.zeros(3, 3, dtype=t.dtype), t.to(torch.int32), t.t().contiguous() if t.dim() == 2 else t]
        tensors[key] = options[r(len(options))].contiguous()
        what = f"replace {key} by {tensors[key].dtype} {tuple(tensors[key].shape)}"
    save_file(tensors, str(st), metadata={"format": "pt"})
    return what


def test_fuzz_the_loader(pristine, tmp_path, gen):
    # Every mutated checkpoint either loads into a model that runs, or raises ValueError; any
    # other exception (or a crash of the process) fails. Bounded: 60 mutations, ~3 s.
    root0, ids = pristine
    outcomes = {"loaded": 0, "ValueError": 0}
    for i in range(60):
        root = tmp_path / f"m{i}"
        shutil.copytree(root0, root)
        what = _mutations(gen, root)
        try:
            model = lrgptq.load(root)
        except ValueError:
            outcomes["ValueError"] += 1
            continue
        except Exception as err:  # noqa: BLE001  (the point of the test)
            pytest.fail(f"mutation {i} ({what}; seed {gen.initial_seed()}) raised {type(err).__name__}: {err}")
        out = logits(model, ids[:1])
        assert out.shape == (1, ids.shape[1], VOCAB), what
        outcomes["loaded"] += 1
        shutil.rmtree(root)
    assert outcomes["ValueError"] > 20, outcomes  # most damage is caught, not silently loaded
