"""quantize_model on tiny random-weight models of every supported architecture."""

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq.models import find_blocks, find_linears  # noqa: E402
from lrgptq.calib import calibration_batches, group_windows  # noqa: E402

from tiny_models import ARCHS, VOCAB, output_of  # noqa: E402


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_eight_bit_pipeline_changes_outputs_little(arch: str) -> None:
    # 8-bit grids put every weight within s/2 = range/510 of its value: a relative weight error
    # below 0.2 % per layer. Through 2 blocks of <= 7 layers the output error stays a few tenths
    # of a percent of the output scale; 3 % leaves a margin and still fails if a layer is wrong
    # (a 4-bit or a broken layer moves the outputs by 5-50 %).
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    ids = torch.randint(0, VOCAB, (4, 32))
    with torch.no_grad():
        ref = output_of(model, ids)
    hooks_before = _hook_count(model)
    _, blocks = find_blocks(model)
    originals = {
        (i, n): m.weight.detach().clone() for i, b in enumerate(blocks) for n, m in find_linears(b).items()
    }
    report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(bits=8, group_size=32), progress=False)
    assert _hook_count(model) == hooks_before
    assert len(report.layers) == len(originals)
    for (i, n), w0 in originals.items():
        m = dict(find_linears(blocks[i]))[n]
        assert not torch.equal(m.weight, w0), f"{arch}: block {i} {n} was not quantized"
    with torch.no_grad():
        out = output_of(model, ids)
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.03, f"{arch}: 8-bit changed the outputs by {err:.2%} of their scale"
    assert all(r["rank"] > 0 for r in report.layers)


def test_four_bit_is_coarser_than_eight_bit() -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 32))
    errs = {}
    for bits in (4, 8):
        model = ARCHS["llama"]().eval()
        with torch.no_grad():
            ref = output_of(model, ids)
        lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(bits=bits, group_size=32), progress=False)
        with torch.no_grad():
            errs[bits] = float((output_of(model, ids) - ref).abs().max())
    assert errs[4] > 4 * errs[8]


def test_failure_restores_weights_and_removes_hooks() -> None:
    torch.manual_seed(2)
    model = ARCHS["llama"]().eval()
    # Block 0 quantizes fine; block 1's down_proj holds an Inf, so the run fails after 8+ layers
    # were changed: every one of them must come back.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = _hook_count(model)
    ids = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(RuntimeError, match=r"layers\.1\.mlp\.down_proj.*W contains NaN or Inf"):
        lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(bits=4, group_size=32), progress=False)
    assert _hook_count(model) == hooks_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was left changed after a failed quantization"


def test_layers_with_no_tokens_are_rounded_and_reported() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 32)
    acc = lrgptq.Accumulator("qr", 32)
    res = lrgptq.quantize_linear(w, acc, lrgptq.QuantConfig(bits=4, group_size=32), name="expert.7")
    assert "no calibration tokens" in res.report["note"]
    rtn = lrgptq.quantize_linear(w, torch.randn(8, 32), lrgptq.QuantConfig(bits=4, group_size=32, route="rtn"))
    assert torch.equal(res.codes, rtn.codes)


def test_user_named_blocks_and_skip() -> None:
    torch.manual_seed(4)
    model = ARCHS["opt"]().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    report = lrgptq.quantize_model(
        model, ids, lrgptq.QuantConfig(bits=4, group_size=32), blocks="model.decoder.layers",
        skip=("fc1", "fc2"), progress=False,
    )
    names = [r["name"] for r in report.layers]
    assert names and all(n.startswith("model.decoder.layers.") for n in names)
    assert not any("fc1" in n or "fc2" in n for n in names)
    with pytest.raises(ValueError, match="no submodule"):
        lrgptq.quantize_model(model, ids, blocks="model.nope", progress=False)


@pytest.mark.parametrize("method", ["gptq", "lrgptq"])
def test_fewer_tokens_than_inputs_is_reported(method: str) -> None:
    torch.manual_seed(5)
    model = ARCHS["llama"]().eval()
    ids = torch.randint(0, VOCAB, (1, 24))  # 24 tokens, layers with 64 and 128 inputs
    with torch.no_grad():
        ref = output_of(model, ids)
    report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig.for_method(method, bits=4, group_size=32),
                                   progress=False)
    with torch.no_grad():
        out = output_of(model, ids)
    assert torch.isfinite(out).all()
    assert all("24 calibration tokens" in r["note"] for r in report.layers)
    assert all(r["tokens"] == 24 for r in report.layers)
    assert float((out - ref).abs().max()) < float(ref.abs().max())


def test_capture_passes_stop_before_the_layers_they_capture() -> None:
    # True-sequential capture of a Llama block: the passes for q/k/v, o, gate/up and down stop
    # at the captured layer's input, so down_proj (the last layer) multiplies only in the pass
    # that finds the subsets (batch 0) and in the pass that makes the next block's inputs, and
    # q_proj in the o, gate/up and down capture passes and the next-inputs pass.
    torch.manual_seed(0)
    model = ARCHS["llama"]().eval()
    ids = torch.randint(0, VOCAB, (3, 16))
    _, blocks = find_blocks(model)
    runs = {}
    handles = []
    for i, block in enumerate(blocks):
        for name, m in find_linears(block).items():
            runs[(i, name)] = 0
            handles.append(m.register_forward_hook(lambda *_a, key=(i, name): runs.__setitem__(key, runs[key] + 1)))
    lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(bits=4, group_size=16), progress=False)
    for h in handles:
        h.remove()
    n = len(calibration_batches(ids))  # batches: window 0 alone, windows 1 and 2 in one forward
    assert n == 2
    for i in range(len(blocks)):
        assert runs[(i, "mlp.down_proj")] == n + 1, runs
        assert runs[(i, "mlp.up_proj")] == 2 * n + 1, runs
        assert runs[(i, "self_attn.q_proj")] == 4 * n + 1, runs


def test_group_windows() -> None:
    w = [torch.full((1, 8), i) for i in range(6)]
    other = torch.zeros(1, 5, dtype=torch.long)
    masked = {"input_ids": torch.ones(1, 8, dtype=torch.long)}
    got = group_windows(w[:4] + [other] + w[4:] + [masked], max_tokens=16)
    assert [tuple(b.shape) if isinstance(b, torch.Tensor) else "dict" for b in got] == [
        (1, 8), (2, 8), (1, 8), (1, 5), (2, 8), "dict"]
    assert torch.equal(torch.cat([b for b in got if isinstance(b, torch.Tensor) and b.shape[1] == 8]),
                       torch.cat(w))  # the same windows in the same order


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_grouped_windows_quantize_as_one_at_a_time(arch: str, monkeypatch) -> None:
    """Windows grouped into one forward give the model quantized one window at a time does, up to
    the rounding of the larger GEMMs: every code equal but for rounding ties, weights close."""
    if arch not in ARCHS:
        pytest.skip(f"no tiny {arch}")
    ids = torch.randint(0, VOCAB, (7, 24), generator=torch.Generator().manual_seed(1))
    cfg = lrgptq.QuantConfig(bits=4, group_size=16)
    models = {}
    for grouped in (True, False):
        torch.manual_seed(0)
        model = ARCHS[arch]().eval()
        if not grouped:
            monkeypatch.setattr(lrgptq.pipeline, "calibration_batches",
                                lambda *a, **k: calibration_batches(*a, **{**k, "batch_tokens": None}))
        lrgptq.quantize_model(model, ids, cfg, progress=False)
        models[grouped] = model
    a, b = dict(models[True].named_parameters()), dict(models[False].named_parameters())
    changed = 0
    for name, p in a.items():
        q = b[name]
        assert (p - q).abs().max() <= 1e-2 * q.abs().max(), name
        changed += int((p != q).sum())
    total = sum(p.numel() for p in a.values())
    assert changed <= 1e-2 * total
    assert len(calibration_batches(ids)) == 2  # the grouped run did group: window 0, then 6 in one
