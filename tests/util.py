"""Test helpers: random problems and thin positional wrappers of the torch.ops.lrgptq ops
(schemas in the engine API contract). lrgptq is imported lazily, so reference-only tests run without it."""
import torch


def randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def rand_X(gen, N, d, dtype=torch.float64):
    """Correlated calibration inputs with distinct column scales (so act-order has no ties)."""
    mix = torch.eye(d, dtype=torch.float64) + 0.5 * randn(gen, d, d) / d**0.5
    scale = torch.exp(0.5 * randn(gen, d))
    return ((randn(gen, N, d) @ mix) * scale).to(dtype)


def problem(gen, d_out, d, N=None, dtype=torch.float64):
    """(W, X, H) with H = X^T X full rank (N defaults to 3d)."""
    N = 3 * d if N is None else N
    X = rand_X(gen, N, d)
    W = randn(gen, d_out, d)
    return W.to(dtype), X.to(dtype), X.T @ X


def ill_X(gen, N, d, kappa):
    """X = A diag(s) B, A (N, d) orthonormal columns, B (d, d) orthogonal, s log-spaced 1 .. 1/kappa."""
    A = torch.linalg.qr(randn(gen, N, d)).Q
    B = torch.linalg.qr(randn(gen, d, d)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), d, dtype=torch.float64)
    return (A * s) @ B, s


def make_perm(kind, H, gen):
    """A column order: identity, act-order (diag H descending) or random."""
    d = H.shape[0]
    if kind == "identity":
        return torch.arange(d)
    if kind == "act":
        return torch.argsort(torch.diagonal(H), descending=True, stable=True)
    return torch.randperm(d, generator=gen)


def random_orthogonal(gen, n):
    Qm, Rm = torch.linalg.qr(randn(gen, n, n))
    return Qm * torch.sign(torch.diagonal(Rm))


def ops():
    import lrgptq  # noqa: F401  (registers torch.ops.lrgptq)
    return torch.ops.lrgptq


def gptq_op(W, perm, U, *, bits=4, group_size=-1, sym=False, mse=False, static_groups=False,
            from_original=False, block_size=128):
    """torch.ops.lrgptq.gptq_quantize -> (codes, scales, zeros, g_idx, Q, row_loss)."""
    return ops().gptq_quantize(W, perm, U, from_original, bits, group_size, sym, mse, static_groups, block_size)


def factor_op(A, source, route, order="identity", *, damp=0.0, damp_ref="mean", max_retries=8,
              truncation="none", tau=0.0, dtype=torch.float64, force_spectrum=False):
    """lrgptq.ops.factor -> Factorization (perm, U, rank, dead, damp_lambda, damp_retries, sigma_max,
    sigma_min_kept, from_original, pivots)."""
    from lrgptq import ops as lrgptq_ops
    return lrgptq_ops.factor(A, source=source, route=route, order=order, damp=damp, damp_ref=damp_ref,
                             max_retries=max_retries, truncation=truncation, tau=tau, dtype=dtype,
                             force_spectrum=force_spectrum)


def gram_op(X, H=None):
    H = torch.zeros(X.shape[-1], X.shape[-1], dtype=torch.float64) if H is None else H
    ops().gram_update(H, X)
    return H


def qr_op(batches, d, dtype=torch.float64, R=None):
    R = torch.zeros(d, d, dtype=dtype) if R is None else R
    for Xb in batches:
        ops().qr_update(R, Xb)
    return R


def sketch_op(Y, X, seed, offset, kind="sparse", zeta=8):
    ops().sketch_update(Y, X, seed, offset, kind, zeta)
    return Y


def quantize_with(W, A, source, route, order, *, dtype=torch.float64, damp=0.0, truncation="none",
                  tau=0.0, **quant):
    """factor + gptq_quantize, from_original as the factor reports it.
    Returns (codes, scales, zeros, g_idx, Q, row_loss), the Factorization."""
    f = factor_op(A, source, route, order, damp=damp, truncation=truncation, tau=tau, dtype=dtype)
    out = gptq_op(W.to(dtype), f.perm, f.U, from_original=f.from_original, **quant)
    return out, f


def sweep_split(N, gen, parts):
    """Random split points of range(N) into `parts` non-empty pieces."""
    cuts = torch.randperm(N - 1, generator=gen)[:parts - 1].add(1).sort().values.tolist()
    bounds = [0] + cuts + [N]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]
