"""The factor op (csrc/factor.cpp, docs/design.md §3): its named outputs, and svdqr's full-rank path
(no spectrum where truncation provably keeps everything) against the spectrum path it replaces."""
import math

import pytest
import torch

from util import factor, ill_X, qr, rand_X, randn, sketch

F64, F32 = torch.float64, torch.float32
U64 = 2.0**-53  # float64 unit roundoff
PRESET = dict(damp=0.01, truncation="rel", tau=1e-4)  # the lrgptq preset's factor settings


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(gen, case, d):
    """Calibration inputs X (N, d): well conditioned, κ(X) = 1e8, N < d, dead features, outlier channels."""
    if case == "kappa1e8":
        return ill_X(gen, 2 * d, d, 1e8)[0]
    X = rand_X(gen, d // 2 if case == "rank_deficient" else 3 * d, d)
    if case == "dead":
        X[:, [0, 3, d - 1]] = 0
    elif case == "outliers":
        X[:, [1, d // 2]] *= 100
    return X


def state(X, source, gen):
    d = X.shape[1]
    if source == "qr":
        return qr([X], d)
    if source == "gram":
        return X.T @ X
    m = max(d // 2, 4)  # m < d rows
    return sketch(torch.zeros(m, d, dtype=F64), X, 7, 0, zeta=min(8, m))


def kappa_G(A, source, lam):
    """κ(G) of G = H + λI (H from the accumulator state A), from its exact spectrum."""
    H = A if source == "gram" else A.T @ A
    ev = torch.linalg.eigvalsh(H).clamp_min(0)
    return ((ev[-1] + lam) / (ev[0] + lam)).item()


def spectra_of_size(fn, d):
    """The SVDs and eigendecompositions that fn runs on a matrix with a dimension d."""
    spectral = {"aten::_linalg_svd", "aten::_linalg_eigh"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in spectral and d in (e.input_shapes[0] or [])]


# ----------------------------------------------------------------------------- full rank: same U as the spectrum path


@pytest.mark.parametrize("case", ["random", "kappa1e8", "rank_deficient", "dead", "outliers"])
@pytest.mark.parametrize("source", ["qr", "gram", "sketch"])
@pytest.mark.parametrize("d,order", [(8, "pivot"), (40, "pivot"), (300, "pivot"), (40, "act"), (40, "identity")])
def test_full_rank_path_gives_the_spectrum_paths_factor(gen, case, source, d, order):
    """With the preset's λ > 0 and rel truncation nothing can be truncated, so svdqr takes the path
    without a spectrum. It must give the spectrum path's perm (identical; features that never fired all
    have residual exactly λ, a tie that the spectrum path breaks by rounding noise, so those positions
    are compared as a set) and its U to ‖ΔU‖_F/‖U‖_F ≤ 2·d·u·κ(G), G = H + λI (κ(G) ≤ 1 + σ₁²/λ)."""
    A = state(inputs(gen, case, d), source, gen)
    fast = factor(A, source, "svdqr", order, **PRESET)
    spec = factor(A, source, "svdqr", order, force_spectrum=True, **PRESET)
    assert fast.rank == spec.rank == d and fast.pivots == spec.pivots == d
    assert fast.U.shape == (d, d) and torch.equal(fast.U, fast.U.triu()) and bool((fast.U.diagonal() > 0).all())
    assert fast.damp_lambda == spec.damp_lambda > 0 and torch.equal(fast.dead, spec.dead)
    live = ~fast.dead[fast.perm]
    assert torch.equal(fast.perm[live], spec.perm[live])
    assert set(fast.perm[~live].tolist()) == set(spec.perm[~live].tolist())
    if bool(live.all()):
        bound = 2 * d * U64 * kappa_G(A, source, fast.damp_lambda)
        assert relerr(fast.U, spec.U) <= bound, (relerr(fast.U, spec.U), bound)
    else:  # a different order of the tied dead columns moves their (diagonal, 1/√λ) rows of U
        inv = torch.empty_like(fast.perm)
        inv[fast.perm] = torch.arange(d)
        G_inv = lambda f: (f.U.T @ f.U)[inv][:, inv]  # noqa: E731  (H + λI)⁻¹ in the original order
        assert relerr(G_inv(fast), G_inv(spec)) <= 4 * d * U64 * kappa_G(A, source, fast.damp_lambda) ** 2
    # the report: estimated σ̃_1 and σ̃_d to 1 %
    assert abs(fast.sigma_max / spec.sigma_max - 1) < 1e-2
    assert abs(fast.sigma_min_kept / spec.sigma_min_kept - 1) < 1e-2


@pytest.mark.parametrize("truncation", ["rel", "energy", "none"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_certification_never_drops_a_value(gen, truncation, dtype):
    """Across damp and tau on both sides of keeps_everything's bound, the default path keeps what the
    spectrum path keeps: where the bound were wrong (the full-rank path taken although truncation would
    cut) the ranks would differ. A truncated factor comes from the spectrum path itself (identical); a
    full one is G_p's inverse factor to 2·d·u·κ(G), in the spectrum path's order wherever the two orders
    agree (with a small λ the last residuals are λ plus terms below rounding, so the greedy order among
    them is rounding noise in either path)."""
    d = 48
    X = ill_X(gen, 2 * d, d, 1e6)[0]
    R = qr([X], d)
    u = U64 if dtype == F64 else 2.0**-24
    for damp in (1e-9, 1e-6, 1e-4, 1e-2, 1.0):
        for tau in (1e-8, 1e-5, 1e-3, 1e-2, 1e-1):
            args = dict(damp=damp, truncation=truncation, tau=tau, dtype=dtype)
            fast = factor(R, "qr", "svdqr", "pivot", **args)
            spec = factor(R, "qr", "svdqr", "pivot", force_spectrum=True, **args)
            assert fast.rank == spec.rank, (damp, tau)
            if fast.rank < d:
                assert torch.equal(fast.perm, spec.perm) and torch.equal(fast.U, spec.U), (damp, tau)
                continue
            bound = 2 * d * u * kappa_G(R, "qr", fast.damp_lambda)
            p = fast.perm
            G_p = (R.T @ R + fast.damp_lambda * torch.eye(d, dtype=F64))[p][:, p]
            U = fast.U.double()
            assert relerr(U @ G_p @ U.T, torch.eye(d, dtype=F64)) <= bound, (damp, tau)
            if torch.equal(fast.perm, spec.perm):
                assert relerr(fast.U, spec.U) <= bound, (damp, tau)


def test_preset_computes_no_spectrum(gen):
    """The lrgptq preset (λ > 0, rel τ = 1e-4) runs no SVD or eigendecomposition of a d-sized matrix (only
    the report's 40×40 Lanczos matrix); force_spectrum, and a truncation the bound cannot exclude (λ = 0),
    do."""
    R = qr([rand_X(gen, 120, 50)], 50)
    assert spectra_of_size(lambda: factor(R, "qr", "svdqr", "pivot", **PRESET), 50) == []
    assert spectra_of_size(lambda: factor(R, "qr", "svdqr", "pivot", force_spectrum=True, **PRESET), 50)
    assert spectra_of_size(lambda: factor(R, "qr", "svdqr", "pivot", truncation="rel", tau=1e-4), 50)


# ----------------------------------------------------------------------------- cholesky and the gram of R


@pytest.mark.parametrize("d", [10, 300])
def test_cholesky_from_R_equals_from_H(gen, d):
    """The qr state's H = RᵀR is formed from R's triangle (a third of a GEMM): the same factor as from H."""
    X = rand_X(gen, 2 * d, d)
    R = qr([X], d)
    a = factor(R, "qr", "cholesky", "act", damp=0.01)
    b = factor(R.T @ R, "gram", "cholesky", "act", damp=0.01)
    assert torch.equal(a.perm, b.perm) and relerr(a.U, b.U) < 1e-12
    full = randn(gen, d, d)  # a square 'qr' state that is not triangular: its full AᵀA
    c = factor(full, "qr", "cholesky", "identity", damp=0.01)
    assert relerr(c.U, factor(full.T @ full, "gram", "cholesky", "identity", damp=0.01).U) < 1e-10


@pytest.mark.parametrize("d,order", [(64, "identity"), (1100, "act"), (700, "pivot")])
def test_cholesky_matches_gptqs_recipe(gen, d, order):
    """U = V⁻¹ with H_λ = VVᵀ (one Cholesky, a triangular inverse by 512-column blocks, so d = 700
    and 1100 cross block edges) is GPTQ's chol_upper(cholesky_inverse(chol(H_λ))) in the same order
    to rounding, on an ill-conditioned H."""
    X = ill_X(gen, 2 * d, d, 1e4)[0]
    H = X.T @ X
    f = factor(H, "gram", "cholesky", order, damp=0.01)
    p = f.perm
    Hl = (H + f.damp_lambda * torch.eye(d, dtype=F64))[p][:, p]
    gptq = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hl)), upper=True)
    k = torch.linalg.cond(Hl).item()
    assert torch.equal(f.U, f.U.triu()) and relerr(f.U, gptq) < 4 * d * U64 * k


# ----------------------------------------------------------------------------- named outputs


@pytest.mark.parametrize("route,source,order", [("cholesky", "gram", "act"), ("svdqr", "qr", "pivot"),
                                                ("ql", "qr", "identity")])
def test_named_outputs(gen, route, source, order):
    d = 20
    X = rand_X(gen, 60, d)
    X[:, 4] = 0
    A = qr([X], d) if source == "qr" else X.T @ X
    f = factor(A, source, route, order, damp=0.01, truncation="rel", tau=1e-4)
    assert isinstance(f.rank, int) and isinstance(f.damp_retries, int) and isinstance(f.pivots, int)
    assert isinstance(f.damp_lambda, float) and isinstance(f.sigma_max, float) and isinstance(f.from_original, bool)
    assert f.dead.tolist() == [j == 4 for j in range(d)] and f.pivots == d
    assert f.damp_retries == (route == "ql")  # ql tries λ = 0 first, and the dead feature makes it damp
    assert f.from_original == (route == "ql")
    mean_diag = (X.T @ X).diagonal().mean().item()
    if route == "svdqr":
        assert math.isclose(f.damp_lambda, 0.01 * mean_diag, rel_tol=1e-12) and f.sigma_max > f.sigma_min_kept > 0
    else:
        assert f.sigma_max == f.sigma_min_kept == 0.0
    if route == "cholesky":  # the dead feature's H_jj is set to 1 before the mean is taken
        assert math.isclose(f.damp_lambda, 0.01 * (mean_diag + 1 / d), rel_tol=1e-12)
