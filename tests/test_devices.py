"""Device handling of the Python layer, checked on the CPU (the CUDA side is tests/test_cuda.py)."""
import pytest
import torch

import lrgptq
from util import rand_X, randn


def test_accumulator_state_lives_on_its_device(gen):
    for kind, extra in (("gram", {}), ("qr", {}), ("sketch", {"sketch_size": 8})):
        acc = lrgptq.Accumulator(kind, 12, device="cpu", **extra)
        acc.add(rand_X(gen, 20, 12))
        assert acc.state.device == torch.device("cpu") and acc.tokens == 20


def test_quantize_linear_leaves_the_callers_weight_alone(gen):
    """Dead features zero the engine's copy of W, never the caller's tensor (float64 W: no dtype copy)."""
    X = rand_X(gen, 64, 16)
    X[:, 3] = 0
    W = randn(gen, 8, 16)
    W_before = W.clone()
    cfg = lrgptq.QuantConfig(route="cholesky", accumulator="gram", order="act", group_size=-1,
                             compute_dtype=torch.float64)
    res = lrgptq.quantize_linear(W, X, cfg)
    assert torch.equal(W, W_before)
    assert torch.all(res.weight[:, 3] == 0) and res.codes.device == W.device


def test_vq_refuses_a_weight_off_the_cpu():
    """The GPTVQ engine has no CUDA kernel: a weight elsewhere gets a clear error, not a dispatcher one."""
    cfg = lrgptq.QuantConfig(bits=2, vq_dim=2, vq_group_cols=8, vq_group_rows=4)
    W = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="CPU only"):
        lrgptq.vq.run(W, torch.arange(8, device="meta"), torch.empty(8, 8, device="meta"), False, cfg)
