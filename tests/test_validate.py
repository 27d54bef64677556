"""damp='auto' (python/lrgptq/validate.py, docs/design.md §13): the damping chosen per layer on
held-out calibration tokens.

Synthetic layers where the right answer is known: noise-free low-rank inputs (held-out tokens from
the same subspace, so the undamped truncated factor is best) against noisy inputs with fewer tokens
than inputs (damping or no feedback is best). The choice is checked against a float64 brute force
over every candidate, each quantized with all the tokens and scored on a large fresh sample of the
same distribution. Folds are checked to be deterministic and merge-invariant."""

import json

import pytest
import torch

import lrgptq
from lrgptq import validate
from lrgptq.accumulate import FOLDS, HELD_OUT_CHUNK, FoldedAccumulator, held_out_mask
from lrgptq.linear import make_accumulator
from util import rand_X, randn

AUTO = dict(damp="auto", bits=3, group_size=32)
METHODS = ("lrgptq", "gptq")


def _low_rank(gen, N, d, r=24):
    """Noise-free inputs in an r-dimensional subspace (a fixed basis: every sample shares it)."""
    basis = randn(gen, r, d) * torch.exp(0.5 * randn(gen, 1, d))
    return lambda n, g: randn(g, n, r) @ basis


def _noisy(gen, N, d):
    """Full-rank correlated inputs (what few tokens of a noisy source look like)."""
    mix = torch.eye(d, dtype=torch.float64) + 0.5 * randn(gen, d, d) / d**0.5
    scale = torch.exp(0.5 * randn(gen, d))
    return lambda n, g: (randn(g, n, d) @ mix) * scale


def _fresh_loss(W, Q, X):
    return float(torch.linalg.matrix_norm((W.double() - Q.double()) @ X.T).square())


def _brute_force(W, X, fresh, method):
    """Each candidate quantized with every token, scored on the fresh sample (float64)."""
    out = {}
    for c in validate.CANDIDATES:
        kw = dict(route="rtn", damp=0.01) if c == validate.RTN else dict(damp=float(c))
        cfg = lrgptq.QuantConfig.for_method(method, **{**AUTO, **kw})
        out[validate.label(c)] = _fresh_loss(W, lrgptq.quantize_linear(W, X, cfg).weight, fresh)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_the_choice_follows_the_inputs_and_is_the_best_on_fresh_tokens(gen, method):
    d, d_out = 256, 64
    W = randn(gen, d_out, d).float()
    chosen = {}
    for kind, make, N in (("low-rank", _low_rank, 1024), ("noisy", _noisy, 192)):
        draw = make(gen, N, d)
        X, fresh = draw(N, gen), draw(20000, gen)
        res = lrgptq.quantize_linear(W, X.float(), lrgptq.QuantConfig.for_method(method, **AUTO))
        best = _brute_force(W, X.float(), fresh, method)
        got = _fresh_loss(W, res.weight, fresh)
        chosen[kind] = res.report["damp_auto"]
        # Tolerance: the choice is made on 20 % of the tokens with 3/4 of the rest; 10 % on fresh tokens.
        assert got <= 1.10 * min(best.values()), (kind, method, chosen[kind], got, best, res.report["heldout_loss"])
    assert chosen["low-rank"] != chosen["noisy"], chosen
    if method == "lrgptq":
        assert chosen["low-rank"] in ("0", "0.001"), chosen  # the subspace is exact: no damping
    assert chosen["noisy"] in ("0.1", "1", "rtn"), chosen  # N < d: heavy damping or no feedback


@pytest.mark.parametrize("method", METHODS)
def test_with_fewer_tokens_than_inputs_auto_is_never_worse_than_rtn(gen, method):
    d, d_out = 256, 48
    for _ in range(3):
        W = randn(gen, d_out, d).float()
        draw = _noisy(gen, 160, d)
        X, fresh = draw(160, gen).float(), draw(20000, gen)
        auto = lrgptq.quantize_linear(W, X, lrgptq.QuantConfig.for_method(method, **AUTO))
        rtn = lrgptq.quantize_linear(W, X, lrgptq.QuantConfig.for_method("rtn", bits=3, group_size=32))
        got, base = _fresh_loss(W, auto.weight, fresh), _fresh_loss(W, rtn.weight, fresh)
        assert got <= base * (1 + 1e-9), (method, auto.report["damp_auto"], got, base)


def test_folds_are_contiguous_chunks_of_the_global_token_index():
    mask = held_out_mask(0, 7 * HELD_OUT_CHUNK * FOLDS)
    chunks = mask.view(-1, HELD_OUT_CHUNK)
    assert bool((chunks.all(1) | ~chunks.any(1)).all())  # whole chunks
    assert chunks.all(1).nonzero().flatten().tolist() == list(range(0, 7 * FOLDS, FOLDS))
    assert torch.equal(held_out_mask(1000, 300), mask[1000:1300])


@pytest.mark.parametrize("kind", ["qr", "gram"])
def test_folds_merge_exactly_whatever_the_batches_and_ranks(gen, kind):
    d, N = 40, 3 * HELD_OUT_CHUNK * FOLDS + 17
    X = rand_X(gen, N, d)
    mask = held_out_mask(0, N)

    def gram(acc):
        S = acc.state
        return S.T @ S if kind == "qr" else S

    one = FoldedAccumulator(kind, d)
    one.add(X)
    torch.testing.assert_close(gram(one.held_out), X[mask].T @ X[mask], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(gram(one.train), X[~mask].T @ X[~mask], rtol=1e-12, atol=1e-9)
    assert one.held_out.tokens == int(mask.sum()) and one.tokens == N
    torch.testing.assert_close(gram(one.merged()), X.T @ X, rtol=1e-12, atol=1e-9)
    cuts = sorted(torch.randint(1, N, (4,), generator=gen).tolist())
    bounds = [0, *cuts, N]
    ranks = [FoldedAccumulator(kind, d, token_offset=bounds[i]) for i in range(len(bounds) - 1)]
    for acc, lo, hi in zip(ranks, bounds, bounds[1:]):
        for piece in X[lo:hi].split(11):  # batches of 11 tokens inside each "rank"
            acc.add(piece.reshape(1, -1, d))
    merged = ranks[0]
    for acc in ranks[1:]:
        merged.merge(acc)
    for a, b in zip(merged.parts, one.parts):
        assert a.tokens == b.tokens
        torch.testing.assert_close(gram(a), gram(b), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", ["qr", "gram"])
def test_the_held_out_loss_is_the_error_on_the_held_out_tokens(gen, kind):
    # tr(E H_val Eᵀ) from R_val or H_val alone = ‖E X_valᵀ‖² on the held-out tokens themselves (float64).
    d, N = 48, 2 * HELD_OUT_CHUNK * FOLDS + 30
    X = rand_X(gen, N, d)
    folds = FoldedAccumulator(kind, d)
    for piece in X.split(37):
        folds.add(piece)
    W, Q = randn(gen, 9, d).float(), randn(gen, 9, d).float()
    want = _fresh_loss(W, Q, X[held_out_mask(0, N)])
    assert validate.held_out_loss(W, Q, folds.held_out) == pytest.approx(want, rel=1e-10)
    rows = lrgptq.ops.heldout_loss(W, Q, folds.held_out.state, source=kind)
    assert rows.dtype == torch.float64 and rows.shape == (9,)
    with pytest.raises(RuntimeError, match="source must be 'qr' or 'gram'"):
        lrgptq.ops.heldout_loss(W, Q, folds.held_out.state, source="sketch")
    with pytest.raises(RuntimeError, match="Q must have W's shape"):
        lrgptq.ops.heldout_loss(W, Q[:3], folds.held_out.state, source=kind)


def test_two_ranks_choose_as_one(gen):
    d, N = 96, 1100
    W = randn(gen, 40, d).float()
    X = rand_X(gen, N, d).float()
    cfg = lrgptq.QuantConfig(**AUTO)
    ref = lrgptq.quantize_linear(W, X, cfg)
    a = make_accumulator(cfg, d, token_offset=0)
    b = make_accumulator(cfg, d, token_offset=700)
    a.add(X[:300]).add(X[300:700])
    b.add(X[700:])
    res = lrgptq.quantize_linear(W, a.merge(b), cfg)
    assert res.report["damp_auto"] == ref.report["damp_auto"]
    for k, v in ref.report["heldout_loss"].items():
        assert res.report["heldout_loss"][k] == (None if v is None else pytest.approx(v, rel=1e-6)), k
    assert (res.codes != ref.codes).float().mean() < 1e-3


def test_report_fields_are_present_finite_and_json(gen):
    d = 64
    W = randn(gen, 200, d).float()  # more rows than are scored: a sample of SCORE_ROWS
    res = lrgptq.quantize_linear(W, rand_X(gen, 800, d).float(), lrgptq.QuantConfig(**AUTO))
    r = res.report
    assert set(r["heldout_loss"]) == {validate.label(c) for c in validate.CANDIDATES}
    scored = {k: v for k, v in r["heldout_loss"].items() if v is not None}  # the walk's visits
    assert {"0.01", "0.1", "rtn"} <= set(scored) and len(scored) >= 4, r["heldout_loss"]
    assert all(0 <= v < float("inf") for v in scored.values())
    assert r["heldout_loss_default"] == r["heldout_loss"]["0.01"]
    assert r["damp_auto"] == min(scored, key=scored.get)
    assert r["heldout_tokens"] + r["train_tokens"] == r["tokens"] == 800
    assert r["heldout_tokens"] == int(held_out_mask(0, 800).sum())
    json.dumps(r)  # streaming writes the rows into its manifest
    assert validate.score_rows(200).unique().numel() == validate.SCORE_ROWS


def test_the_walk_stops_where_the_full_ladder_has_its_minimum(gen):
    # The walk visits 2-4 of the 5 dampings; on these layers the loss is unimodal in log λ, so its
    # choice is the argmin of scoring every candidate.
    d = 96
    for N in (150, 400, 3000):
        W = randn(gen, 64, d).float()
        X = rand_X(gen, N, d).float()
        cfg = lrgptq.QuantConfig(**AUTO)
        res = lrgptq.quantize_linear(W, X, cfg)
        acc = make_accumulator(cfg, d)
        acc.add(X)
        search = validate.search(acc, cfg)
        rows = W[validate.score_rows(W.shape[0])]
        full = {validate.label(c): search.score(rows, c, "w") for c in validate.CANDIDATES}
        full = {k: v for k, v in full.items() if v is not None}
        assert res.report["damp_auto"] == min(full, key=full.get), (N, full, res.report["heldout_loss"])


def test_too_few_tokens_to_hold_out_falls_back_to_the_default(gen):
    W = randn(gen, 8, 32).float()
    res = lrgptq.quantize_linear(W, rand_X(gen, HELD_OUT_CHUNK, 32).float(), lrgptq.QuantConfig(**AUTO))
    assert res.report["damp_auto"] == "0.01" and "too few to validate" in res.report["note"]


@pytest.mark.parametrize("kw,match", [
    (dict(damp="Auto"), "damp must be a finite number >= 0 or 'auto'"),
    (dict(damp=-1.0), "damp must be a finite number >= 0 or 'auto'"),
    (dict(damp="auto", route="ql"), "route='ql'"),
    (dict(damp="auto", route="rtn"), "route='rtn'"),
    (dict(damp="auto", accumulator="sketch", sketch_size=16), "accumulator 'qr' or 'gram'"),
    (dict(damp="auto", vq_dim=2, bits=2), "vq_dim > 0"),
])
def test_bad_values_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lrgptq.QuantConfig(**kw)


def test_an_accumulator_without_folds_is_refused(gen):
    acc = lrgptq.Accumulator("qr", 16).add(rand_X(gen, 100, 16))
    with pytest.raises(ValueError, match="held-out tokens apart"):
        lrgptq.quantize_linear(randn(gen, 4, 16).float(), acc, lrgptq.QuantConfig(damp="auto"))


def test_the_cli_takes_auto(capsys):
    from lrgptq import cli

    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "m", "--calib", "c.txt", "--damp", "auto"])
    assert cli._config(args).damp == "auto"
    assert cli._config(parser.parse_args(["quantize", "m", "--calib", "c.txt", "--damp", "0.1"])).damp == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "m", "--calib", "c.txt", "--damp", "often"])
    assert "--damp" in capsys.readouterr().err


@pytest.mark.parametrize("method,kw", [
    ("gptq", {}), ("gptq", dict(order="act")), ("lrgptq", {}), ("lrgptq", dict(damp="auto")),
    ("gptq", dict(damp="auto")), ("lrgptq", dict(vq_dim=2, bits=2, vq_group_cols=16, vq_group_rows=8)),
    ("rtn", {}),
])
def test_every_route_warns_once_per_run_when_tokens_are_fewer_than_inputs(method, kw):
    from test_calib import _model, _warnings_of
    from tiny_models import VOCAB

    said = _warnings_of(lambda: lrgptq.quantize_model(_model(), torch.randint(0, VOCAB, (2, 16)),
                                                      lrgptq.QuantConfig.for_method(method, **kw), progress=False))
    few = [m for m in said if "N < d" in m]
    if method == "rtn":  # round to nearest reads no calibration token: N < d changes nothing
        assert few == [], said
    else:
        assert len(few) == 1 and "14 of 14 layers" in few[0], said


def test_streamed_auto_resumes_to_the_files_of_one_run_and_chooses_as_in_memory(tmp_path, gen):
    from test_streaming import assert_same_files, saved
    from tiny_models import VOCAB

    from lrgptq import streaming

    model, src = saved("llama", tmp_path, gen)
    ids = torch.randint(0, VOCAB, (4, 64), generator=gen)  # 256 tokens: 64 held out
    qc = lrgptq.QuantConfig(bits=3, group_size=32, damp="auto")

    def fault(i):
        if i == 0:
            raise KeyboardInterrupt("injected after block 0")

    kw = dict(dtype=torch.float32, progress=False)
    with pytest.raises(KeyboardInterrupt):
        streaming.quantize_streamed(src, ids, tmp_path / "out", qc, on_block=fault, **kw)
    resumed = streaming.quantize_streamed(src, ids, tmp_path / "out", qc, **kw)
    streaming.quantize_streamed(src, ids, tmp_path / "once", qc, **kw)
    assert_same_files(tmp_path / "out", tmp_path / "once")
    ref = lrgptq.quantize_model(model, ids, qc, progress=False)
    assert [(r["name"], r["damp_auto"]) for r in resumed.layers] == [(r["name"], r["damp_auto"]) for r in ref.layers]
    assert all(r["heldout_tokens"] == 64 for r in resumed.layers)


def test_an_auto_checkpoint_saves_and_loads_without_a_damp_percent(tmp_path, gen):
    from tiny_models import ARCHS, VOCAB, output_of

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = ARCHS["llama"]().eval()
    ids = torch.randint(0, VOCAB, (4, 64), generator=gen)
    cfg = lrgptq.QuantConfig.for_method("gptq", damp="auto", group_size=32)
    report = lrgptq.quantize_model(model, ids, cfg, progress=False)
    lrgptq.save(model, report, tmp_path / "q", dtype=torch.float32)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "damp_percent" not in qc and qc["meta"]["lrgptq"]["damp"] == "auto"  # no single value to give readers
    with torch.no_grad():
        torch.testing.assert_close(output_of(lrgptq.load(tmp_path / "q"), ids[:1]), output_of(model, ids[:1]),
                                   rtol=1e-4, atol=1e-4)
