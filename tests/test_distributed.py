"""Two processes (torch.distributed, gloo on CPU) quantize a tiny model and must agree with one
process: accumulators merge exactly up to the order of floating-point sums, and the codes,
scales and zeros (GPTVQ: codes and codebooks) come out identical."""

import socket

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402

CONFIGS = {
    "gram": dict(route="cholesky", accumulator="gram", order="act", group_size=32),
    "qr": dict(group_size=32),  # svdqr on the exact streaming QR, pivoted order
    "auto": dict(group_size=32, damp="auto"),  # held-out folds merged fold by fold; rank 0 chooses
    "sketch": dict(accumulator="sketch", sketch_size=48, group_size=32),
    # GPTVQ: a codebook per 8 rows, so the row split falls on a multiple of 8 (k_proj: 32 rows).
    "vq": dict(vq_dim=2, bits=2, vq_group_cols=16, vq_group_rows=8),
}
# Layers whose 37 rows do not split evenly: padded pieces, gathered in row order; for GPTVQ, one
# whose last row group is short, one split at 32 of 37, one not split (a single row group).
# Rank 0's accumulator sees every batch, the others none: merged, H + 0 = H exactly.
_VQ_GRAM = dict(CONFIGS["gram"], vq_dim=2, bits=2, vq_group_cols=16)
ODD = {"gram": CONFIGS["gram"], "vq8": dict(_VQ_GRAM, vq_group_rows=8), "vq32": dict(_VQ_GRAM, vq_group_rows=32),
       "vq_all": dict(_VQ_GRAM, vq_group_rows=-1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ARCHS["llama"]().eval()
    ids = torch.randint(0, VOCAB, (5, 24), generator=g)  # 5 batches: ranks get 2 and 3
    X = [torch.randn(7 + i, 40, generator=g, dtype=torch.float64) for i in range(5)]
    return model, ids, X


def _odd_weight(seed: int) -> torch.Tensor:
    return torch.randn(37, 40, generator=torch.Generator().manual_seed(seed + 1))


def _worker(rank: int, world: int, port: int, seed: int, out: str) -> None:
    import torch.distributed as dist

    from lrgptq.distributed import Distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        comm = Distributed()
        results = {}
        for kind, cfg in CONFIGS.items():
            model, ids, X = _inputs(seed)
            report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(**cfg), progress=False, comm=comm)
            results[kind] = {n: ({k: t for k, (t, _) in r.row_tensors().items()}, r.loss)
                             for n, r in report.results.items()}
            acc = lrgptq.linear.make_accumulator(lrgptq.QuantConfig(**cfg), 40, token_offset=0)
            lo, hi = len(X) * rank // world, len(X) * (rank + 1) // world  # the split of the batches
            acc.offset = sum(x.shape[0] for x in X[:lo])  # the global index of this rank's first token
            for x in X[lo:hi]:
                acc.add(x)
            results[kind]["_state"] = (comm.merge(acc).state.clone(), acc.tokens)
        for kind, cfg in ODD.items():
            qc = lrgptq.QuantConfig(**cfg)
            acc = lrgptq.linear.make_accumulator(qc, 40, token_offset=0)
            for x in X if rank == 0 else []:
                acc.add(x)
            factor = lrgptq.linear.factorize_shared(acc, qc, comm)
            res = lrgptq.linear.quantize_shared(_odd_weight(seed), factor, qc, comm, "odd")
            results[f"odd-{kind}"] = (res.row_tensors(), res.report)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_gloo_processes_match_one_process(tmp_path, gen):
    import torch.multiprocessing as mp

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), seed, out), nprocs=2, join=True)
    got = torch.load(out)
    for kind, cfg in CONFIGS.items():
        model, ids, X = _inputs(seed)
        report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(**cfg), progress=False)
        for name, res in report.results.items():
            tensors, loss = got[kind][name]
            assert torch.equal(tensors["codes"], res.codes), f"{kind} {name}: codes differ"
            grid = ("codebooks", "codebook_scales") if kind == "vq" else ("scales", "zeros")
            for key in grid:
                assert torch.equal(tensors[key], getattr(res, key)), f"{kind} {name}: {key} differ"
            assert abs(loss - res.loss) <= 1e-5 * max(res.loss, 1e-30), f"{kind} {name}"
        # The merged accumulator against one that saw every batch, in float64: the same up to the
        # order of the sums (H, Y) or of the Householder steps (R, up to row signs).
        acc = lrgptq.linear.make_accumulator(lrgptq.QuantConfig(**cfg), 40, token_offset=0)
        for x in X:
            acc.add(x)
        state, tokens = got[kind]["_state"]
        assert tokens == acc.tokens == sum(x.shape[0] for x in X)
        ref = acc.state
        if kind in ("qr", "auto"):
            state, ref = state.T @ state, ref.T @ ref  # RᵀR = H whatever the signs
        err = float((state - ref).abs().max() / ref.abs().max())
        assert err <= 1e-13, f"{kind}: merged state differs by {err:.2e} (relative)"
    for kind, cfg in ODD.items():
        qc = lrgptq.QuantConfig(**cfg)
        acc = lrgptq.linear.make_accumulator(qc, 40, token_offset=0)
        for x in _inputs(seed)[2]:
            acc.add(x)
        ref = lrgptq.quantize_linear(_odd_weight(seed), acc, qc)
        tensors, report = got[f"odd-{kind}"]
        want = ref.row_tensors()
        assert sorted(tensors) == sorted(want)
        for key, (t, dim) in want.items():  # codes, scales, zeros or codebooks, weight, row_loss, ...
            assert tensors[key][1] == dim, f"odd {kind}: {key}"
            if key == "row_slack":  # over Babai's bound, a column sum whose order varies with the rows
                torch.testing.assert_close(tensors[key][0], t, rtol=1e-12, atol=0)
            else:
                assert torch.equal(tensors[key][0], t), f"odd {kind}: {key} differ"
        for key in ("loss", "clip_rate", "babai_slack_max", "bpw"):
            if key in ref.report:
                assert report[key] == pytest.approx(ref.report[key], rel=1e-12), f"odd {kind}: report {key}"


STREAMED = {"gram": CONFIGS["gram"], "vq": CONFIGS["vq"]}


def _stream_worker(rank: int, world: int, port: int, src: str, ids: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from lrgptq.distributed import Distributed
    from lrgptq.streaming import quantize_streamed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for kind, cfg in STREAMED.items():
            quantize_streamed(src, ids, f"{out}/{kind}", lrgptq.QuantConfig(**cfg), dtype=torch.float32,
                              progress=False, comm=Distributed())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_gloo_processes_stream_the_same_checkpoint_as_one(tmp_path, gen):
    # The streamed path: rank 0 writes every file, every rank packs (the next block needs the
    # stored weights), the rows of each layer are split and gathered; GPTQ and GPTVQ.
    import torch.multiprocessing as mp
    from lrgptq.streaming import quantize_streamed
    from test_streaming import assert_same_files

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ARCHS["llama"]().eval().save_pretrained(tmp_path / "src")
    ids = torch.randint(0, VOCAB, (5, 24), generator=gen)
    mp.spawn(_stream_worker, args=(2, _free_port(), str(tmp_path / "src"), ids, str(tmp_path / "two")), nprocs=2,
             join=True)
    for kind, cfg in STREAMED.items():
        quantize_streamed(tmp_path / "src", ids, tmp_path / "one" / kind, lrgptq.QuantConfig(**cfg),
                          dtype=torch.float32, progress=False)
        assert_same_files(tmp_path / "two" / kind, tmp_path / "one" / kind)
