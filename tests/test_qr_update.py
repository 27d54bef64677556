"""qr_update's structured blocked QR (csrc/accumulate.cpp) against the float64 reference, which is
the op as it was (torch.linalg.qr of [R; X] with the sign fix): the same R up to rounding where R is
unique (full rank), the same Gram RᵀR = [R0; X]ᵀ[R0; X] where it is not, on shapes that cross the
recursion (16 columns) and the block (128 columns) boundaries."""
import pytest
import torch

import reference as ref
from util import ill_X, qr, rand_X, randn

F64, F32 = torch.float64, torch.float32
U64 = torch.finfo(F64).eps


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_triangular(R):
    assert torch.equal(R, R.triu()) and torch.all(torch.diagonal(R) >= 0)


def gram_err(R, A):
    """‖RᵀR − AᵀA‖_F / ‖A‖_F²: the backward error both the op and the reference must keep at O(u)."""
    R, A = R.double(), A.double()
    return ((R.T @ R - A.T @ A).norm() / A.norm() ** 2).item()


@pytest.mark.parametrize("N,d", [(300, 17), (400, 129), (700, 300), (90, 150)])
def test_same_R_as_the_reference(gen, N, d):
    X = rand_X(gen, N, d)
    R0 = qr([rand_X(gen, d + 5, d)], d)  # a previous state: triangular, diag >= 0
    R = qr([X[: N // 3], X[N // 3:]], d, R=R0.clone())
    expect = ref.qr_R(X, R0)
    check_triangular(R)
    torch.testing.assert_close(R, expect, rtol=1e-10, atol=1e-10 * expect.abs().max().item())


@pytest.mark.parametrize("kappa", [1e4, 1e8])
def test_ill_conditioned(gen, kappa):
    X, _ = ill_X(gen, 500, 200, kappa)
    R = qr([X[:250], X[250:]], 200)
    expect = ref.qr_R(X)
    check_triangular(R)
    assert gram_err(R, X) < 100 * U64
    assert relerr(R, expect) < 1e3 * U64 * kappa  # R is unique: QR's forward error is O(u κ)


@pytest.mark.parametrize("case", ["rank-deficient", "dead features", "outliers"])
def test_degenerate_inputs(gen, case):
    N, d = 400, 160
    if case == "rank-deficient":
        X = randn(gen, N, 40) @ randn(gen, 40, d)
    else:
        X = rand_X(gen, N, d)
        if case == "dead features":
            X[:, ::7] = 0
        else:
            X[:, [3, 150]] *= 1e4
    R = qr([X[:100], X[100:]], d)
    check_triangular(R)
    assert gram_err(R, X) < 100 * U64
    assert gram_err(ref.qr_R(X), X) < 100 * U64
    if case == "dead features":  # a dead column stays exactly zero, its diagonal 0
        assert torch.all(R[:, ::7] == 0)
    if case == "outliers":  # full rank: R is unique
        assert relerr(R, ref.qr_R(X)) < 1e-10


def test_float32_state(gen):
    X = rand_X(gen, 600, 200)
    R = qr([X[:300].float(), X[300:].float()], 200, dtype=F32)
    assert R.dtype == F32
    check_triangular(R)
    assert relerr(R, ref.qr_R(X)) < 1e-5


def test_non_triangular_start(gen):
    """An R with entries below the diagonal is not what the accumulator keeps, but the op's contract
    (the R-factor of [R; X]) still holds: it takes the unstructured path."""
    d = 40
    R0 = randn(gen, d, d)
    X = rand_X(gen, 60, d)
    R = qr([X], d, R=R0.clone())
    check_triangular(R)
    torch.testing.assert_close(R, ref.qr_R(X, R0), rtol=1e-10, atol=1e-10 * R.abs().max().item())
