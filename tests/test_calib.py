"""Calibration input is refused before the first block with the argument named; NaN or Inf
reaching a layer names the block and the layer; a run says once what the user should know
(no layer quantized, N < d, options without effect)."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402


def _model():
    torch.manual_seed(0)
    return ARCHS["llama"]().eval()


def _untouched(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


BAD_CALIB = {  # calib -> what the message must say
    "None": (None, r"calib is None"),
    "empty list": ([], r"calib is empty"),
    "float tensor": (torch.rand(2, 8), r"calib must hold integer token ids .*float32"),
    "no samples": (torch.zeros(0, 8, dtype=torch.long), r"calib has shape \(0, 8\): no tokens"),
    "no length": (torch.zeros(4, 0, dtype=torch.long), r"calib has shape \(4, 0\): no tokens"),
    "a number": (torch.tensor(3), r"calib is a single number"),
    "id past the vocabulary": (torch.full((2, 8), VOCAB + 5), rf"calib \(batch 0\) holds token id {VOCAB + 5}, "
                                                              rf"outside the model's vocabulary of {VOCAB}"),
    "negative id": (torch.tensor([[1, 2, -1]]), rf"token id -1, outside the model's vocabulary of {VOCAB}"),
    "id past the vocabulary in a dict": ([{"input_ids": torch.tensor([[3, VOCAB]])}], rf"holds token id {VOCAB}"),
    "dict without ids": ([{"attention_mask": torch.ones(1, 4)}], r"calib\[0\] is a dict without 'input_ids'"),
    "empty tensor in a list": ([torch.zeros(1, 0, dtype=torch.long)], r"calib\[0\] has shape \(1, 0\)"),
    "an int": (7, r"calib is a int; it must be"),
    "text without tokenizer": (["some text"], r"calib is text: pass tokenizer="),
}


@pytest.mark.parametrize("case", sorted(BAD_CALIB))
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_bad_calibration_is_refused_before_the_first_block(case, method):
    model = _model()
    before = _untouched(model)
    calib, message = BAD_CALIB[case]
    with pytest.raises(ValueError, match=message):
        lrgptq.quantize_model(model, calib, lrgptq.QuantConfig.for_method(method), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_streamed_run_checks_the_vocabulary_before_writing(tmp_path):
    from lrgptq.streaming import quantize_streamed

    _model().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=rf"holds token id {VOCAB}, outside the model's vocabulary of {VOCAB}"):
        quantize_streamed(tmp_path / "model", torch.full((1, 8), VOCAB), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["gptq", "lrgptq"])
def test_nonfinite_activations_name_the_block_and_the_layer(bad, method):
    model = _model()
    with torch.no_grad():  # block 0's MLP output turns the residual stream non-finite for block 1
        model.model.layers[0].mlp.down_proj.weight.fill_(bad)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj: the calibration activations .* "
                                         r"NaN or Inf"):
        lrgptq.quantize_model(model, torch.randint(0, VOCAB, (2, 16)), lrgptq.QuantConfig.for_method(method),
                              skip=["down_proj"], progress=False)


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_zero_layers_quantized_is_a_warning():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 16))
    said = _warnings_of(lambda: lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(), skip=["proj"],
                                                      progress=False))
    assert [m for m in said if "no layer was quantized" in m], said
    said = _warnings_of(lambda: lrgptq.quantize_model(model, torch.randint(0, VOCAB, (64, 16)),
                                                      lrgptq.QuantConfig(), progress=False))
    assert not [m for m in said if "no layer" in m or "N < d" in m], said  # 1024 tokens >= d = 128


def test_fewer_tokens_than_inputs_is_one_warning_for_the_run():
    model = _model()
    said = _warnings_of(lambda: lrgptq.quantize_model(model, torch.randint(0, VOCAB, (2, 16)),
                                                      lrgptq.QuantConfig.for_method("gptq"), progress=False))
    few = [m for m in said if "N < d" in m]
    assert len(few) == 1, said  # not one per layer
    assert "14 of 14 layers" in few[0] and "N=32, d=128" in few[0], few


def test_options_without_effect_are_a_warning():
    model = _model()
    cfg = lrgptq.QuantConfig(sketch_size=16, grid_passes=2, vq_group_cols=64)
    said = _warnings_of(lambda: lrgptq.quantize_model(model, torch.randint(0, VOCAB, (64, 16)), cfg,
                                                      progress=False))
    unused = [m for m in said if "no effect" in m]
    assert len(unused) == 1, said
    for part in ("sketch_size=16 (only with accumulator='sketch')", "grid_passes=2 (only with grid='noclip')",
                 "vq_group_cols=64 (only with vq_dim > 0)"):
        assert part in unused[0], unused
    assert lrgptq.advice.unused_options(lrgptq.QuantConfig(accumulator="sketch", sketch_size=16)) == []


def test_report_results_leave_the_weight_to_the_module():
    # README: quantize_model's results hold codes, scales, zeros and g_idx; the dequantized weight
    # is the module's (res.weight is empty, not a second copy of the model).
    model = _model()
    report = lrgptq.quantize_model(model, torch.randint(0, VOCAB, (64, 16)), lrgptq.QuantConfig(group_size=32),
                                   progress=False)
    for name, res in report.results.items():
        assert res.weight.numel() == 0, name
        g = res.g_idx.long()
        W = res.scales[g].t() * (res.codes.to(res.scales.dtype) - res.zeros[g].t())
        assert torch.equal(W.to(model.get_submodule(name).weight.dtype), model.get_submodule(name).weight), name
