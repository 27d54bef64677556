"""The CPU MSE search's |e|^2.4 (csrc/mse_search.cpp, reached as lrgptq._C._pow_2_4) against
exact arithmetic, and the search itself against the reference's (libm pow) on ugly groups."""
from decimal import Decimal, getcontext

import pytest
import torch

import reference as ref
from util import gptq, make_perm, problem, randn

from lrgptq import _C

F64 = torch.float64


def _exact(x: float) -> Decimal:
    getcontext().prec = 40
    return Decimal(x) ** (Decimal(12) / Decimal(5))


@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 3), (torch.float64, 4)])
def test_pow_2_4_within_ulps_of_exact(gen, dtype, ulps):
    """Relative error against e^(12/5) in 40-digit decimal, over 60 decades and within one binade."""
    lo, hi = (-30, 30) if dtype == F64 else (-12, 12)
    e = torch.cat([10 ** (torch.rand(400, generator=gen, dtype=F64) * (hi - lo) + lo),
                   1 + torch.rand(200, generator=gen, dtype=F64)]).to(dtype)
    y = _C._pow_2_4(e)
    eps = Decimal(torch.finfo(dtype).eps)
    worst = max(abs((Decimal(float(a)) - _exact(float(x))) / _exact(float(x))) for x, a in zip(e, y))
    assert worst <= ulps * eps, f"{worst / eps:.2f} ulps (seed {gen.initial_seed()})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pow_2_4_exact_cases(dtype):
    """(2^5j)^2.4 = 2^12j exactly (the exponent split k = 5a + b with m = 1); 0 and numbers below
    the smallest normal give 0; the fold at √2 is continuous."""
    j = torch.arange(-4, 5, dtype=dtype)
    assert torch.equal(_C._pow_2_4(2.0 ** (5 * j)), 2.0 ** (12 * j))
    tiny = torch.finfo(dtype).tiny
    assert torch.equal(_C._pow_2_4(torch.tensor([0.0, tiny / 4, tiny / 2], dtype=dtype)), torch.zeros(3, dtype=dtype))
    r2 = torch.tensor([2**0.5], dtype=F64)
    around = torch.cat([torch.nextafter(r2.to(dtype), torch.tensor(0, dtype=dtype)), r2.to(dtype),
                        torch.nextafter(r2.to(dtype), torch.tensor(2, dtype=dtype))])
    torch.testing.assert_close(_C._pow_2_4(around).double(), around.double() ** 2.4, rtol=8 * torch.finfo(dtype).eps,
                               atol=0)


def _ugly_rows(gen, rows, cols):
    W = randn(gen, rows, cols)
    W[0] = 0                                # an all-zero row: the [-1, 1] range
    W[1, ::3] = 0                           # many exact zeros
    W[2, 5] = 40                            # one outlier
    W[3] = W[3].abs()                       # one-signed: the range's other side is 0
    W[4] = torch.linspace(-1, 1, cols, dtype=F64)  # values on a lattice: near-ties between shrinks
    W[5] *= 1e-6                            # tiny values
    return W


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, 37, 128])
def test_mse_grids_match_reference(gen, bits, sym, group_size):
    """RTN (U with no rows) with the MSE search at group starts and as static groups: the engine's
    grids equal the reference's (libm pow) in float64, so the polynomial picks the same shrink."""
    d = group_size * (256 // group_size)  # the reference wants whole groups
    W = _ugly_rows(gen, 12, d)
    codes, scales, zeros, Q = ref.rtn(W, bits=bits, group_size=group_size, sym=sym, mse=True)
    U0 = torch.empty(0, d, dtype=F64)
    for perm, static in ((torch.arange(d), False), (torch.randperm(d, generator=gen), True)):
        out = gptq(W, perm, U0, bits=bits, group_size=group_size, sym=sym, mse=True, static_groups=static)
        assert torch.equal(out.codes, codes), f"codes differ, static={static} (seed {gen.initial_seed()})"
        torch.testing.assert_close(out.scales, scales, rtol=1e-15, atol=0)
        torch.testing.assert_close(out.zeros, zeros, rtol=0, atol=0)


def test_mse_search_float32_agrees_with_float64(gen):
    """The float32 search (the pipeline's compute dtype) picks the float64 search's range on all but
    near-tied groups: its loss is within rounding of the float64 loss."""
    W, X, H = problem(gen, 64, 512)
    perm = make_perm("act", H, gen)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H[perm][:, perm])), upper=True)
    q = dict(bits=3, group_size=128, mse=True)
    o64 = gptq(W, perm, U, **q)
    o32 = gptq(W.float(), perm, U.float(), **q)
    same = (o32.scales.double() - o64.scales).abs() <= 1e-5 * o64.scales.abs()
    assert same.float().mean() > 0.98, f"{(~same).sum()} of {same.numel()} grids differ (seed {gen.initial_seed()})"
    l64, l32 = o64.row_loss.sum(), o32.row_loss.double().sum()
    assert abs(l32 - l64) <= 1e-3 * l64
