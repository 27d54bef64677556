"""docs/design.md §6, items 1-6, through the ops (factor, accumulators, gptq_quantize) and
lrgptq.quantize_linear."""
import math

import pytest
import scipy.linalg
import torch

import lrgptq
import reference as ref
from util import (factor, gptq, gram, ill_X, problem, qr, quantize_with, rand_X, randn, random_orthogonal,
                  sketch, sweep_split)

F64, F32 = torch.float64, torch.float32
U32 = 2.0**-24  # float32 unit roundoff


def kappa(X):
    s = torch.linalg.svdvals(X.double())
    return (s[0] / s[-1]).item()


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def route(W, X, which, order, **quant):
    """(gptq outputs, factor outputs) for the three routes from their natural accumulators, float64, undamped."""
    if which == "cholesky":
        return quantize_with(W, gram(X), "gram", "cholesky", order, **quant)
    return quantize_with(W, qr([X], X.shape[1]), "qr", which, order, **quant)


def merged(a, b):
    r = a.merge(b)
    return a if r is None else r


# ----------------------------------------------------------------------------- 1. routes and accumulators


@pytest.mark.parametrize("order", ["identity", "act", "babai"])
def test_cholesky_and_svdqr_give_the_same_factor(gen, order):
    W, X, H = problem(gen, 12, 40)
    Hop, Rop = gram(X), qr([X], 40)
    pc, Uc, kc, dead_c, *_ = info_c = factor(Hop, "gram", "cholesky", order)
    ps, Us, ks, dead_s, *_ = info_s = factor(Rop, "qr", "svdqr", order)
    assert torch.equal(pc, ps)
    expect = {"identity": torch.arange(40), "babai": torch.arange(39, -1, -1),
              "act": torch.argsort(torch.diagonal(H), descending=True, stable=True)}[order]
    assert torch.equal(pc.long(), expect)
    assert kc == ks == 40 and Uc.shape == Us.shape == (40, 40)
    assert info_c.damp_lambda == 0 and info_c.damp_retries == 0  # lambda 0, no retry
    tol = 1e-8 * kappa(X)
    assert relerr(Uc, Us) < tol
    assert relerr(Uc, ref.cholesky_U(H, expect)) < tol
    q = dict(bits=4, group_size=8, sym=False, mse=True)
    assert torch.equal(gptq(W, pc, Uc, **q).codes, gptq(W, ps, Us, **q).codes)


@pytest.mark.parametrize("order", ["identity", "act", "babai"])
@pytest.mark.parametrize("gs,static", [(-1, False), (8, True)])
def test_ql_route_same_codes_and_losses(gen, order, gs, static):
    """ql hands back an engine-ready U (used with its from_original), not an inverse factor: compare
    what it produces. Same codes as cholesky when group params never read partially updated targets
    (per-row or static groups); with dynamic groups the two formulations legitimately differ."""
    W, X, H = problem(gen, 10, 40)
    q = dict(bits=4, group_size=gs, static_groups=static)
    (c_out, c_f) = route(W, X, "cholesky", order, **q)
    (l_out, l_f) = route(W, X, "ql", order, **q)
    assert torch.equal(c_f.perm, l_f.perm) and l_f.rank == 40
    assert torch.equal(c_out.codes, l_out.codes)
    torch.testing.assert_close(l_out.row_loss, c_out.row_loss, rtol=1e-9, atol=0)
    obj = ref.objective(W, l_out.Q, X)
    assert abs(l_out.row_loss.sum().item() - obj) <= 1e-9 * obj


@pytest.mark.parametrize("order", ["pivot", "identity"])
@pytest.mark.parametrize("truncation,tau", [("rel", 1e-6), ("energy", 1e-12)])
def test_truncated_svdqr_is_the_kept_pseudo_inverse(gen, order, truncation, tau):
    """docs/design.md §3: U = R' from QR of Sigma_k^-1 V_k^T[:, perm], so U^T U = (V_k Sigma_k^-2 V_k^T)[perm, perm]
    exactly: U has no component along the dropped singular directions (those are what it must not push)."""
    d, N, k_true = 36, 90, 24
    s = torch.cat([torch.logspace(0, -2, k_true, dtype=F64), 1e-11 * torch.rand(d - k_true, generator=gen, dtype=F64)])
    X = (torch.linalg.qr(randn(gen, N, d)).Q * s) @ random_orthogonal(gen, d)
    R = qr([X], d)
    perm, U, k, dead, *_ = info = factor(R, "qr", "svdqr", order, truncation=truncation, tau=tau)
    assert k == k_true and U.shape == (k, d)
    _, S, Vh = torch.linalg.svd(ref.qr_R(X))
    Hk_pinv = (Vh[:k].T / S[:k] ** 2) @ Vh[:k]
    p = perm.long()
    assert relerr(U.T @ U, Hk_pinv[p][:, p]) < 1e-8
    assert (U @ Vh[k:].T[p]).norm() < 1e-8 * U.norm()


@pytest.mark.parametrize("parts", [1, 2, 5, 17])
def test_qr_over_any_split(gen, parts):
    X = rand_X(gen, 80, 24)
    Rexp = ref.qr_R(X)
    R = qr([X[a:b] for a, b in sweep_split(80, gen, parts)], 24)
    assert torch.equal(R, R.triu()) and torch.all(torch.diagonal(R) >= 0)
    torch.testing.assert_close(R, Rexp, rtol=1e-10, atol=1e-10 * Rexp.abs().max().item())
    R32 = qr([X[a:b].float() for a, b in sweep_split(80, gen, parts)], 24, dtype=F32)
    assert R32.dtype == F32
    assert relerr(R32, Rexp) < 1e-5


def test_qr_rows_one_at_a_time_and_short_batches(gen):
    X = rand_X(gen, 30, 20)
    R = qr([X[i:i + 1] for i in range(30)], 20)  # every batch shorter than d
    torch.testing.assert_close(R, ref.qr_R(X), rtol=1e-10, atol=1e-10 * R.abs().max().item())
    R = qr([X[:7]], 20)  # N < d in total
    torch.testing.assert_close(R.T @ R, ref.gram(X[:7]), rtol=1e-10, atol=1e-10 * ref.gram(X[:7]).abs().max().item())


def test_qr_with_damped_start(gen):
    X = rand_X(gen, 50, 16)
    lam = 0.3 * torch.diagonal(ref.gram(X)).mean().item()
    R = qr([X[:20], X[20:]], 16, R=math.sqrt(lam) * torch.eye(16, dtype=F64))
    expect = ref.gram(X) + lam * torch.eye(16, dtype=F64)
    torch.testing.assert_close(R.T @ R, expect, rtol=1e-12, atol=1e-12 * expect.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 600])  # 600: upper-triangle panels of 256 columns, mirrored
def test_gram_update(gen, dtype, d):
    X = rand_X(gen, 60, d).to(dtype).reshape(3, 20, d)  # (..., d)
    H = gram(X[0])
    gram(X[1:], H)
    assert H.dtype == F64 and torch.equal(H, H.T)
    rtol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(H, ref.gram(X), rtol=rtol, atol=rtol * ref.gram(X).abs().max().item())


def test_accumulator_merge_gram_qr(gen):
    X = rand_X(gen, 70, 20)
    for kind, expect in (("gram", ref.gram(X)), ("qr", ref.qr_R(X))):
        one = lrgptq.Accumulator(kind, 20)
        one.add(X[:33])
        one.add(X[33:])
        a, b = lrgptq.Accumulator(kind, 20), lrgptq.Accumulator(kind, 20)
        a.add(X[:9])
        b.add(X[9:41])
        b.add(X[41:])
        m = merged(a, b)
        assert one.tokens == m.tokens == 70
        for acc in (one, m):
            assert acc.state.dtype == F64 and acc.state.shape == (20, 20)
            torch.testing.assert_close(acc.state, expect, rtol=1e-10, atol=1e-10 * expect.abs().max().item())


@pytest.mark.parametrize("kind", ["sparse", "gaussian"])
def test_sketch_workers_with_offsets(gen, kind):
    X = rand_X(gen, 90, 24)
    m, seed = 20, 1234
    one = sketch(torch.zeros(m, 24, dtype=F64), X, seed, 0, kind)
    w1 = sketch(torch.zeros(m, 24, dtype=F64), X[:37], seed, 0, kind)
    w2 = torch.zeros(m, 24, dtype=F64)
    for a, b in ((70, 90), (37, 70)):  # out of order, in pieces
        sketch(w2, X[a:b], seed, a, kind)
    tol = 1e-12 * one.abs().max().item()
    torch.testing.assert_close(w1 + w2, one, rtol=1e-12, atol=tol)
    assert (one - sketch(torch.zeros(m, 24, dtype=F64), X, seed + 1, 0, kind)).abs().max() > 1e-3
    assert (one - sketch(torch.zeros(m, 24, dtype=F64), X, seed, 1, kind)).abs().max() > 1e-3
    # the Accumulator streams with the global token index, so its state is the one-worker sketch
    acc = lrgptq.Accumulator("sketch", 24, sketch_size=m, sketch_kind=kind, seed=seed)
    acc.add(X[:50])
    acc.add(X[50:])
    torch.testing.assert_close(acc.state, one, rtol=1e-12, atol=tol)
    a = lrgptq.Accumulator("sketch", 24, sketch_size=m, sketch_kind=kind, seed=seed)
    b = lrgptq.Accumulator("sketch", 24, sketch_size=m, sketch_kind=kind, seed=seed)
    a.add(X[:10])
    b.add(X[10:])
    total = a.state + b.state
    r = merged(a, b)
    assert r.tokens == 90
    torch.testing.assert_close(r.state, total, rtol=1e-12, atol=tol)


@pytest.mark.parametrize("zeta", [1, 4, 8])
def test_sparse_sketch_columns(gen, zeta):
    """Each token's column of S has zeta nonzeros of magnitude 1/sqrt(zeta)."""
    m, d = 32, 5
    for idx in torch.randint(0, 10**6, (4,), generator=gen).tolist():
        Y = sketch(torch.zeros(m, d, dtype=F64), torch.eye(d, dtype=F64)[:1], 7, idx, "sparse", zeta)
        col = Y[:, 0]
        assert torch.all(Y[:, 1:] == 0)
        assert int((col != 0).sum()) == zeta
        torch.testing.assert_close(col[col != 0].abs(), torch.full((zeta,), zeta**-0.5, dtype=F64))


# ----------------------------------------------------------------------------- 2. block size


@pytest.mark.parametrize("order", ["identity", "pivot"])
def test_block_size_invariance_via_op(gen, order):
    W, X, H = problem(gen, 9, 72)
    perm, U, k, dead, *_ = info = factor(qr([X], 72), "qr", "svdqr", order)
    q = dict(bits=3, group_size=24, sym=False, mse=True)
    outs = [gptq(W, perm, U, block_size=B, **q) for B in (1, 5, 16, 24, 50, 128)]
    for o in outs[1:]:
        assert torch.equal(o.codes, outs[0].codes)
        torch.testing.assert_close(o.Q, outs[0].Q, rtol=1e-12, atol=1e-12)
    codes_obs, Q_obs, loss_obs = ref.obs_explicit(W, H, perm, **q)
    assert torch.equal(outs[0].codes, codes_obs)
    torch.testing.assert_close(outs[0].row_loss, loss_obs, rtol=1e-8, atol=0)


def test_pivot_order_is_pivoted_qr(gen):
    W, X, H = problem(gen, 2, 30)
    perm, U, k, dead, *_ = info = factor(qr([X], 30), "qr", "svdqr", "pivot")
    _, _, piv = scipy.linalg.qr(X.numpy(), mode="economic", pivoting=True)
    assert perm.tolist() == piv.tolist()
    assert relerr(U, ref.cholesky_U(H, perm)) < 1e-8 * kappa(X)
    # Every route takes the same pivots, and none of them changes the state it was given.
    H_before = H.clone()
    for A, source, route_ in ((H, "gram", "cholesky"), (H, "gram", "ql"), (H, "gram", "svdqr")):
        assert factor(A, source, route_, "pivot", damp=0.0).perm.tolist() == piv.tolist()
        assert torch.equal(A, H_before)


# ----------------------------------------------------------------------------- 3. loss identity


@pytest.mark.parametrize("which,order", [("cholesky", "act"), ("svdqr", "pivot"), ("ql", "identity"),
                                         ("ql", "babai"), ("svdqr", "act")])
@pytest.mark.parametrize("bits,gs", [(2, -1), (4, 16)])
def test_loss_identity_op(gen, which, order, bits, gs):
    W, X, H = problem(gen, 7, 48)
    out, f = route(W, X, which, order, bits=bits, group_size=gs, mse=True, block_size=20)
    obj = ref.objective(W, out.Q, X)
    assert abs(out.row_loss.sum().item() - obj) <= 1e-9 * obj


@pytest.mark.parametrize("route_,accumulator,order", [("cholesky", "gram", "act"), ("svdqr", "qr", "pivot"),
                                                       ("ql", "qr", "identity"), ("cholesky", "gram", "pivot"),
                                                       ("ql", "qr", "pivot"), ("svdqr", "gram", "pivot")])
def test_loss_identity_quantize_linear(gen, route_, accumulator, order):
    W, X, H = problem(gen, 14, 64)
    cfg = lrgptq.QuantConfig(bits=3, group_size=16, route=route_, order=order, accumulator=accumulator,
                             damp=0.0, truncation="none", compute_dtype=F64)
    res = lrgptq.quantize_linear(W, X, cfg, name="lin")
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape and res.rank == 64
    obj = ref.objective(W, res.weight, X)
    assert abs(res.loss - obj) <= 1e-9 * obj
    assert abs(res.row_loss.sum().item() - obj) <= 1e-9 * obj
    acc = lrgptq.Accumulator(accumulator, 64)
    acc.add(X[:100])
    acc.add(X[100:])
    assert torch.equal(lrgptq.quantize_linear(W, acc, cfg, name="lin").codes, res.codes)


# ----------------------------------------------------------------------------- 4. invariances


CONFIGS = {
    "cholesky": dict(route="cholesky", accumulator="gram", order="act"),
    "svdqr": dict(route="svdqr", accumulator="qr", order="pivot"),
    "svdqr_act": dict(route="svdqr", accumulator="qr", order="act"),
    "ql": dict(route="ql", accumulator="qr", order="act"),
}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_invariances(gen, cfg_name):
    W, X, H = problem(gen, 10, 48, N=120)
    cfg = lrgptq.QuantConfig(bits=3, group_size=16, compute_dtype=F64, **CONFIGS[cfg_name])
    base = lrgptq.quantize_linear(W, X, cfg)
    sigma = torch.randperm(48, generator=gen)
    variants = {
        "scaled": (W, 3.7 * X, None),
        "duplicated": (W, torch.cat([X, X]), None),
        "mixed": (W, random_orthogonal(gen, 120) @ X, None),
        "permuted": (W[:, sigma], X[:, sigma], sigma),
    }
    for name, (W2, X2, s) in variants.items():
        r = lrgptq.quantize_linear(W2, X2, cfg)
        codes = base.codes if s is None else base.codes[:, s]
        g_idx = base.g_idx if s is None else base.g_idx[s]
        assert torch.equal(r.codes, codes), name
        assert torch.equal(r.g_idx, g_idx), name
        Q = base.weight if s is None else base.weight[:, s]
        torch.testing.assert_close(r.weight, Q, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- 5. Babai's bound


def test_babai_bound(gen):
    """Back to front on R from the qr accumulator, no clipping: per row ||X(w-q)||^2 <= delta^2/4 sum_j R_jj^2."""
    d, N = 40, 80
    X = randn(gen, N, d) @ torch.linalg.qr(randn(gen, d, d)).Q * torch.logspace(0, -1.5, d, dtype=F64)
    X = X @ random_orthogonal(gen, d)  # strongly correlated columns: the bound is far below plain rounding
    W = randn(gen, 16, d)
    big = 20 + 5 * torch.rand(16, generator=gen, dtype=F64)
    W[:, -1], W[:, -2] = big, -0.8 * big  # processed first (back to front): they set a wide grid
    R = ref.qr_R(X)
    out, (perm, U, k, dead, *_) = quantize_with(W, qr([X], d), "qr", "ql", "babai", bits=8, group_size=-1)
    assert perm.tolist() == list(range(d - 1, -1, -1))
    codes, scales, zeros, g_idx, Q, row_loss, _, _ = out
    inner = codes[:, :-2].int()
    assert torch.all((inner > 0) & (inner < 255)), "grid not wide enough: clipping happened"
    err = ((W - Q) @ X.T).pow(2).sum(1)
    bound = scales[0] ** 2 / 4 * torch.diagonal(R).pow(2).sum()
    assert torch.all(err <= bound * (1 + 1e-12)), (err / bound).max()
    # the bound has teeth: plain rounding breaks it
    Q_rtn = gptq(W, perm, U[:0].contiguous(), bits=8).Q
    assert torch.any(((W - Q_rtn) @ X.T).pow(2).sum(1) > bound)


# ----------------------------------------------------------------------------- 6. hard inputs, float32


def proxy(U, H, perm):
    """|| U H_perm U^T - I ||_2 in float64: how far U is from H^-1 = U^T U on the subspace it keeps."""
    p = perm.long()
    U = U.double()
    return torch.linalg.matrix_norm(U @ H[p][:, p] @ U.T - torch.eye(U.shape[0], dtype=F64), 2).item()


@pytest.mark.parametrize("kappa_", [1e2, 1e4, 1e6, 1e8])
def test_float32_kappa_sweep(gen, kappa_):
    """X = A diag(s) B in float32. qr + svdqr: finite, and U H U^T = I on the kept subspace to ~u * kappa_kept
    (forming H would give u * kappa^2). Undamped float32 cholesky at kappa 1e8 (kappa(H) = 1e16) must
    report damping, or be far off. Quantization: better than rounding where float32 resolves X; with
    truncation (kappa >= 1e6) only "no blow-up": a float64-pivoted transcription of docs/design.md §3 reaches
    up to ~13x the rounding error at kappa 1e8 on rare seeds (median ~1.1x)."""
    d, N = 32, 96
    X64, s = ill_X(gen, N, d, kappa_)
    X = X64.float()
    H = ref.gram(X)  # exact H of the float32 data
    W = randn(gen, 16, d)
    q = dict(bits=4, group_size=-1)
    # qr (float32) + svdqr (float32)
    R = qr([X[:40], X[40:]], d, dtype=F32)
    perm, U, k, dead, *_ = info = factor(R, "qr", "svdqr", "pivot", truncation="rel", tau=1e-4, dtype=F32)
    assert U.dtype == F32 and torch.isfinite(U).all() and U.shape == (k, d)
    assert int((s > 1e-4).sum()) <= k <= d  # sigma_ref <= sigma_max: everything above tau * sigma_max is kept
    if kappa_ >= 1e6:
        assert k < d  # float32 cannot see s_min; it must be truncated, not inverted
    assert abs(info.sigma_max - 1) < 1e-3 and abs(info.sigma_min_kept / s[k - 1].item() - 1) < 1e-2
    if kappa_ <= 1e4:  # s_min = 1/kappa is far above float32 noise (u * s_max): "none" must keep it
        assert factor(R, "qr", "svdqr", "pivot", truncation="none", dtype=F32).rank == d
    kept = info.sigma_max / info.sigma_min_kept
    p_svd = proxy(U, H, perm)
    assert p_svd < 30 * U32 * kept, (p_svd, U32 * kept)
    out = gptq(W.float(), perm, U, **q)
    assert all(torch.isfinite(t.float()).all() for t in out[:7])
    rtn_obj = ref.objective(W, ref.rtn(W.float(), **q)[3], X)
    if kappa_ <= 1e4:  # float32 resolves this X: GPTQ must beat plain rounding
        assert ref.objective(W, out.Q, X) < rtn_obj
    else:  # truncated: past-rank columns are rounded after large pushes; ask for no blow-up only
        assert ref.objective(W, out.Q, X) < 20 * rtn_obj
    # gram + cholesky in float32, undamped: ill-conditioned H needs damping, or the factor is far worse
    pc, Uc, kc, dead_c, *_ = info_c = factor(ref.gram(X), "gram", "cholesky", "identity", dtype=F32)
    assert torch.isfinite(Uc).all() and all(math.isfinite(v) for v in (info_c.damp_lambda, info_c.sigma_max,
                                                                          info_c.sigma_min_kept))
    damped = info_c.damp_lambda > 0 or info_c.damp_retries > 0
    if kappa_ >= 1e8:  # kappa(H) = 1e16: no precision can factor it undamped
        assert damped or proxy(Uc, H, pc) > 100 * p_svd
    out_c = gptq(W.float(), pc, Uc, **q)
    assert all(torch.isfinite(t.float()).all() for t in out_c[:7])


def _hard_X(gen, case, N, d):
    X = rand_X(gen, N, d)
    if case == "rank_deficient":
        X = X[: d // 2]
    elif case == "collinear":
        X[:, 5] = X[:, 3]
        X[:, 9] = -2 * X[:, 3]
    elif case == "dead":
        X[:, [0, 7, 8]] = 0
    elif case == "outliers":
        X[:, [2, 11]] *= 100
    return X


@pytest.mark.parametrize("case", ["rank_deficient", "collinear", "dead", "outliers"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [F32, F64])
def test_hard_inputs_stay_finite(gen, case, cfg_name, dtype):
    """Finite with every route and order; sensible (no worse than twice plain rounding) with each route's
    own safe order. svdqr with a fixed order (not pivot) may meet a dependent column among its first k:
    only finiteness is asked of it here."""
    d = 32
    X = _hard_X(gen, case, 96, d)
    W = randn(gen, 12, d)
    cfg = lrgptq.QuantConfig(bits=4, group_size=16, compute_dtype=dtype, **CONFIGS[cfg_name])
    r = lrgptq.quantize_linear(W.to(dtype), X.to(dtype), cfg, name="hard")
    assert torch.isfinite(r.weight).all() and math.isfinite(r.loss) and torch.isfinite(r.scales).all()
    assert torch.isfinite(r.row_loss).all() and r.weight.dtype == dtype and 0 < r.rank <= d
    if cfg_name != "svdqr_act":
        obj = ref.objective(W, r.weight, X)
        assert obj <= 2 * ref.objective(W, ref.rtn(W, bits=4, group_size=16)[3], X)


@pytest.mark.parametrize("case", ["rank_deficient", "collinear", "dead", "outliers"])
def test_cholesky_reports(gen, case):
    d = 32
    X = _hard_X(gen, case, 96, d)
    H = ref.gram(X)
    perm, U, k, dead, *_ = info = factor(H, "gram", "cholesky", "identity", damp=0.01)
    assert torch.isfinite(U).all() and dead.dtype == torch.bool and dead.shape == (d,)
    zero_cols = torch.diagonal(H) == 0
    assert torch.equal(dead, zero_cols) and int(info.dead.sum()) == zero_cols.sum().item()
    assert info.damp_lambda > 0
    if case != "dead":  # no dead feature: lambda = damp * mean(diag H), tenfold per retry
        lam = 0.01 * torch.diagonal(H).mean().item() * 10 ** info.damp_retries
        assert abs(info.damp_lambda - lam) <= 1e-12 * lam
        torch.testing.assert_close(U, ref.cholesky_U(H + info.damp_lambda * torch.eye(d, dtype=F64)),
                                   rtol=1e-8, atol=1e-8 * U.abs().max().item())
    perm, U, k, dead, *_ = info = factor(H, "gram", "cholesky", "identity", damp=0.0)  # must not fail either
    assert torch.isfinite(U).all()
    if case in ("rank_deficient", "collinear"):
        W = randn(gen, 4, d)
        out = gptq(W, perm, U, bits=4)
        assert torch.isfinite(out.Q).all() and torch.isfinite(out.row_loss).all()


def test_damp_ref_median(gen):
    d = 33  # odd: the median is one element
    X = _hard_X(gen, "outliers", 99, d)
    H = ref.gram(X)
    perm, U, k, dead, *_ = info = factor(H, "gram", "cholesky", "identity", damp=0.05, damp_ref="median")
    lam = 0.05 * torch.diagonal(H).median().item() * 10 ** info.damp_retries
    assert abs(info.damp_lambda - lam) <= 1e-12 * lam


def test_dead_features_zeroed_by_cholesky_route(gen):
    X = _hard_X(gen, "dead", 96, 32)
    W = randn(gen, 8, 32)
    cfg = lrgptq.QuantConfig(bits=4, group_size=16, route="cholesky", accumulator="gram", order="identity",
                             compute_dtype=F64)
    r = lrgptq.quantize_linear(W, X, cfg)
    assert torch.all(r.weight[:, [0, 7, 8]] == 0)
    assert torch.any(r.weight[:, [1, 2, 3]] != 0)
