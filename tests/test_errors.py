"""Bad input gives a clear Python exception, never a crash: QuantConfig validation names the field,
non-finite X names "X", integer tensors are rejected, quantize_linear names the layer."""
import re

import pytest
import torch

import lrgptq
from util import ops, rand_X, randn, raw_ops

ERR = (RuntimeError, ValueError, TypeError)

BAD_CONFIG = [  # field, bad value, a word the message must carry from "what is allowed"
    ("bits", 1, "8"),
    ("bits", 9, "8"),
    ("group_size", 0, "-1"),
    ("group_size", -2, "-1"),
    ("route", "gptq", "svdqr"),
    ("order", "random", "pivot"),
    ("accumulator", "hessian", "gram"),
    ("sketch_kind", "dense", "sparse"),
    ("damp_ref", "max", "median"),
    ("truncation", "soft", "energy"),
    ("zeta", 0, None),
    ("damp", -0.5, None),
    ("max_retries", -1, None),
    ("tau", -1e-3, None),
    ("block_size", 0, None),
    ("sketch_size", 0, None),
    ("compute_dtype", torch.int32, "float32"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_CONFIG, ids=[f"{f}={v}" for f, v, _ in BAD_CONFIG])
def test_quant_config_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as e:
        lrgptq.QuantConfig(**{field: value})
    msg = str(e.value)
    assert field in msg, msg
    assert str(value).replace("torch.", "") in msg, msg
    if allowed is not None:
        assert allowed in msg, msg


def test_quant_config_defaults_are_valid():
    c = lrgptq.QuantConfig()
    assert (c.bits, c.group_size, c.route, c.order, c.accumulator, c.block_size) == (4, 128, "svdqr", "pivot", "gram", 128)
    assert lrgptq.QuantConfig.for_method("lrgptq") == lrgptq.QuantConfig(damp="auto", mse=True)
    assert c.compute_dtype == torch.float32
    for route in ("cholesky", "svdqr", "ql", "rtn"):
        lrgptq.QuantConfig(route=route, bits=8, group_size=-1, sym=True, mse=True, static_groups=True)


@pytest.mark.parametrize("overrides,damp,mse", [
    ({}, "auto", True),
    ({"damp": 0.1}, 0.1, True),                                      # overrides win
    ({"mse": False}, "auto", False),
    ({"route": "ql", "accumulator": "qr"}, 0.01, True),              # auto cannot serve them: default damping
    ({"accumulator": "sketch", "sketch_size": 64}, 0.01, True),
    ({"vq_dim": 2, "bits": 2}, 0.01, False),                         # GPTVQ fits codebooks, not ranges
    ({"grid": "noclip"}, "auto", False),                             # noclip sets its own range
])
def test_the_lrgptq_preset_yields_to_overrides_it_cannot_serve(overrides, damp, mse):
    c = lrgptq.QuantConfig.for_method("lrgptq", **overrides)
    assert (c.damp, c.mse) == (damp, mse)
    with pytest.raises(ValueError, match="damp"):  # given explicitly, the conflict is an error
        lrgptq.QuantConfig.for_method("lrgptq", damp="auto", route="ql", accumulator="qr")


@pytest.mark.parametrize("kind", ["gram", "qr", "sketch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_X_names_X(gen, kind, bad):
    X = rand_X(gen, 20, 8)
    X[11, 3] = bad
    acc = lrgptq.Accumulator(kind, 8, sketch_size=6)
    with pytest.raises((RuntimeError, ValueError), match=r"\bX\b"):
        acc.add(X)
    d = 8
    state = {"gram": torch.zeros(d, d, dtype=torch.float64), "qr": torch.zeros(d, d, dtype=torch.float64),
             "sketch": torch.zeros(6, d, dtype=torch.float64)}[kind]
    with pytest.raises((RuntimeError, ValueError), match=r"\bX\b"):
        if kind == "gram":
            ops().gram_update(state, X)
        elif kind == "qr":
            ops().qr_update(state, X)
        else:
            ops().sketch_update(state, X, seed=0, offset=0, kind="sparse", zeta=4)


@pytest.mark.parametrize("kind", ["gram", "qr", "sketch"])
def test_integer_X_is_an_error(kind):
    X = torch.ones(5, 8, dtype=torch.int64)
    with pytest.raises(ERR):
        lrgptq.Accumulator(kind, 8, sketch_size=6).add(X)
    with pytest.raises(ERR):
        if kind == "gram":
            ops().gram_update(torch.zeros(8, 8, dtype=torch.float64), X)
        elif kind == "qr":
            ops().qr_update(torch.zeros(8, 8, dtype=torch.float64), X)
        else:
            ops().sketch_update(torch.zeros(6, 8, dtype=torch.float64), X, seed=0, offset=0, kind="sparse", zeta=4)


def test_wrong_d_is_an_error(gen):
    X = rand_X(gen, 10, 9)
    for kind in ("gram", "qr"):
        with pytest.raises(ERR):
            lrgptq.Accumulator(kind, 8).add(X)
    with pytest.raises(ERR):
        ops().gram_update(torch.zeros(8, 8, dtype=torch.float64), X)
    with pytest.raises(ERR):
        ops().qr_update(torch.zeros(8, 8, dtype=torch.float64), X)


def test_factor_bad_strings_are_errors(gen):
    # The raw op's own checks of its string arguments (by position): ops.factor passes them through.
    X = rand_X(gen, 30, 8)
    H, R = X.T @ X, torch.linalg.qr(X, mode="r").R.abs().triu()  # any upper R will do here
    chol = [H, "gram", "cholesky", "identity", 0.01, "mean", 8, "none", 0.0, torch.float64]
    svd = [R, "qr", "svdqr", "identity", 0.0, "mean", 8, "rel", 1e-4, torch.float64]
    raw_ops().factor(*chol)  # sanity: the good calls work
    raw_ops().factor(*svd)
    for good, i, v in ((chol, 1, "hessian"), (chol, 2, "lu"), (chol, 3, "random"), (chol, 5, "max"),
                       (svd, 7, "soft"), (svd, 3, "random")):
        args = list(good)
        args[i] = v
        with pytest.raises(ERR):
            raw_ops().factor(*args)
    with pytest.raises(ERR):
        raw_ops().factor(H[:, :7].contiguous(), *chol[1:])
    with pytest.raises(ERR):
        raw_ops().factor(H.to(torch.int64), *chol[1:])


NAME = "model.layers.3.mlp.down_proj"


def _bad_layer_calls(gen):
    W = randn(gen, 6, 16)
    X = rand_X(gen, 40, 16)
    nanW = W.clone()
    nanW[1, 1] = float("nan")
    cfg = lrgptq.QuantConfig(group_size=-1)
    return {
        "nan_weight": (nanW, X, cfg),
        "nan_inputs": (W, torch.where(X > 2, float("inf"), X), cfg),
        "d_mismatch": (W, X[:, :12], cfg),
        "int_weight": (W.round().to(torch.int32), X, cfg),
    }


@pytest.mark.parametrize("case", ["nan_weight", "nan_inputs", "d_mismatch", "int_weight"])
def test_quantize_linear_error_names_layer(gen, case):
    W, X, cfg = _bad_layer_calls(gen)[case]
    with pytest.raises(ERR, match=re.escape(NAME)):
        lrgptq.quantize_linear(W, X, cfg, name=NAME)


def test_quantize_linear_accepts_good_input(gen):
    W, X, cfg = _bad_layer_calls(gen)["nan_weight"]
    r = lrgptq.quantize_linear(randn(gen, 6, 16), X, cfg, name=NAME)
    assert torch.isfinite(r.weight).all() and r.codes.shape == (6, 16)
