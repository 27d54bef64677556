"""The packing ops and the quantized matmul against the GPTQ layout written independently
(tests/gptq_ref.py: plain Python integers from the format's description)."""

import pytest
import torch

import gptq_ref
from util import ops

BITS = (2, 3, 4, 8)


def _codes(gen, shape, bits):
    return torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n, m", [(64, 5), (96, 3), (40, 2), (33, 4), (1, 1)])
def test_pack_matches_the_documented_stream_word_for_word(gen, bits, n, m):
    V = _codes(gen, (n, m), bits)
    P = ops().pack_bits(V, bits, 0)
    assert P.dtype == torch.int32 and P.shape == (gptq_ref.words_for(n, bits), m)
    for c in range(m):
        column = [int(v) for v in V[:, c]]
        assert P[:, c].tolist() == gptq_ref.pack_stream(column, bits), f"column {c}"
        assert gptq_ref.unpack_stream(P[:, c].tolist(), bits, n) == column
    # Along dim 1 (qzeros) the same stream runs along each row.
    Pz = ops().pack_bits(V.t(), bits, 1)
    assert torch.equal(Pz, P.t())
    assert torch.equal(ops().unpack_bits(P, bits, 0, n), V)
    assert torch.equal(ops().unpack_bits(Pz, bits, 1, n), V.t())


def test_pack_factor_and_padding(gen):
    # 2/4/8 bits: 32/bits values a word; a count that does not fill the last word leaves its
    # high bits zero (the readers' ceil rule).
    for bits in (2, 4, 8):
        V = torch.full((32 // bits + 1, 1), 2**bits - 1, dtype=torch.uint8)
        P = ops().pack_bits(V, bits, 0)
        assert P.shape == (2, 1)
        assert P[0, 0].item() == -1  # every bit set
        assert P[1, 0].item() == 2**bits - 1  # one value, the rest zero


def test_three_bit_values_straddle_words_as_documented(gen):
    V = _codes(gen, (64, 6), 3)
    P = ops().pack_bits(V, 3, 0)
    assert P.shape == (6, 6)  # 32 inputs in 3 words
    for c in range(6):
        for blk in range(2):
            w = P[3 * blk : 3 * blk + 3, c].tolist()
            assert gptq_ref.unpack_3bit_block(*w) == V[32 * blk : 32 * blk + 32, c].tolist()
    # Value 10 = 0b111 alone sets bits 30, 31 of word 0 and bit 0 of word 1; value 21 sets
    # bit 31 of word 1 and bits 0, 1 of word 2.
    for i, expect in ((10, [-(2**31) + 2**30, 1, 0]), (21, [0, -(2**31), 3])):
        one = torch.zeros(32, 1, dtype=torch.uint8)
        one[i] = 7
        assert ops().pack_bits(one, 3, 0)[:, 0].tolist() == expect


def test_pack_errors_name_the_op_and_the_fix():
    with pytest.raises(RuntimeError, match=r"pack_bits: values must lie in 0..15 .* gptq_v2"):
        ops().pack_bits(torch.tensor([[16]]), 4, 0)
    with pytest.raises(RuntimeError, match=r"pack_bits: values must lie in 0..7"):
        ops().pack_bits(torch.tensor([[-1]]), 3, 0)
    with pytest.raises(RuntimeError, match=r"bits must be 2, 3, 4 or 8"):
        ops().pack_bits(torch.zeros(4, 4, dtype=torch.uint8), 5, 0)
    with pytest.raises(RuntimeError, match=r"dim must be 0"):
        ops().pack_bits(torch.zeros(4, 4, dtype=torch.uint8), 4, 2)
    with pytest.raises(RuntimeError, match=r"integer tensor"):
        ops().pack_bits(torch.zeros(4, 4), 4, 0)
    with pytest.raises(RuntimeError, match=r"unpack_bits: 40 values of 3 bits take 4 words"):
        ops().unpack_bits(torch.zeros(3, 2, dtype=torch.int32), 3, 0, 40)
    with pytest.raises(RuntimeError, match=r"2-D int32"):
        ops().unpack_bits(torch.zeros(3, 2, dtype=torch.int64), 3, 0, 32)


def _rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


def _layer(gen, bits, d, d_out, group_size, act_order, v1=True):
    """Random codes, zero points, scales and g_idx, packed with our ops, and the reference W."""
    G = 1 if group_size == -1 else -(-d // group_size)
    gsz = d if group_size == -1 else group_size
    codes = _codes(gen, (d_out, d), bits)
    zeros = torch.randint(1 if v1 else 0, 2**bits, (G, d_out), generator=gen)
    scales = torch.rand(G, d_out, generator=gen, dtype=torch.float64).add(0.01).to(torch.float32)
    order = torch.randperm(d, generator=gen) if act_order else torch.arange(d)
    g_idx = (order // gsz).to(torch.int32)
    qweight = ops().pack_bits(codes.t(), bits, 0)
    qzeros = ops().pack_bits(zeros - (1 if v1 else 0), bits, 1)
    W = gptq_ref.dequantize(qweight.tolist(), qzeros.tolist(), scales.double().tolist(), g_idx.tolist(), bits, v1)
    return qweight, qzeros, scales, g_idx, torch.tensor(W, dtype=torch.float64)


CASES = [  # d, d_out, group_size, act_order
    (128, 64, 32, False),
    (96, 70, 32, True),   # act-order: g_idx not monotonic; d_out not a multiple of the tiles
    (100, 40, 48, False),  # d not a multiple of 32 (partial pack block), shorter last group
    (64, 300, -1, False),  # one group; several output tiles with a partial one
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d, d_out, group_size, act_order", CASES)
def test_qmatmul_equals_the_documented_dequantization(gen, bits, d, d_out, group_size, act_order):
    qweight, qzeros, scales, g_idx, W = _layer(gen, bits, d, d_out, group_size, act_order)
    bias = torch.randn(d_out, generator=gen)
    # 1 row (decode), 3 rows (threads split the blocks), 10 rows (threads split the outputs),
    # 40 rows (dequantized strips through the BLAS GEMM).
    for shape in ((1, d), (3, d), (2, 5, d), (4, 10, d)):
        x = torch.randn(*shape, generator=gen)
        y = ops().qmatmul(x, qweight, qzeros, scales, g_idx, bits, 1, bias)
        assert y.shape == shape[:-1] + (d_out,) and y.dtype == torch.float32
        err = _rel_err(y, x.double() @ W.t() + bias.double())
        assert err < 1e-5, f"bits={bits} shape={shape}: error {err:.2e} of the output scale"


def test_qmatmul_v2_zero_points_half_precision_and_no_bias(gen):
    qweight, qzeros, scales, g_idx, W = _layer(gen, 4, 64, 48, 32, False, v1=False)
    x = torch.randn(4, 64, generator=gen)
    y = ops().qmatmul(x, qweight, qzeros, scales, g_idx, 4, 0, None)
    assert _rel_err(y, x.double() @ W.t()) < 1e-5
    for dtype in (torch.float16, torch.bfloat16):
        yh = ops().qmatmul(x.to(dtype), qweight, qzeros, scales.to(dtype), g_idx, 4, 0, None)
        assert yh.dtype == dtype
        assert _rel_err(yh, x.double() @ W.t()) < 0.02  # inputs and scales rounded to 8-11 bits


def test_qmatmul_checks_its_inputs(gen):
    qweight, qzeros, scales, g_idx, _ = _layer(gen, 4, 64, 48, 32, False)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"qweight must be int32 of shape \(8, 48\)"):
        ops().qmatmul(x, qweight[:4], qzeros, scales, g_idx, 4, 1, None)
    with pytest.raises(RuntimeError, match=r"qweight must be int32 of shape \(6, 48\)"):
        ops().qmatmul(x, qweight, qzeros, scales, g_idx, 3, 1, None)  # bits disagree with the words
    with pytest.raises(RuntimeError, match=r"qzeros must be int32"):
        ops().qmatmul(x, qweight, qzeros.long(), scales, g_idx, 4, 1, None)
    bad = g_idx.clone()
    bad[3] = 2
    with pytest.raises(RuntimeError, match=r"g_idx must hold group indices in 0..1"):
        ops().qmatmul(x, qweight, qzeros, scales, bad, 4, 1, None)
    with pytest.raises(RuntimeError, match=r"zero_offset must be 1"):
        ops().qmatmul(x, qweight, qzeros, scales, g_idx, 4, 2, None)
    with pytest.raises(RuntimeError, match=r"bias must be a float vector of length out_features = 48"):
        ops().qmatmul(x, qweight, qzeros, scales, g_idx, 4, 1, torch.zeros(47))


def test_quant_linear_pack_roundtrip_and_torch_compile(gen):
    from lrgptq import QuantLinear

    d, d_out, bits = 96, 40, 3
    codes = _codes(gen, (d_out, d), bits)
    zeros = torch.randint(1, 8, (3, d_out), generator=gen).float()
    scales = torch.rand(3, d_out, generator=gen) + 0.1
    g_idx = (torch.randperm(d, generator=gen) // 32).to(torch.int32)
    bias = torch.randn(d_out, generator=gen)
    m = QuantLinear.pack(codes, scales, zeros, g_idx, bits, 32, bias, "gptq", torch.float32)
    assert torch.equal(m.codes(), codes) and torch.equal(m.zeros(), zeros.int())
    W = scales[g_idx.long()].t() * (codes.float() - zeros[g_idx.long()].t())
    assert torch.equal(m.dequantize(), W)
    x = torch.randn(2, 7, d, generator=gen)
    eager = m(x)
    assert torch.allclose(eager, x @ W.t() + bias, rtol=1e-5, atol=1e-5)
    # The op has a Meta kernel, so torch.compile traces QuantLinear without a graph break.
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)
    meta = ops().qmatmul(x.to("meta"), m.qweight.to("meta"), m.qzeros.to("meta"), m.scales.to("meta"),
                         m.g_idx.to("meta"), bits, 1, None)
    assert meta.shape == (2, 7, d_out)
    with pytest.raises(ValueError, match=r"zero points are 0, which checkpoint_format 'gptq' stores as z − 1"):
        QuantLinear.pack(codes, scales, zeros * 0, g_idx, bits, 32, None, "gptq")
