"""The reference (tests/reference.py) checked against itself and against first principles.
Needs no lrgptq: these run before and without the C++ ops."""
import pytest
import torch

import reference as ref
from util import make_perm, problem, randn, rand_X

SETTINGS = [  # bits, group_size, sym, mse, static_groups
    (4, -1, False, False, False),
    (2, 16, True, False, False),
    (3, 24, False, True, False),
    (8, 16, False, False, True),
    (4, 12, True, True, True),
    (3, 48, False, False, False),
]


def _q(bits, gs, sym, mse, static):
    return dict(bits=bits, group_size=gs, sym=sym, mse=mse, static_groups=static)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("perm_kind", ["identity", "act", "random"])
def test_blocked_equals_unblocked_equals_obs(gen, setting, perm_kind):
    W, X, H = problem(gen, 7, 48)
    perm = make_perm(perm_kind, H, gen)
    U = ref.cholesky_U(H, perm)
    q = _q(*setting)
    codes_obs, Q_obs, loss_obs = ref.obs_explicit(W, H, perm, **q)
    for B in (1, 5, 16, 32, 100):
        codes, scales, zeros, g_idx, Q, loss = ref.gptq(W, perm, U, block_size=B, **q)
        assert torch.equal(codes, codes_obs), (B, gen.initial_seed())
        torch.testing.assert_close(Q, Q_obs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss, loss_obs, rtol=1e-9, atol=0)


@pytest.mark.parametrize("B", [1, 7, 32])
@pytest.mark.parametrize("k", [0, 13, 40])
@pytest.mark.parametrize("from_original", [False, True])
def test_block_size_invariance_rank_k(gen, B, k, from_original):
    W, X, H = problem(gen, 6, 40)
    perm = torch.randperm(40, generator=gen)
    U = ref.cholesky_U(H, perm)[:k]
    q = dict(bits=3, group_size=8, mse=True)
    a = ref.gptq(W, perm, U, block_size=B, from_original=from_original, **q)
    b = ref.gptq(W, perm, U, block_size=1, from_original=from_original, **q)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("setting", SETTINGS)
def test_loss_identity(gen, setting):
    W, X, H = problem(gen, 5, 48)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    codes, scales, zeros, g_idx, Q, loss = ref.gptq(W, perm, ref.cholesky_U(H, perm), block_size=16, **_q(*setting))
    obj = ref.objective(W, Q, X)
    assert abs(loss.sum().item() - obj) <= 1e-9 * obj


@pytest.mark.parametrize("perm_kind", ["identity", "act", "random"])
@pytest.mark.parametrize("gs,static", [(-1, False), (8, True), (1, False)])
def test_ql_from_original_equals_cholesky(gen, perm_kind, gs, static):
    """The exact ql route (no inverse, errors from the ORIGINAL weights) reproduces GPTQ, as long as
    group params do not read partially updated targets (per-row, static or 1-column groups): the
    from_original running targets equal GPTQ's only once ALL earlier columns are in."""
    W, X, H = problem(gen, 8, 40)
    perm = make_perm(perm_kind, H, gen)
    q = dict(bits=4, group_size=gs, static_groups=static)
    a = ref.gptq(W, perm, ref.cholesky_U(H, perm), **q)
    b = ref.gptq(W, perm, ref.ql_U(ref.qr_R(X), perm), from_original=True, block_size=9, **q)
    assert torch.equal(a[0], b[0])
    scale = W.pow(2).sum(1) * torch.diagonal(H).mean()  # losses vanish with 1-column groups
    torch.testing.assert_close(a[5], b[5], rtol=1e-9, atol=1e-12 * scale.max().item())


@pytest.mark.parametrize("B", [1, 9, 64])
def test_ql_loss_identity_any_groups(gen, B):
    W, X, H = problem(gen, 8, 40)
    perm = torch.randperm(40, generator=gen)
    out = ref.gptq(W, perm, ref.ql_U(ref.qr_R(X), perm), from_original=True, block_size=B,
                   bits=3, group_size=8, mse=True)
    obj = ref.objective(W, out[4], X)
    assert abs(out[5].sum().item() - obj) <= 1e-9 * obj
    b1 = ref.gptq(W, perm, ref.ql_U(ref.qr_R(X), perm), from_original=True, block_size=1,
                  bits=3, group_size=8, mse=True)
    assert torch.equal(out[0], b1[0])


def test_gptq_beats_rtn(gen):
    W, X, H = problem(gen, 16, 64)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    Q = ref.gptq(W, perm, ref.cholesky_U(H, perm), bits=3, group_size=16)[4]
    Q_rtn = ref.rtn(W, bits=3, group_size=16)[3]
    assert ref.objective(W, Q, X) < 0.8 * ref.objective(W, Q_rtn, X)


@pytest.mark.parametrize("setting", SETTINGS)
def test_rtn_equals_engine_without_rows(gen, setting):
    W = randn(gen, 6, 48) * torch.exp(randn(gen, 48))
    bits, gs, sym, mse, static = setting
    codes, scales, zeros, Q = ref.rtn(W, bits=bits, group_size=gs, sym=sym, mse=mse)
    out = ref.gptq(W, torch.arange(48), torch.empty(0, 48, dtype=W.dtype), **_q(*setting))
    assert torch.equal(out[0], codes)
    torch.testing.assert_close(out[1], scales, rtol=0, atol=0)
    torch.testing.assert_close(out[4], Q, rtol=0, atol=0)
    assert torch.all(out[5] == 0)
    maxq = 2**bits - 1
    assert codes.max() <= maxq
    # round to nearest: no other grid point is closer (up to clipping at the ends)
    err = (W - Q).abs()
    step = scales.repeat_interleave(48 if gs == -1 else gs, 0).T
    inside = (codes > 0) & (codes < maxq)
    assert torch.all(err[inside] <= step[inside] / 2 * (1 + 1e-12))


def test_quantizer_matches_hand_computed():
    x = torch.tensor([[-1.0, 0.5, 3.0], [0.2, 0.4, 0.6], [0.0, 0.0, 0.0]], dtype=torch.float64)
    s, z = ref.quant_params(x, 2, sym=False, mse=False)
    torch.testing.assert_close(s, torch.tensor([4 / 3, 0.6 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))  # round(0.75)=1, round(1.5)=2
    s, z = ref.quant_params(x, 2, sym=True, mse=False)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.2, 2 / 3], dtype=torch.float64))  # xmin=0 stays 0 when sym
    assert torch.all(z == 2)
    assert ref.quantize(torch.tensor([0.5, 1.5, 2.5]), 1.0, 0.0, 7).tolist() == [0.0, 2.0, 2.0]  # half to even


def test_accumulators(gen):
    X = rand_X(gen, 50, 12)
    R = ref.qr_R(X)
    assert torch.all(torch.diagonal(R) >= 0) and torch.equal(R, R.triu())
    torch.testing.assert_close(R.T @ R, ref.gram(X), rtol=1e-12, atol=1e-10)
    lam = 0.37
    R0 = lam**0.5 * torch.eye(12, dtype=torch.float64)
    R = ref.qr_R(X, R0)
    torch.testing.assert_close(R.T @ R, ref.gram(X) + lam * torch.eye(12, dtype=torch.float64), rtol=1e-12, atol=1e-10)
    R = ref.qr_R(X[:5])  # N < d: zero rows below
    assert torch.all(R[5:] == 0)
    torch.testing.assert_close(R.T @ R, ref.gram(X[:5]), rtol=1e-12, atol=1e-10)


def test_cholesky_U(gen):
    _, _, H = problem(gen, 1, 20)
    perm = torch.randperm(20, generator=gen)
    U = ref.cholesky_U(H, perm)
    assert torch.equal(U, U.triu()) and torch.all(torch.diagonal(U) > 0)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H[perm][:, perm]), rtol=1e-10, atol=1e-12)
