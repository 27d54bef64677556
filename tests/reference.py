"""Plain-PyTorch reference of the lrgptq engine: the spec in code.

Transcribes the "Engine semantics" and "Quantizer" sections of the engine API contract
(docs/design.md §4). Slow, simple, dtype-following (use float64 for exact comparisons).
No import of lrgptq here: this file must stay usable before and without the C++ ops.

    gptq(W, perm, U, ...)      blocked lazy-update GPTQ (like IST-DASLab gptq.py `fasterquant`)
    obs_explicit(W, H, perm)   fixed-order OBS, explicit inverse of the remaining Hessian per step
    rtn(W, ...)                plain round-to-nearest, groups over original columns
    cholesky_U(H, perm)        upper Cholesky of H^-1 in perm order (H^-1 = U^T U)
    ql_U(R, perm)              the engine-ready U of the exact "ql" route (use with from_original)
    gram(X), qr_R(X, R0)       reference accumulators
"""
import torch

# ----------------------------------------------------------------------------- quantizer


def quantize(x, scale, zero, maxq):
    """Integer codes: clamp(round(x / scale) + zero, 0, maxq); torch.round is half-to-even."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q, scale, zero):
    return scale * (q - zero)


def quant_params(x, bits, sym, mse):
    """Per-row (scale, zero) of x (rows, cols), as GPTQ's Quantizer.find_params(weight=True)."""
    maxq = 2**bits - 1
    z = torch.zeros(x.shape[0], dtype=x.dtype)
    xmin = torch.minimum(x.min(1).values, z)
    xmax = torch.maximum(x.max(1).values, z)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -1.0, xmin)
    xmax = torch.where(both0, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-xmin / scale)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(0.8 * 100)):
            p = 1 - i / 100
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = (xmax1 - xmin1) / maxq
            zero1 = zero if sym else torch.round(-xmin1 / scale1)
            q = dequantize(quantize(x, scale1[:, None], zero1[:, None], maxq), scale1[:, None], zero1[:, None])
            err = (q - x).abs().pow(2.4).sum(1)
            better = err < best  # strict: the first (widest) of equal candidates wins
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    return scale, zero


# ----------------------------------------------------------------------------- engine


def g_idx_of(perm, d, group_size, static_groups):
    gs = d if group_size == -1 else group_size
    perm = perm.long()
    if static_groups or torch.equal(perm, torch.arange(d)):
        return (torch.arange(d) // gs).to(torch.int32)
    g = torch.empty(d, dtype=torch.int32)
    g[perm] = (torch.arange(d) // gs).to(torch.int32)
    return g


def gptq(W, perm, U, *, bits=4, group_size=-1, sym=False, mse=False, static_groups=False,
         from_original=False, block_size=128):
    """The engine. Returns (codes uint8, scales (G,d_out), zeros (G,d_out), g_idx int32, Q, row_loss),
    codes and Q in the ORIGINAL column order, everything else in W's dtype: the op's outputs."""
    d_out, d = W.shape
    k = U.shape[0]
    dt = W.dtype
    perm = perm.long()
    maxq = 2**bits - 1
    gs = d if group_size == -1 else group_size
    W0 = W[:, perm].clone()  # the original targets, perm order
    T = W0.clone()  # the running targets
    Up = torch.zeros(d, d, dtype=dt)
    Up[:k] = U  # rows past rank are zero: those columns propagate nothing
    scales = torch.zeros(-(-d // gs), d_out, dtype=dt)
    zeros = torch.zeros(-(-d // gs), d_out, dtype=dt)
    if static_groups:  # from the ORIGINAL W, original column order, before anything
        for g in range(-(-d // gs)):
            scales[g], zeros[g] = quant_params(W[:, g * gs:(g + 1) * gs], bits, sym, mse)
    codes = torch.zeros(d_out, d, dtype=dt)  # perm order
    Q = torch.zeros(d_out, d, dtype=dt)
    loss = torch.zeros(d_out, dtype=dt)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        E = torch.zeros(d_out, i2 - i1, dtype=dt)  # err_j of this block's columns
        for j in range(i1, i2):
            if static_groups:
                g = int(perm[j]) // gs
                scale, zero = scales[g], zeros[g]
            elif j % gs == 0:
                # group params from T[:, j:j+gs] with every update from columns < j. Inside the
                # block the columns have them; past the block they still lack columns i1..j-1.
                x = T[:, j:j + gs].clone()
                if j + gs > i2:
                    x[:, i2 - j:] -= E[:, :j - i1] @ Up[i1:j, i2:j + gs]
                scale, zero = quant_params(x, bits, sym, mse)
                scales[j // gs], zeros[j // gs] = scale, zero
            q = quantize(T[:, j], scale, zero, maxq)
            codes[:, j] = q
            Q[:, j] = dequantize(q, scale, zero)
            if j < k:
                base = W0[:, j] if from_original else T[:, j]
                err = (base - Q[:, j]) / U[j, j]
                loss += (T[:, j] - Q[:, j]) ** 2 / U[j, j] ** 2
                T[:, j + 1:i2] -= torch.outer(err, U[j, j + 1:i2])
                E[:, j - i1] = err
        T[:, i2:] -= E @ Up[i1:i2, i2:]  # the lazy batch update
    out_codes = torch.empty(d_out, d, dtype=torch.uint8)
    out_codes[:, perm] = codes.to(torch.uint8)
    out_Q = torch.empty_like(Q)
    out_Q[:, perm] = Q
    return out_codes, scales, zeros, g_idx_of(perm, d, group_size, static_groups), out_Q, loss


def obs_explicit(W, H, perm, *, bits=4, group_size=-1, sym=False, mse=False, static_groups=False):
    """Fixed-order OBS, no factor: at each step the inverse of the REMAINING Hessian is formed
    explicitly (inv(H[rest, rest])), column j quantized, the rest updated by
    -(w_j - q_j) * Hinv[j, rest] / Hinv[j, j]. Returns (codes uint8, Q, row_loss), original order."""
    d_out, d = W.shape
    perm = perm.long()
    maxq = 2**bits - 1
    gs = d if group_size == -1 else group_size
    T = W[:, perm].clone()
    Hp = H[perm][:, perm]
    codes = torch.zeros(d_out, d, dtype=W.dtype)
    Q = torch.zeros_like(T)
    loss = torch.zeros(d_out, dtype=W.dtype)
    static = [quant_params(W[:, g * gs:(g + 1) * gs], bits, sym, mse) for g in range(-(-d // gs))] if static_groups else None
    for j in range(d):
        if static_groups:
            scale, zero = static[int(perm[j]) // gs]
        elif j % gs == 0:
            scale, zero = quant_params(T[:, j:j + gs], bits, sym, mse)  # all updates are applied
        codes[:, j] = quantize(T[:, j], scale, zero, maxq)
        Q[:, j] = dequantize(codes[:, j], scale, zero)
        Hinv = torch.linalg.inv(Hp[j:, j:])
        e = T[:, j] - Q[:, j]
        loss += e**2 / Hinv[0, 0]
        T[:, j + 1:] -= torch.outer(e / Hinv[0, 0], Hinv[0, 1:])
    out_codes = torch.empty(d_out, d, dtype=torch.uint8)
    out_codes[:, perm] = codes.to(torch.uint8)
    out_Q = torch.empty_like(Q)
    out_Q[:, perm] = Q
    return out_codes, out_Q, loss


def rtn(W, *, bits=4, group_size=-1, sym=False, mse=False):
    """Plain round-to-nearest, groups over the original columns. (codes uint8, scales, zeros, Q)."""
    d_out, d = W.shape
    gs = d if group_size == -1 else group_size
    maxq = 2**bits - 1
    codes = torch.empty(d_out, d, dtype=W.dtype)
    scales = torch.empty(-(-d // gs), d_out, dtype=W.dtype)
    zeros = torch.empty_like(scales)
    for g in range(-(-d // gs)):
        s, z = quant_params(W[:, g * gs:(g + 1) * gs], bits, sym, mse)
        scales[g], zeros[g] = s, z
        codes[:, g * gs:(g + 1) * gs] = quantize(W[:, g * gs:(g + 1) * gs], s[:, None], z[:, None], maxq)
    Q = dequantize(codes, scales.repeat_interleave(gs, 0).T, zeros.repeat_interleave(gs, 0).T)
    return codes.to(torch.uint8), scales, zeros, Q


# ----------------------------------------------------------------------------- factors


def _perm(perm, d):
    return torch.arange(d) if perm is None else perm.long()


def cholesky_U(H, perm=None):
    """Upper U with (H[perm][:, perm])^-1 = U^T U, as GPTQ: cholesky, cholesky_inverse, cholesky upper."""
    p = _perm(perm, H.shape[0])
    L = torch.linalg.cholesky(H[p][:, p])
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def ql_U(R, perm=None):
    """Engine-ready U (use with from_original=True) of the exact ql route from R (H = R^T R).
    L lower with H_p = L^T L (QR of the column-reversed R[:, perm]); GPTQ is then
    q_j = Q(w_j + sum_{i<j} (L_ji / L_jj)(w_i - q_i)): in engine form U_jj = 1/L_jj and
    U_jl = -L_lj / (L_jj L_ll) for l > j."""
    p = _perm(perm, R.shape[1])
    A = R[:, p].flip(1)
    R2 = torch.linalg.qr(A, mode="r").R
    R2 = R2 * torch.where(torch.diagonal(R2) < 0, -1.0, 1.0).to(R2.dtype)[:, None]
    L = R2.flip(0).flip(1)  # lower
    dinv = 1 / torch.diagonal(L)
    U = -(dinv[:, None] * L.T * dinv[None, :])
    U.diagonal().copy_(dinv)
    return U


# ----------------------------------------------------------------------------- accumulators


def gram(X):
    """H = X^T X in float64, X (..., d)."""
    X = X.reshape(-1, X.shape[-1]).double()
    return X.T @ X


def qr_R(X, R0=None):
    """R (d, d) upper with R^T R = [R0; X]^T [R0; X], diag(R) >= 0 (torch.linalg.qr + sign fix)."""
    X = X.reshape(-1, X.shape[-1]).double()
    d = X.shape[1]
    A = X if R0 is None else torch.cat([R0.double(), X])
    r = torch.linalg.qr(A, mode="r").R
    r = r * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(r.dtype)[:, None]
    R = torch.zeros(d, d, dtype=torch.float64)
    R[:r.shape[0]] = r
    return R


def objective(W, Q, X):
    """||(W - Q) X^T||_F^2 in float64."""
    return float(((W.double() - Q.double()) @ X.reshape(-1, X.shape[-1]).double().T).pow(2).sum())


def block_ldlq(W, perm, U, *, D, bits=4, group_size=-1, sym=False, static_groups=False):
    """Block LDLQ by brute force: columns D at a time (perm order), the D codes minimising
    ‖U_JJ^-T (t_J − q)‖² over every code combination, then T[:, J+] −= z_J U[J, J+]; a full-rank U,
    min-max grids from the fully updated targets at each group start. D = 1 is scalar GPTQ.
    Returns (codes uint8 original order, Q original order, row_loss, row_clipped)."""
    import itertools

    d_out, d = W.shape
    dt = W.dtype
    perm = perm.long()
    maxq = 2**bits - 1
    gs = d if group_size == -1 else group_size
    T = W[:, perm].clone()
    G = -(-d // gs)
    scales = torch.zeros(G, d_out, dtype=dt)
    zeros = torch.zeros(G, d_out, dtype=dt)
    if static_groups:
        for g in range(G):
            scales[g], zeros[g] = quant_params(W[:, g * gs:(g + 1) * gs], bits, sym, False)
    codes = torch.zeros(d_out, d, dtype=dt)
    Q = torch.zeros(d_out, d, dtype=dt)
    loss = torch.zeros(d_out, dtype=dt)
    clipped = torch.zeros(d_out, dtype=torch.long)
    for j0 in range(0, d, D):
        J = list(range(j0, min(j0 + D, d)))
        n = len(J)
        if not static_groups and j0 % gs == 0:
            scales[j0 // gs], zeros[j0 // gs] = quant_params(T[:, j0:j0 + gs], bits, sym, False)
        grp = [(int(perm[j]) if static_groups else j) // gs for j in J]
        s = torch.stack([scales[g] for g in grp], 1)  # (d_out, n)
        z = torch.stack([zeros[g] for g in grp], 1)
        cand = torch.tensor(list(itertools.product(range(maxq + 1), repeat=n)), dtype=dt)  # (C, n)
        Ainv = torch.linalg.inv(U[j0:j0 + n, j0:j0 + n].T)  # U_JJ^-T
        for r in range(d_out):
            q = s[r] * (cand - z[r])  # (C, n)
            cost = ((T[r, J] - q) @ Ainv.T).square().sum(1)
            c = int(torch.argmin(cost))
            codes[r, J] = cand[c]
            Q[r, J] = q[c]
        E = torch.linalg.solve_triangular(U[j0:j0 + n, j0:j0 + n].T, (T[:, J] - Q[:, J]).T, upper=False).T
        # clipping: each target c_a = t_a − Σ_{i<a} U_ia z_i rounds outside 0..maxq
        centre = T[:, J] - E @ torch.triu(U[j0:j0 + n, j0:j0 + n], 1)
        raw = torch.round(centre / s) + z
        clipped += ((raw < 0) | (raw > maxq)).sum(1)
        loss += E.square().sum(1)
        T[:, j0 + n:] -= E @ U[j0:j0 + n, j0 + n:]
    out_codes = torch.empty(d_out, d, dtype=torch.uint8)
    out_codes[:, perm] = codes.to(torch.uint8)
    out_Q = torch.empty_like(Q)
    out_Q[:, perm] = Q
    return out_codes, out_Q, loss, clipped
