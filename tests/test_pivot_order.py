"""The pivot order of factor(order="pivot") (csrc/factor.cpp `pivoted_order`: blocked, symmetric
swaps on G's upper triangle, trailing updates by GEMMs) against an unblocked float64 pivoted
Cholesky with symmetric swaps of the whole G, on shapes that cross its 128-pivot panels: the same
order wherever the residuals are not within rounding of a tie, the same number of pivots, U from
that order."""
import pytest
import torch

from util import factor, ill_X, rand_X, randn

F64 = torch.float64
EPS = torch.finfo(F64).eps


def pivoted_cholesky_order(G):
    """(perm, residuals at each pick, pivots): greedy largest-residual order, first position on a tie."""
    G = G.clone()
    n = G.shape[0]
    perm = list(range(n))
    stop = n * EPS * max(G.diagonal().max().item(), 0.0)
    picked = []
    for j in range(n):
        r = G.diagonal()[j:]
        q = j + int(torch.argmax(r))  # argmax returns the first maximal position
        if not r[q - j].item() > stop:
            return perm, picked, j
        G[[j, q]] = G[[q, j]]
        G[:, [j, q]] = G[:, [q, j]]
        perm[j], perm[q] = perm[q], perm[j]
        picked.append(G[j, j].item())
        l = G[j:, j] / G[j, j].sqrt()
        G[j:, j:] -= torch.outer(l, l)
    return perm, picked, n


def R_of(X):
    R = torch.linalg.qr(X, mode="r").R
    return R * torch.where(R.diagonal() < 0, -1.0, 1.0)[:, None]


def cases(gen):
    X = rand_X(gen, 800, 300)
    X[:, ::9] = 0
    return {
        "generic": rand_X(gen, 800, 300),
        "dead features": X,
        "rank-deficient": randn(gen, 800, 100) @ randn(gen, 100, 280),
        "kappa 1e8": ill_X(gen, 800, 300, 1e8)[0],
        "outliers": rand_X(gen, 600, 280) * torch.where(torch.arange(280) % 50 == 0, 1e3, 1.0),
    }


@pytest.mark.parametrize("route", ["cholesky", "svdqr"])
def test_pivot_order_matches_the_unblocked_reference(gen, route):
    for name, X in cases(gen).items():
        R = R_of(X)
        H = R.T @ R
        if route == "cholesky":  # pivots on H, a dead feature's H_jj set to 1
            f = factor(H, "gram", "cholesky", "pivot", damp=0.01)
            G = H.clone()
            G.diagonal()[G.diagonal() == 0] = 1.0
        else:  # pivots on G = H + λI (the preset's path without a spectrum)
            f = factor(R, "qr", "svdqr", "pivot", damp=0.01, damp_ref="mean", truncation="rel", tau=1e-4)
            G = H + f.damp_lambda * torch.eye(H.shape[0], dtype=F64)
        perm, picked, pivots = pivoted_cholesky_order(G)
        assert f.pivots == pivots, name
        # Compared while the residual picked is above the rounding of the blocked vs unblocked
        # updates (~ n·u·max diag G each): below it the order of near-equal residuals is noise.
        sure = sum(1 for r in picked if r > 1e3 * G.shape[0] * EPS * G.diagonal().max().item())
        assert sure == pivots or sure > 128, name  # the comparison crosses a panel (128 pivots) where there is one
        assert f.perm[:sure].tolist() == perm[:sure], name
        assert sorted(f.perm.tolist()) == list(range(X.shape[1])), name
