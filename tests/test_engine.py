"""The GPTQ engine (lrgptq.ops.gptq_quantize) against the reference transcription of the engine spec."""
import pytest
import torch

import reference as ref
from util import gptq, make_perm, problem, randn

F64 = torch.float64


def assert_same(out, exp, seed):
    """Codes and g_idx bit for bit; scales, zeros, Q to 1e-12 relative; row_loss to 1e-10."""
    names = ("codes", "scales", "zeros", "g_idx", "Q", "row_loss")
    assert out._fields[:6] == names
    out = tuple(getattr(out, name) for name in names)
    for name, a, b in zip(names, out, exp):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
    assert torch.equal(out[0], exp[0]), f"codes differ at {(out[0] != exp[0]).nonzero()[:5].tolist()} (seed {seed})"
    assert torch.equal(out[3], exp[3]), "g_idx"
    for i, rtol in ((1, 1e-12), (2, 1e-12), (4, 1e-12), (5, 1e-10)):
        atol = rtol * max(exp[i].abs().max().item(), 1e-300)
        torch.testing.assert_close(out[i], exp[i], rtol=rtol, atol=atol, msg=lambda m: f"{names[i]}: {m} (seed {seed})")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("mse", [False, True])
def test_quantizer_settings(gen, bits, group_size, sym, mse):
    d = 256 if group_size == 128 else 96
    W, X, H = problem(gen, 11, d)
    perm = make_perm("act", H, gen)
    U = ref.cholesky_U(H, perm)
    q = dict(bits=bits, group_size=group_size, sym=sym, mse=mse, block_size=40)  # groups straddle blocks
    assert_same(gptq(W, perm, U, **q), ref.gptq(W, perm, U, **q), gen.initial_seed())


@pytest.mark.parametrize("perm_kind", ["identity", "act", "random"])
@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("from_original", [False, True])
@pytest.mark.parametrize("k", [96, 61, 0])
@pytest.mark.parametrize("block_size", [1, 7, 32, 128])
def test_orders_rank_blocks(gen, perm_kind, static_groups, from_original, k, block_size):
    W, X, H = problem(gen, 9, 96)
    perm = make_perm(perm_kind, H, gen)
    U = ref.cholesky_U(H, perm)[:k].contiguous()
    q = dict(bits=4, group_size=32, sym=False, mse=False, static_groups=static_groups,
             from_original=from_original, block_size=block_size)
    assert_same(gptq(W, perm, U, **q), ref.gptq(W, perm, U, **q), gen.initial_seed())


@pytest.mark.parametrize("d_out,d,group_size,block_size", [
    (5, 96, 32, 64),    # d not a multiple of the block
    (3, 96, 48, 32),    # groups start mid-block and straddle the next one
    (33, 96, 24, 7),
    (1, 100, -1, 32),
    (7, 120, 40, 128),  # block wider than d
    (4, 130, 13, 8),
    (6, 60, 12, 1),
    (2, 17, 17, 5),
    (5, 96, 40, 32),    # ragged: the last group (16 columns) is shorter, as in d = 576 with g128
    (3, 100, 64, 48),   # ragged, and the short last group straddles a block
])
@pytest.mark.parametrize("perm_kind", ["act", "random"])
def test_ugly_shapes(gen, d_out, d, group_size, block_size, perm_kind):
    W, X, H = problem(gen, d_out, d)
    perm = make_perm(perm_kind, H, gen)
    U = ref.cholesky_U(H, perm)
    q = dict(bits=3, group_size=group_size, sym=False, mse=True, block_size=block_size)
    assert_same(gptq(W, perm, U, **q), ref.gptq(W, perm, U, **q), gen.initial_seed())


@pytest.mark.parametrize("bits", [3, 4])
def test_float32_close_to_reference(gen, bits):
    """float32: the op computes in W's dtype. Codes are not expected bit for bit: the lazy GEMM and
    the in-block updates sum in another order (BLAS blocking, FMA), so a running target can land on
    the other side of a rounding boundary; the flip then moves later targets of that row only."""
    W, X, H = problem(gen, 64, 128)
    perm = make_perm("act", H, gen)
    U64 = ref.cholesky_U(H, perm)
    W32, U32 = W.float(), U64.float()
    q = dict(bits=bits, group_size=32, sym=False, mse=False, block_size=32)
    out = gptq(W32, perm, U32, **q)
    exp = ref.gptq(W32, perm, U32, **q)
    assert out.scales.dtype == torch.float32 and out.Q.dtype == torch.float32 and out.row_loss.dtype == torch.float32
    agree = (out.codes == exp[0]).double().mean().item()
    assert agree >= 0.999, f"codes agree {agree:.5f} (seed {gen.initial_seed()})"
    exp64 = ref.gptq(W, perm, U64, **q)
    rel = (out.row_loss.double().sum() - exp64[5].sum()).abs() / exp64[5].sum()
    assert rel < 1e-2


@pytest.mark.parametrize("bits,group_size,sym,mse", [(4, -1, False, False), (3, 16, True, False),
                                                     (2, 24, False, True), (8, 48, True, True)])
def test_rtn_is_zero_row_U(gen, bits, group_size, sym, mse):
    W = randn(gen, 13, 96) * torch.exp(randn(gen, 96))
    codes, scales, zeros, Q = ref.rtn(W, bits=bits, group_size=group_size, sym=sym, mse=mse)
    q = dict(bits=bits, group_size=group_size, sym=sym, mse=mse)
    U0 = torch.empty(0, 96, dtype=F64)
    for perm, static in ((torch.arange(96), False), (torch.randperm(96, generator=gen), True)):
        out = gptq(W, perm, U0, static_groups=static, **q)
        assert torch.equal(out.codes, codes)
        torch.testing.assert_close(out.scales, scales, rtol=1e-15, atol=0)
        torch.testing.assert_close(out.zeros, zeros, rtol=0, atol=0)
        torch.testing.assert_close(out.Q, Q, rtol=1e-15, atol=1e-15)
        assert torch.all(out.row_loss == 0)


def test_outputs_are_consistent(gen):
    """Q = scales[g_idx] * (codes - zeros[g_idx]) in original order; zeros integer valued."""
    W, X, H = problem(gen, 10, 64)
    perm = torch.randperm(64, generator=gen)
    U = ref.cholesky_U(H, perm)
    codes, scales, zeros, g_idx, Q, loss, _, _ = gptq(W, perm, U, bits=3, group_size=16, mse=True)
    gi = g_idx.long()
    deq = scales[gi].T * (codes.to(F64) - zeros[gi].T)
    torch.testing.assert_close(Q, deq, rtol=1e-14, atol=1e-14)
    assert torch.equal(zeros, zeros.round()) and int(codes.max()) <= 7
    assert sorted(torch.bincount(gi).tolist()) == [16] * 4


# ----------------------------------------------------------------------------- bad inputs

ERR = (RuntimeError, ValueError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_W_names_W(gen, bad, dtype):
    W, X, H = problem(gen, 4, 32)
    W[2, 7] = bad
    with pytest.raises(ERR, match=r"\bW\b"):
        gptq(W.to(dtype), torch.arange(32), ref.cholesky_U(H).to(dtype), bits=4)


@pytest.mark.parametrize("where", ["first", "last", "middle"])
@pytest.mark.parametrize("perm_kind", ["identity", "random"])
@pytest.mark.parametrize("engine", ["gptq", "vq"])
def test_nonfinite_anywhere_is_refused(gen, where, perm_kind, engine):
    """W is checked on the engines' first pass over it (the gather into perm order, split over
    threads by rows): a bad value in any row, at either end, is found, with the message naming W;
    a bad U is refused too, naming U."""
    from lrgptq import ops as lops
    d_out, d = 67, 64
    W, X, H = problem(gen, d_out, d)
    perm = make_perm(perm_kind, H, gen)
    U = ref.cholesky_U(H, perm)
    r, c = {"first": (0, 0), "last": (d_out - 1, d - 1), "middle": (33, 17)}[where]

    def run(W, U):
        if engine == "gptq":
            return gptq(W, perm, U, bits=3, group_size=32)
        return lops.vq_quantize(W, perm, U, from_original=False, dim=2, bits=2, group_cols=32, group_rows=-1,
                                em_iters=2, codebook_int8=False)

    run(W, U)  # the clean problem runs
    Wb = W.clone()
    Wb[r, c] = float("inf")
    with pytest.raises(RuntimeError, match=r"W contains NaN or Inf"):
        run(Wb, U)
    Ub = U.clone()
    Ub[c, c] = float("nan")
    with pytest.raises(RuntimeError, match=r"U contains NaN or Inf"):
        run(W, Ub)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rounding_ties_go_to_even(dtype):
    """The quantizer rounds half to even (as torch.round and nearbyint), -0 to 0: with the grid of
    [0, 15] at 4 bits (scale 1, zero 0) and no feedback (U with 0 rows), codes are round(x)."""
    x = torch.tensor([0.0, 15.0, 0.5, 1.5, 2.5, 3.5, 4.5, 13.5, 14.5, -0.0, 2.4999999, 7.5000001], dtype=dtype)
    W = x.repeat(3, 1)
    out = gptq(W, torch.arange(x.numel()), torch.zeros(0, x.numel(), dtype=dtype), bits=4)
    assert torch.equal(out[0][0].to(dtype), torch.round(x).clamp(0, 15)), out[0][0].tolist()
    assert out[1][0, 0] == 1 and out[2][0, 0] == 0


def _bad_calls(d):
    U = ref.cholesky_U(problem(torch.Generator().manual_seed(0), 1, d)[2])
    W = torch.randn(3, d, dtype=F64)
    p = torch.arange(d)
    dup = p.clone()
    dup[3] = 5
    return {
        "U_wrong_d": (W, p, U[:, :-1].contiguous(), {}),
        "U_too_many_rows": (W, p, torch.cat([U, U[:1]]), {}),
        "perm_short": (W, p[:-1].contiguous(), U, {}),
        "perm_duplicate": (W, dup, U, {}),
        "perm_out_of_range": (W, torch.cat([p[:-1], torch.tensor([d])]), U, {}),
        "perm_negative": (W, torch.cat([torch.tensor([-1]), p[1:]]), U, {}),
        "bits_1": (W, p, U, dict(bits=1)),
        "bits_9": (W, p, U, dict(bits=9)),
        "group_zero": (W, p, U, dict(group_size=0)),
        "group_minus_2": (W, p, U, dict(group_size=-2)),
        "block_zero": (W, p, U, dict(block_size=0)),
        "W_1d": (W[0], p, U, {}),
        "W_int": (W.round().to(torch.int32), p, U, {}),
    }


@pytest.mark.parametrize("case", list(_bad_calls(96)))
def test_bad_arguments_raise(case):
    W, perm, U, kw = _bad_calls(96)[case]
    with pytest.raises(ERR):
        gptq(W, perm, U, **kw)
