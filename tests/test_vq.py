"""GPTVQ (csrc/vq.cpp, python/lrgptq/vq.py): a 1-D uniform codebook is scalar GPTQ bit for bit;
the D-column engine matches an explicit-inverse block OBS reference; the loss identity; EM never
increases its objective; int8 codebooks are exact; vq_matmul is a codebook lookup; bad input is
refused with the op, the tensor and the fix."""

import pytest
import torch

import lrgptq
from lrgptq import vq

from util import factor_op, gptq_op, make_perm, ops, problem, randn


def vq_op(W, perm, U, *, dim=2, bits=2, group_cols=-1, group_rows=-1, em_iters=5, int8=True, codebooks=None,
          block_size=128, from_original=False):
    """torch.ops.lrgptq.vq_quantize -> (codes, codebooks, scales, Q, row_loss, em_trace)."""
    return ops().vq_quantize(W, perm, U, from_original, dim, bits, group_cols, group_rows, em_iters, int8,
                             codebooks, block_size)


def undamped(gen, d_out, d, order="identity"):
    W, X, H = problem(gen, d_out, d)
    perm = make_perm(order, H, gen)
    Hp = H[perm][:, perm]
    U = factor_op(Hp, "gram", "cholesky", "identity").U
    return W, X, perm, U


@pytest.mark.parametrize("order,group", [("identity", 8), ("identity", 16), ("act", -1)])
def test_1d_uniform_codebook_is_scalar_gptq(gen, order, group):
    # The grid of static-group GPTQ as a 1-D codebook per (group × row): same codes, same Q,
    # same loss, bit for bit in float64 (the same operations in the same order).
    W, _, perm, U = undamped(gen, 12, 32, order)
    bits, B = 3, 16 if group == -1 else group
    codes, scales, zeros, _, Q, row_loss = gptq_op(W, perm, U, bits=bits, group_size=group, static_groups=True,
                                                   block_size=B)
    levels = torch.arange(2**bits, dtype=torch.float64)
    grid = scales.T[:, :, None] * (levels - zeros.T[:, :, None])  # (d_out, groups, K)
    cb = grid.permute(1, 0, 2).unsqueeze(-1).contiguous()  # (column groups, row groups = rows, K, 1)
    c2, _, _, Q2, rl2, _ = vq_op(W, perm, U, dim=1, bits=bits, group_cols=group, group_rows=1, codebooks=cb,
                                 block_size=B)
    assert torch.equal(c2[:, torch.argsort(perm)].to(torch.uint8), codes), gen.initial_seed()
    assert torch.equal(Q2, Q)
    assert torch.equal(rl2, row_loss)


def block_obs(W, H, perm, codebooks, dim, group_cols):
    """Reference: D columns at a time with the explicit inverse of H on the columns left,
    q = argmin_c (t − c)·[H⁻¹]_bb⁻¹·(t − c)ᵀ, then t_rest −= (t − q)·[H⁻¹]_bb⁻¹·[H⁻¹]_b,rest."""
    Wp, Hp = W[:, perm].clone(), H[perm][:, perm]
    d_out, d = Wp.shape
    codes = torch.empty(d_out, d // dim, dtype=torch.long)
    for j in range(0, d, dim):
        Hinv = torch.linalg.inv(Hp[j:, j:])
        A = torch.linalg.inv(Hinv[:dim, :dim])
        C = codebooks[j // group_cols, 0]  # (K, dim)
        for r in range(d_out):
            diff = Wp[r, j:j + dim] - C
            dist = ((diff @ A) * diff).sum(1)
            codes[r, j // dim] = torch.argmin(dist)
        Qb = C[codes[:, j // dim]]
        Wp[:, j + dim:] -= (Wp[:, j:j + dim] - Qb) @ A @ Hinv[:dim, dim:]
    return codes


@pytest.mark.parametrize("dim", [2, 4])
def test_engine_matches_block_obs_reference(gen, dim):
    W, X, perm, U = undamped(gen, 6, 16, "act")
    K = 2 ** (2 * dim)
    cb = 0.8 * randn(gen, 2, 1, K, dim)  # two column groups of 8, one row group
    codes, _, _, Q, row_loss, _ = vq_op(W, perm, U, dim=dim, bits=2, group_cols=8, codebooks=cb, block_size=4)
    ref = block_obs(W, X.T @ X, perm, cb, dim, 8)
    assert torch.equal(codes.long(), ref), gen.initial_seed()


@pytest.mark.parametrize("dim,block", [(1, 8), (2, 6), (4, 128)])
def test_loss_is_the_output_error(gen, dim, block):
    # Σ_j ‖(t − q)·Ū⁻¹‖² = ‖(W − Q)Xᵀ‖²_F when undamped and full rank (DESIGN §6.3), codebooks fitted.
    W, X, perm, U = undamped(gen, 20, 24, "act")
    _, _, _, Q, row_loss, _ = vq_op(W, perm, U, dim=dim, bits=2, group_cols=12, group_rows=8, block_size=block)
    exact = ((W - Q) @ X.T).pow(2).sum()
    assert torch.allclose(row_loss.sum(), exact, rtol=1e-9), (float(row_loss.sum()), float(exact))


def test_em_never_increases_its_objective(gen):
    W, _, perm, U = undamped(gen, 32, 32, "act")
    *_, trace = vq_op(W, perm, U, dim=2, bits=2, group_cols=16, group_rows=16, em_iters=8)
    assert trace.shape == (2, 2, 9)
    steps = trace[..., 1:] - trace[..., :-1]
    assert (steps <= 1e-10 * trace[..., :-1]).all(), trace
    assert (trace[..., -1] < 0.9 * trace[..., 0]).all()  # and it does something


def test_em_beats_its_product_grid_start_on_the_layer_loss(gen):
    W, _, perm, U = undamped(gen, 32, 32)
    loss = [float(vq_op(W, perm, U, dim=2, bits=2, group_cols=16, em_iters=it)[4].sum()) for it in (0, 10)]
    assert loss[1] < loss[0], loss


def test_int8_codebooks_are_exact_and_dequantize_to_Q(gen):
    W, _, perm, U = undamped(gen, 16, 32, "act")
    codes, C, s, Q, _, _ = vq_op(W.float(), perm, U, dim=2, bits=3, group_cols=16, group_rows=8)
    assert torch.equal(s.half().float(), s) and (s > 0).all()  # float16 scales
    C8 = C / s[..., None, None]
    assert torch.equal(C8, C8.round()) and C8.abs().max() <= 127
    assert torch.equal(vq.dequantize(codes, C, perm, 16, 8), Q)  # the lookup reproduces Q exactly
    assert torch.equal(vq.dequantize(codes, s[..., None, None] * C8.to(torch.int8).float(), perm, 16, 8), Q)


def test_vq_matmul_is_x_times_the_looked_up_weight(gen):
    W, _, perm, U = undamped(gen, 40, 32, "act")
    codes, C, s, Q, _, _ = vq_op(W.float(), perm, U, dim=4, bits=2, group_cols=16, group_rows=24)
    C8 = torch.round(C / s[..., None, None]).to(torch.int8)
    x = randn(gen, 3, 5, 32, dtype=torch.float32)
    bias = randn(gen, 40, dtype=torch.float32)
    for c in (codes, codes.to(torch.int16), codes.to(torch.uint8)):
        y = ops().vq_matmul(x, c, C8, s, perm, 16, 24, bias)
        assert y.shape == (3, 5, 40)
        assert torch.allclose(y, x @ Q.T + bias, rtol=1e-5, atol=1e-5)


def test_bits_per_weight_counts_everything():
    b = vq.bits_per_weight(576, 576, 2, 2, 192, 12, ordered=False)
    assert b["indices"] == 576 * 576 * 2
    assert b["codebooks"] == 3 * 48 * 16 * 2 * 8 and b["scales"] == 3 * 48 * 16 and b["perm"] == 0
    assert b["bpw"] == pytest.approx(2 + 272 / (192 * 12))
    assert vq.bits_per_weight(10, 8, 4, 2, -1, -1, ordered=True)["perm"] == 8 * 16


def test_quantize_linear_vq_path_and_report(gen):
    W, X, _ = problem(gen, 24, 32)
    cfg = lrgptq.QuantConfig.for_method("gptq", bits=2, vq_dim=2, vq_group_cols=16, vq_group_rows=8, damp=0.0,
                                        compute_dtype=torch.float64)
    res = lrgptq.quantize_linear(W, X, cfg, name="blk.0.q")
    assert isinstance(res, vq.VQResult) and res.codes.shape == (24, 16)
    assert res.report["bpw"] == pytest.approx(2 + 2 * 3 * (16 * 2 * 8 + 16) / (24 * 32))
    assert res.loss == pytest.approx(float(((W - res.weight) @ X.T).pow(2).sum()), rel=1e-9)
    scalar = lrgptq.quantize_linear(W, X, lrgptq.QuantConfig.for_method("gptq", bits=2, group_size=16, damp=0.0,
                                                                        compute_dtype=torch.float64))
    assert res.loss < scalar.loss  # K = 16 fitted 2-D centroids vs a 4×4 product grid per row


@pytest.mark.parametrize("kw,msg", [
    (dict(dim=3), "dim"),
    (dict(dim=4, bits=4), "bits"),
    (dict(dim=2, group_cols=5), "group_cols"),
    (dict(dim=2, group_rows=0), "group_rows"),
    (dict(dim=2, em_iters=-1), "em_iters"),
    (dict(dim=2, block_size=1), "block_size"),
    (dict(dim=2, from_original=True), "ql form"),
    (dict(dim=2, codebooks=torch.zeros(1, 1, 3, 2, dtype=torch.float64)), "codebooks must have shape"),
])
def test_bad_arguments_are_refused(gen, kw, msg):
    W, _, perm, U = undamped(gen, 4, 8)
    with pytest.raises(RuntimeError, match=msg):
        vq_op(W, perm, U, **kw)


def test_bad_inputs_are_refused_with_the_layer_name(gen):
    W, X, _ = problem(gen, 4, 10)
    cfg = lrgptq.QuantConfig.for_method("gptq", bits=2, vq_dim=4, vq_group_cols=-1)
    with pytest.raises(RuntimeError, match=r"^blk\.3\.k: .*multiple of dim = 4"):
        lrgptq.quantize_linear(W, X, cfg, name="blk.3.k")
    W[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="W contains NaN"):
        vq_op(W[:, :8].contiguous(), torch.arange(8), torch.eye(8, dtype=torch.float64))
    for bad in (dict(vq_dim=3), dict(vq_dim=4, bits=4), dict(vq_dim=2, vq_group_cols=7), dict(vq_em_iters=-2),
                dict(vq_dim=2, route="ql"), dict(vq_codebook_steps=-1)):
        with pytest.raises(ValueError, match="QuantConfig"):
            lrgptq.QuantConfig(**bad)
    with pytest.raises(RuntimeError, match="codes must lie in"):
        ops().vq_matmul(torch.ones(1, 4), torch.full((2, 2), 9, dtype=torch.int32),
                        torch.zeros(1, 1, 4, 2, dtype=torch.int8), torch.ones(1, 1), torch.arange(4), -1, -1, None)


def test_pack_codes_round_trip(gen):
    from lrgptq.nn_vq import pack_codes, unpack_codes

    for width, m in ((4, 7), (6, 5), (8, 3), (12, 9)):
        codes = torch.randint(0, 1 << width, (3, m), generator=gen, dtype=torch.int32)
        packed = pack_codes(codes, width)
        assert packed.dtype == torch.uint8 and packed.shape == (3, -(-m * width // 8))
        assert torch.equal(unpack_codes(packed, width, m), codes)
    assert torch.equal(pack_codes(torch.tensor([[1, 2]]), 4), torch.tensor([[0x21]], dtype=torch.uint8))  # LSB first


def test_vq_matmul_has_a_meta_kernel():
    m = torch.device("meta")
    y = ops().vq_matmul(torch.empty(2, 3, 8, device=m), torch.empty(5, 4, dtype=torch.int32, device=m),
                        torch.empty(1, 1, 16, 2, dtype=torch.int8, device=m), torch.empty(1, 1, device=m),
                        torch.empty(8, dtype=torch.long, device=m), -1, -1, None)
    assert y.shape == (2, 3, 5) and y.device == m


def test_codebook_update_lowers_the_loss_and_keeps_the_identity(gen):
    W, X, _ = problem(gen, 24, 32)
    kw = dict(bits=2, vq_dim=2, vq_group_cols=16, vq_group_rows=12, damp=0.0, compute_dtype=torch.float64)
    before = lrgptq.quantize_linear(W, X, lrgptq.QuantConfig.for_method("gptq", **kw))
    after = lrgptq.quantize_linear(W, X, lrgptq.QuantConfig.for_method("gptq", vq_codebook_steps=5, **kw))
    assert torch.equal(after.codes, before.codes)  # assignments fixed
    assert after.loss < before.loss, (after.loss, before.loss)
    assert after.loss == pytest.approx(float(((W - after.weight) @ X.T).pow(2).sum()), rel=1e-9)
    C8 = after.codebooks / after.codebook_scales[..., None, None]
    assert torch.equal(C8, C8.round()) and torch.equal(after.codebook_scales.half().double(), after.codebook_scales)
    assert torch.equal(vq.dequantize(after.codes, after.codebooks, after.perm, 16, 12), after.weight)
