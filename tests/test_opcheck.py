"""torch.library.opcheck over every lrgptq op, on the CPU with small inputs.

opcheck checks that an op's schema matches what its kernel does (mutation, aliasing), that its
autograd registration is consistent, and, where the op has a Meta kernel, that the fake-tensor
kernel gives the real kernel's shapes, dtypes and strides and that the op traces under AOT
autograd with dynamic shapes. These tests call the raw ops (torch.ops.lrgptq.*): the op and
its registration are what is under test.

Skipped, and why: ``factor`` has no Meta kernel (its output rank k, and so U's shape, depends
on the data: the pivot loop and the truncation rule decide it), so only ``test_schema`` and
``test_autograd_registration`` run on it.
"""
import pytest
import torch

import reference as ref
from util import ops, problem, rand_X, raw_ops

F64 = torch.float64
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_META_CHECKS = ("test_schema", "test_autograd_registration")


def _engine_inputs(gen, d_out=5, d=24):
    W, X, H = problem(gen, d_out, d)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    return W, perm, ref.cholesky_U(H, perm), X, H


def _layer(gen, d=64, d_out=16, bits=4, group_size=32):
    """A small GPTQ-layout layer: qweight, qzeros, scales, g_idx (v1 zero points)."""
    G = d // group_size
    codes = torch.randint(0, 2**bits, (d, d_out), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits - 1, (G, d_out), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(G, d_out, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(d, dtype=torch.int32) // group_size
    return ops().pack_bits(codes, bits, 0), ops().pack_bits(zeros, bits, 1), scales, g_idx


def cases(gen):
    """op name -> (args, checks) for one small call of each op."""
    W, perm, U, X, H = _engine_inputs(gen)
    d = W.shape[1]
    Xb = rand_X(gen, 10, d)
    R = ref.qr_R(X)
    qweight, qzeros, scales, g_idx = _layer(gen)
    x = torch.randn(3, 64, generator=gen)
    dim, K = 2, 16
    vq_codes = torch.randint(0, K, (6, 4), generator=gen, dtype=torch.int32)
    codebooks = torch.randint(-127, 128, (1, 1, K, dim), generator=gen, dtype=torch.int8)
    return {
        "gram_update": ((torch.zeros(d, d, dtype=F64), Xb), ALL_CHECKS),
        "qr_update": ((torch.zeros(d, d, dtype=F64), Xb), ALL_CHECKS),
        "sketch_update": ((torch.zeros(6, d, dtype=F64), Xb, 3, 0, "sparse", 4), ALL_CHECKS),
        "factor": ((R, "qr", "svdqr", "pivot", 0.01, "mean", 8, "rel", 1e-4, F64), NO_META_CHECKS),
        "heldout_loss": ((W, W.round(), R, "qr"), ALL_CHECKS),
        "gptq_quantize": ((W, perm, U, False, 3, 8, False, False, False, 16, 2, "minmax", 4), ALL_CHECKS),
        "pack_bits": ((torch.randint(0, 8, (64, 5), generator=gen, dtype=torch.uint8), 3, 0), ALL_CHECKS),
        "unpack_bits": ((qweight, 4, 0, 64), ALL_CHECKS),
        "qmatmul": ((x, qweight, qzeros, scales, g_idx, 4, 1, torch.randn(16, generator=gen)), ALL_CHECKS),
        "vq_quantize": ((W, perm, U, False, dim, 2, 8, -1, 3, True, None, 16), ALL_CHECKS),
        "vq_matmul": ((torch.randn(2, 8, generator=gen), vq_codes, codebooks, torch.ones(1, 1),
                       torch.randperm(8, generator=gen), -1, -1, None), ALL_CHECKS),
    }


OPS = list(cases(torch.Generator().manual_seed(0)))


def test_every_registered_op_is_checked():
    """A new op in csrc/ops.cpp fails here until it has a case above."""
    raw_ops()
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("lrgptq::")}
    assert registered == set(OPS), f"unchecked: {sorted(registered - set(OPS))}, gone: {sorted(set(OPS) - registered)}"


@pytest.mark.parametrize("name", OPS)
def test_opcheck(gen, name):
    args, checks = cases(gen)[name]
    op = getattr(raw_ops(), name).default
    result = torch.library.opcheck(op, args, test_utils=checks)
    assert set(result) == set(checks) and all(v == "SUCCESS" for v in result.values()), result
