"""The result protocol (lrgptq.results): every method's result splits into row pieces on its
row_unit and concatenates back to the whole layer's result, report included, in one process;
a split off a GPTVQ row-group boundary does not (the unit is what makes the split exact)."""

import pytest
import torch

import lrgptq
from lrgptq.results import LayerResult, concat_rows, row_split

SCALAR = dict(route="cholesky", accumulator="gram", order="act", group_size=16, bits=3)
LDLQ = dict(group_size=16, bits=3, ldlq_dim=2)
VQ = dict(vq_dim=2, bits=2, vq_group_cols=16, vq_group_rows=8)


def _layer(gen, d_out, d, n=96):
    W = torch.randn(d_out, d, generator=gen)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[:, 3] = 0  # a dead feature
    X[:, 5] *= 1e3  # an outlier feature
    return W, X


def _same(a: LayerResult, b: LayerResult) -> None:
    assert a.shape == b.shape and torch.equal(a.perm, b.perm) and a.rank == b.rank
    ta, tb = a.row_tensors(), b.row_tensors()
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k][1] == tb[k][1], k
        if k == "row_slack":  # loss over Babai's bound, a sum over columns whose order varies with the rows
            torch.testing.assert_close(ta[k][0], tb[k][0], rtol=1e-12, atol=0, msg=k)
        else:
            assert torch.equal(ta[k][0], tb[k][0]), k
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    for k in ("loss", "clip_rate", "babai_slack_median", "babai_slack_max", "bpw", "em_objective"):
        assert (k in a.report) == (k in b.report), k
        if k in a.report:
            assert a.report[k] == pytest.approx(b.report[k], rel=1e-12), k


def test_row_split_falls_on_unit_boundaries():
    assert row_split(37, 2, 1) == [0, 18, 37]
    assert row_split(37, 2, 8) == [0, 16, 37]
    assert row_split(37, 3, 8) == [0, 8, 24, 37]
    assert row_split(37, 2, 32) == [0, 32, 37]
    assert row_split(37, 2, 37) == []  # one group for two parts: not split
    assert row_split(1, 2, 1) == []
    for rows in range(1, 50):
        for unit in (1, 3, 8):
            for parts in (1, 2, 3, 5):
                b = row_split(rows, parts, unit)
                if b:
                    assert b[0] == 0 and b[-1] == rows and all(x < y for x, y in zip(b, b[1:]))
                    assert all(x % unit == 0 for x in b[:-1])
                else:
                    assert -(-rows // unit) < parts


@pytest.mark.parametrize("kind,cfg", [("scalar", SCALAR), ("ldlq", LDLQ), ("vq", VQ)])
@pytest.mark.parametrize("d_out,parts", [(37, 2), (64, 3), (16, 2)])
def test_row_pieces_concatenate_to_the_whole_layer(gen, kind, cfg, d_out, parts):
    qc = lrgptq.QuantConfig(**cfg)
    W, X = _layer(gen, d_out, 32)
    acc = lrgptq.linear.make_accumulator(qc, 32)
    acc.add(X)
    f = lrgptq.factorize(acc, qc)
    whole = lrgptq.quantize_linear(W, f, qc)
    assert isinstance(whole, LayerResult)
    assert whole.row_unit == lrgptq.linear.row_unit(qc, d_out)
    bounds = row_split(d_out, parts, whole.row_unit)
    assert bounds, "the shapes above are meant to split"
    pieces = [lrgptq.quantize_linear(W[a:b], f, qc) for a, b in zip(bounds, bounds[1:])]
    _same(concat_rows(pieces), whole)


def test_a_vq_split_off_a_row_group_boundary_is_not_exact(gen):
    qc = lrgptq.QuantConfig(**VQ)
    W, X = _layer(gen, 32, 32)
    f = lrgptq.factorize(lrgptq.linear._accumulate(X, qc, 32, "x"), qc)
    whole = lrgptq.quantize_linear(W, f, qc)
    pieces = [lrgptq.quantize_linear(W[a:b], f, qc) for a, b in ((0, 12), (12, 32))]  # 12: not a multiple of 8
    assert not torch.equal(torch.cat([p.weight for p in pieces]), whole.weight)


def test_quantize_shared_in_one_process_is_quantize_linear(gen):
    qc = lrgptq.QuantConfig(**VQ)
    W, X = _layer(gen, 24, 32)
    acc = lrgptq.linear.make_accumulator(qc, 32)
    acc.add(X)
    comm = lrgptq.distributed.Comm()
    f = lrgptq.linear.factorize_shared({"x": acc}, qc, comm)["x"]
    _same(lrgptq.linear.quantize_shared(W, f, qc, comm, "x"), lrgptq.quantize_linear(W, f, qc))
