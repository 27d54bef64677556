"""The CUDA ops against the CPU ops on the same inputs (marked `cuda`; skipped without a GPU).

What must hold, per op:
- gptq_quantize in float64 within one block (block_size >= d): the CUDA engine does the CPU
  engine's arithmetic operation for operation (no FMA contraction on either side), so codes,
  scales, zeros, g_idx, Q and row_loss are bit-identical. With several blocks the lazy update is a
  cuBLAS GEMM that sums in its own order: codes still agree (a flip needs a value within rounding
  of a grid midpoint), the floats to 1e-10 relative. The MSE grid search uses CUDA's pow (not
  correctly rounded): codes agree on >= 99 % of entries.
- Accumulators: gram and qr to 1e-12 relative; the sketches draw the same S (shared RNG; the
  Gaussian one inside the product's tiles), summed in another order, to 1e-12 relative.
- factor: cuSOLVER/cuBLAS instead of LAPACK (the pivot loop still on the CPU): same perm and rank,
  U to 1e-9 relative on well-conditioned inputs.
- qmatmul: the fused decode kernel (<= 8 rows) to 1e-5 of ‖y‖ (float32 sums in another order);
  the dequantize + float16 GEMM path (more rows) to 3e-3 of ‖y‖ (float16 operands).
Each op runs after the CUDA caching allocator has been filled with 0xFF blocks, so an output
element that a kernel forgets to write shows up as NaN or a wrong code.
"""
import pytest
import torch

import reference as ref
from lrgptq import ops
from util import gptq, make_perm, problem, rand_X, randn, raw_ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64 = torch.float64
OPS = ("gram_update", "qr_update", "sketch_update", "factor", "gptq_quantize", "pack_bits",
       "unpack_bits", "qmatmul")


def poison_cache(n_bytes=64 << 20):
    """Leaves blocks of 0xFF bytes in the CUDA caching allocator (large and small pools), so
    at::empty outputs start as NaN (float32/float64), 255 (uint8 codes) or -1 (int32): garbage
    that fails the checks unless each element is written."""
    blocks = [torch.full((n_bytes // 8 >> k,), -1, dtype=torch.int64, device="cuda") for k in range(8)]
    blocks += [torch.full((4096 >> k,), -1, dtype=torch.int64, device="cuda") for k in range(8)]
    del blocks
    torch.cuda.synchronize()


def cuda(*ts):
    return [t.cuda() for t in ts]


def test_every_op_has_a_cuda_kernel():
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lrgptq::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}: was the extension built with LRGPTQ_CUDA?"


def to_cpu(out):
    """A named op result with every tensor moved to the CPU."""
    return type(out)(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in out))


def run_both(W, perm, U, **q):
    cpu = gptq(W, perm, U, **q)
    poison_cache()
    gpu = gptq(*cuda(W, perm, U), **q)
    torch.cuda.synchronize()
    return cpu[:6], to_cpu(gpu)[:6]


def assert_identical(cpu, gpu, seed):
    names = ("codes", "scales", "zeros", "g_idx", "Q", "row_loss")
    for name, a, b in zip(names, cpu, gpu):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        bad = (a != b) & ~(a.isnan() & b.isnan()) if a.is_floating_point() else a != b
        assert not bad.any(), f"{name} differs at {bad.nonzero()[:5].tolist()} (seed {seed})"
        if a.is_floating_point():
            assert not b.isnan().any(), f"{name} has NaN: an element was not written (seed {seed})"


def assert_close(cpu, gpu, seed, rtol=1e-10):
    assert torch.equal(cpu[0], gpu[0]), f"codes differ at {(cpu[0] != gpu[0]).nonzero()[:5].tolist()} (seed {seed})"
    assert torch.equal(cpu[3], gpu[3]), "g_idx"
    for i, name in ((1, "scales"), (2, "zeros"), (4, "Q"), (5, "row_loss")):
        assert not gpu[i].isnan().any(), f"{name} has NaN (seed {seed})"
        atol = rtol * max(cpu[i].abs().max().item(), 1e-300)
        torch.testing.assert_close(gpu[i], cpu[i], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m} (seed {seed})")


# d = 100: the tile (32 rows × 100 float64, stride 40) fits in 48 KiB of shared memory; d = 256 in one block does not
# (the kernel works in global memory). Groups: per row, 32, a ragged 24 (last group of 4).
@pytest.mark.parametrize("d", [100, 256])
@pytest.mark.parametrize("group_size", [-1, 32, 24])
@pytest.mark.parametrize("perm_kind,static_groups", [("identity", False), ("act", False), ("act", True)])
@pytest.mark.parametrize("sym", [False, True])
def test_engine_one_block_is_bit_identical(gen, d, group_size, perm_kind, static_groups, sym):
    W, X, H = problem(gen, 70, d)  # 70 rows: a partial tile of 32 rows
    perm = make_perm(perm_kind, H, gen)
    U = ref.cholesky_U(H, perm)
    q = dict(bits=3, group_size=group_size, sym=sym, static_groups=static_groups, block_size=d)
    assert_identical(*run_both(W, perm, U, **q), gen.initial_seed())


@pytest.mark.parametrize("from_original", [False, True])
@pytest.mark.parametrize("k", [96, 60])  # full rank, and columns past rank 60
def test_engine_ql_form_and_rank_bit_identical(gen, from_original, k):
    W, X, H = problem(gen, 40, 96)
    perm = make_perm("random", H, gen)
    U = ref.cholesky_U(H, perm)[:k].contiguous()
    q = dict(bits=4, group_size=32, from_original=from_original, block_size=96)
    assert_identical(*run_both(W, perm, U, **q), gen.initial_seed())


@pytest.mark.parametrize("block_size", [1, 16, 40, 128])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
def test_engine_blocks_match_cpu(gen, block_size, group_size):
    W, X, H = problem(gen, 50, 200)
    perm = make_perm("act", H, gen)
    U = ref.cholesky_U(H, perm)
    q = dict(bits=4, group_size=group_size, block_size=block_size)
    assert_close(*run_both(W, perm, U, **q), gen.initial_seed())


@pytest.mark.parametrize("bits", [2, 4])
def test_engine_ex_counts_clipping_as_the_cpu(gen, bits):
    """gptq_quantize (scalar, min-max grid) on CUDA: the CPU's codes and per-row clip counts."""
    W, X, H = problem(gen, 70, 100)
    W[:, :5] *= 4  # outlier columns: the feedback pushes targets past the min-max grid
    perm = make_perm("act", H, gen)
    U = ref.cholesky_U(H, perm)
    q = dict(bits=bits, group_size=32, block_size=100, ldlq_dim=1, grid="minmax", grid_passes=1)
    cpu = gptq(W, perm, U, **q)
    poison_cache()
    gpu = to_cpu(gptq(*cuda(W, perm, U), **q))
    assert_identical(cpu[:6], gpu[:6], gen.initial_seed())
    assert int(cpu.row_clipped.sum()) > 0, "the problem was meant to clip"
    assert torch.equal(cpu.row_clipped, gpu.row_clipped), f"clip counts differ (seed {gen.initial_seed()})"
    assert gpu.grid_passes == 1


@pytest.mark.parametrize("ldlq_dim,grid", [(2, "minmax"), (1, "noclip")])
def test_engine_ex_cpu_only_options_raise(gen, ldlq_dim, grid):
    W, X, H = problem(gen, 8, 32)
    perm = torch.arange(32)
    U = ref.cholesky_U(H, perm)
    with pytest.raises(RuntimeError, match="CPU only"):
        gptq(*cuda(W, perm, U), bits=4, group_size=16, block_size=32, ldlq_dim=ldlq_dim, grid=grid)


def test_engine_float32_close(gen):
    W, X, H = problem(gen, 64, 160)
    perm = make_perm("act", H, gen)
    U = ref.cholesky_U(H, perm)
    cpu, gpu = run_both(W.float(), perm, U.float(), bits=4, group_size=32, block_size=64)
    assert (cpu[0] != gpu[0]).float().mean() < 2e-3, "float32 codes disagree on more than 0.2 %"
    assert not gpu[4].isnan().any()
    assert torch.allclose(gpu[5], cpu[5], rtol=1e-3)


def test_engine_mse_close(gen):
    W, X, H = problem(gen, 48, 96)
    perm = make_perm("act", H, gen)
    U = ref.cholesky_U(H, perm)
    cpu, gpu = run_both(W, perm, U, bits=3, group_size=32, mse=True, block_size=96)
    assert (cpu[0] != gpu[0]).float().mean() < 1e-2, "mse codes disagree on more than 1 %"
    assert abs(gpu[5].sum() - cpu[5].sum()) <= 1e-2 * cpu[5].sum()


@pytest.mark.parametrize("ugly", ["dead", "outlier", "collinear", "few_tokens"])
@pytest.mark.parametrize("route", ["cholesky", "svdqr", "ql"])
def test_quantize_linear_ugly_inputs(gen, ugly, route):
    """docs/design.md §6's ugly cases through quantize_linear with the weight on CUDA vs on the CPU."""
    d, N = 64, 256
    X = rand_X(gen, N, d)
    if ugly == "dead":
        X[:, 5] = 0
    elif ugly == "outlier":
        X[:, 7] *= 100
    elif ugly == "collinear":
        X[:, 9] = 2 * X[:, 3]
    else:
        X = X[:40]
    W = randn(gen, 24, d)
    acc = "gram" if route == "cholesky" else "qr"
    # order act: with 'pivot', a residual at rounding level after the last pivot of a
    # rank-deficient H may fall on either side of the stop threshold on the two devices.
    cfg = lrgptq.QuantConfig(bits=4, group_size=16, route=route, order="act", accumulator=acc, block_size=32,
                             compute_dtype=F64)
    cpu = lrgptq.quantize_linear(W, X, cfg)
    poison_cache()
    gpu = lrgptq.quantize_linear(W.cuda(), X.cuda(), cfg)
    assert gpu.codes.is_cuda and gpu.weight.is_cuda
    assert torch.isfinite(gpu.weight).all()
    assert torch.equal(gpu.codes.cpu(), cpu.codes), f"codes differ (seed {gen.initial_seed()})"
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-10, atol=1e-10)
    assert abs(gpu.loss - cpu.loss) <= 1e-8 * max(cpu.loss, 1.0)


def test_accumulators_match_cpu(gen):
    d, m = 48, 40  # tiles of 32: partial column, row and token tiles
    X = [rand_X(gen, n, d) for n in (30, 1, 77)]
    states = {
        "gram": torch.zeros(d, d, dtype=F64),
        "qr": 0.1 * torch.eye(d, dtype=F64),
        "sparse": torch.zeros(m, d, dtype=F64),
        "gaussian": torch.zeros(m, d, dtype=F64),
    }
    gpu = {k: v.cuda() for k, v in states.items()}
    offset = 0
    for Xb in X:
        for S, Xs in ((states, Xb), (gpu, Xb.cuda())):
            ops.gram_update(S["gram"], Xs)
            ops.qr_update(S["qr"], Xs)
            ops.sketch_update(S["sparse"], Xs, seed=7, offset=offset, kind="sparse", zeta=4)
            ops.sketch_update(S["gaussian"], Xs, seed=7, offset=offset, kind="gaussian", zeta=0)
        offset += Xb.shape[0]
    for k in states:
        a, b = states[k], gpu[k].cpu()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * a.abs().max().item(), msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("route,source", [("cholesky", "gram"), ("svdqr", "qr"), ("svdqr", "sketch"), ("ql", "qr")])
@pytest.mark.parametrize("order", ["act", "pivot"])
def test_factor_matches_cpu(gen, route, source, order):
    """cuSOLVER/cuBLAS on the GPU (pivots on the CPU) vs LAPACK: the same order and rank, U to
    1e-9 of its largest entry (H is well conditioned here: κ(H) ~ 1e2)."""
    W, X, H = problem(gen, 4, 40)
    A = {"gram": H, "qr": ref.qr_R(X), "sketch": X[:60].contiguous()}[source]
    # The raw op: the devices of all its outputs, info included, are under test (ops.factor reads info).
    args = (source, route, order, 0.01, "mean", 8, "rel", 1e-4, F64)
    cpu = raw_ops().factor(A, *args)
    gpu = raw_ops().factor(A.cuda(), *args)
    perm, U, rank, dead = cpu[:4]
    assert all(t.is_cuda for t in (gpu[0], gpu[1], gpu[3]))
    assert torch.equal(gpu[0].cpu(), perm) and gpu[2] == rank and torch.equal(gpu[3].cpu(), dead)
    torch.testing.assert_close(gpu[1].cpu(), U, rtol=1e-9, atol=1e-9 * U.abs().max().item())
    torch.testing.assert_close(torch.tensor(gpu[4:8], dtype=F64), torch.tensor(cpu[4:8], dtype=F64), rtol=1e-9,
                               atol=1e-12)
    assert gpu[8:] == cpu[8:]  # from_original, pivots


def make_layer(gen, d, d_out, bits, group_size, act_order):
    """A random GPTQ-layout layer (v1 zero points) as its packed tensors."""
    G = (d + group_size - 1) // group_size
    codes = torch.randint(0, 2**bits, (d_out, d), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(1, 2**bits, (G, d_out), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(G, d_out, generator=gen, dtype=F64) * 0.02 + 0.001).half()
    g_idx = torch.arange(d, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(d, generator=gen)]
    qweight = ops.pack_bits(codes.t().contiguous(), bits, 0)
    qzeros = ops.pack_bits((zeros.int() - 1).to(torch.uint8), bits, 1)
    W = scales.double()[g_idx.long()].t() * (codes.double() - zeros.double()[g_idx.long()].t())
    return qweight, qzeros, scales, g_idx, W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("act_order", [False, True])
def test_qmatmul_matches_reference(gen, bits, rows, act_order):
    # d spans two 512-input chunks (600: a partial last pack block of 24 inputs); d_out: a partial
    # tile of 128 outputs.
    d, d_out = (600 if act_order else 640), 200
    qweight, qzeros, scales, g_idx, W = make_layer(gen, d, d_out, bits, 64, act_order)
    x = randn(gen, rows, d)
    bias = randn(gen, d_out).half()
    y_ref = x @ W.t() + bias.double()
    poison_cache()
    y = ops.qmatmul(*cuda(x.float(), qweight, qzeros, scales, g_idx), bits, 1, bias.cuda())
    assert y.is_cuda and y.dtype == torch.float32 and y.shape == (rows, d_out)
    err = (y.double().cpu() - y_ref).norm() / y_ref.norm()
    assert err < (1e-5 if rows <= 8 else 3e-3), f"relative error {err:.2e} (seed {gen.initial_seed()})"


def test_qmatmul_batch_shape_and_dtype(gen):
    qweight, qzeros, scales, g_idx, W = make_layer(gen, 128, 64, 4, 32, False)
    x = randn(gen, 2, 3, 128).half()
    y = ops.qmatmul(*cuda(x, qweight, qzeros, scales, g_idx), 4, 1, None)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float16
    y_ref = x.double() @ W.t()
    assert (y.double().cpu() - y_ref).norm() / y_ref.norm() < 1e-3


def test_mixed_devices_raise_clear_errors(gen):
    W, X, H = problem(gen, 8, 16)
    U = ref.cholesky_U(H, torch.arange(16))
    with pytest.raises(RuntimeError, match="one device"):
        gptq(W.cuda(), torch.arange(16), U)
    qweight, qzeros, scales, g_idx, _ = make_layer(gen, 64, 32, 4, 32, False)
    with pytest.raises(RuntimeError, match="one device"):
        ops.qmatmul(torch.ones(1, 64, device="cuda"), qweight, qzeros, scales, g_idx, 4, 1, None)
