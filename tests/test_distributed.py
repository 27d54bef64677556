"""Two processes (torch.distributed, gloo on CPU) quantize a tiny model and must agree with one
process: accumulators merge exactly up to the order of floating-point sums, and the codes,
scales and zeros come out identical."""

import socket

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402

CONFIGS = {
    "gram": dict(route="cholesky", accumulator="gram", order="act", group_size=32),
    "qr": dict(group_size=32),  # svdqr on the exact streaming QR, pivoted order
    "sketch": dict(accumulator="sketch", sketch_size=48, group_size=32),
}


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
            results[kind] = {n: (r.codes, r.scales, r.zeros, r.loss) for n, r in report.results.items()}
            acc = lrgptq.linear.make_accumulator(lrgptq.QuantConfig(**cfg), 40, token_offset=0)
            lo, hi = len(X) * rank // world, len(X) * (rank + 1) // world  # the split of the batches
            acc.offset = sum(x.shape[0] for x in X[:lo])  # the global index of this rank's first token
            for x in X[lo:hi]:
                acc.add(x)
            results[kind]["_state"] = (comm.merge(acc).state.clone(), acc.tokens)
        # A layer whose 37 rows do not split evenly: padded pieces, gathered in row order.
        qc = lrgptq.QuantConfig(**CONFIGS["gram"])
        acc = lrgptq.linear.make_accumulator(qc, 40, token_offset=0)
        for x in X:
            acc.add(x)
        res = comm.quantize(_odd_weight(seed), comm.factorize(acc, qc), qc, "odd")
        results["odd"] = (res.codes, res.scales, res.zeros, res.weight)
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
            codes, scales, zeros, loss = got[kind][name]
            assert torch.equal(codes, res.codes), f"{kind} {name}: codes differ"
            assert torch.equal(scales, res.scales) and torch.equal(zeros, res.zeros), f"{kind} {name}"
            assert abs(loss - res.loss) <= 1e-5 * max(res.loss, 1e-30), f"{kind} {name}"
        # The merged accumulator against one that saw every batch, in float64: the same up to the
        # order of the sums (H, Y) or of the Householder steps (R, up to row signs).
        acc = lrgptq.linear.make_accumulator(lrgptq.QuantConfig(**cfg), 40, token_offset=0)
        for x in X:
            acc.add(x)
        state, tokens = got[kind]["_state"]
        assert tokens == acc.tokens == sum(x.shape[0] for x in X)
        ref = acc.state
        if kind == "qr":
            state, ref = state.T @ state, ref.T @ ref  # RᵀR = H whatever the signs
        err = float((state - ref).abs().max() / ref.abs().max())
        assert err <= 1e-13, f"{kind}: merged state differs by {err:.2e} (relative)"
    qc = lrgptq.QuantConfig(**CONFIGS["gram"])
    acc = lrgptq.linear.make_accumulator(qc, 40, token_offset=0)
    for x in _inputs(seed)[2]:
        acc.add(x)
    ref = lrgptq.quantize_linear(_odd_weight(seed), acc, qc)
    for got_t, want in zip(got["odd"], (ref.codes, ref.scales, ref.zeros, ref.weight)):
        assert torch.equal(got_t, want)
