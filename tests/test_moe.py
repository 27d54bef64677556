"""Fused 3-D MoE experts (transformers 5): every expert quantized as its own layer from the tokens
routed to it, in GPTQ's order inside the block, starved experts handled and reported, per-expert
checkpoints that load back and run with the quantized matmul, clear errors for unknown layouts."""

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq import moe, pipeline  # noqa: E402
from lrgptq.calib import calibration_batches  # noqa: E402
from lrgptq.capture import input_hooks  # noqa: E402
from lrgptq.models import find_blocks, find_linears  # noqa: E402

from tiny_models import MOE_ARCHS, VOCAB, output_of, starve  # noqa: E402

CFG = dict(bits=4, group_size=32)
ACT = dict(route="cholesky", accumulator="gram", order="act")
E = 8  # experts per MoE layer in the tiny models


def build(arch, seed=0):
    torch.manual_seed(seed)
    return MOE_ARCHS[arch]().eval()


def ids_for(gen, n=4, length=32):
    return torch.randint(0, VOCAB, (n, length), generator=gen)


def quantize(model, ids, skip=(), comm=None, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(**{**CFG, **cfg}), skip=skip, progress=False,
                                     comm=comm)


def expert_weight(model, name):
    """The (out, in) matrix of the per-expert layer ``name`` inside the fused parameters."""
    with moe.unfused(model):
        return model.get_submodule(name).weight.detach().clone()


@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_every_expert_is_quantized_and_the_checkpoint_round_trips(tmp_path, gen, arch):
    model = build(arch)
    ids = ids_for(gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}
    report = quantize(model, ids)
    names = set(report.results)
    for i, layer in enumerate(model.model.layers):
        for e in range(E):
            for role in moe.ROLES:
                assert f"model.layers.{i}.mlp.experts.{e}.{role}" in names
    # every 3-D parameter now holds quantized weights (no expert left in full precision)
    for n, p in model.named_parameters():
        if p.dim() == 3:
            assert not torch.equal(p, before[n]), n
    assert "model.layers.0.mlp.shared_expert_gate" not in names  # a scalar gate stays in full precision
    rows = {r["name"]: r for r in report.layers}
    table = report.table()
    for name in names:
        assert name in table and rows[name]["tokens"] >= 0
    saved = lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / saved.files[0]), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.qweight" in keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj", "_proj_bias")) for k in keys)
    loaded = lrgptq.load(tmp_path / "ckpt")
    ex = loaded.model.layers[0].mlp.experts
    assert isinstance(ex, moe.ExpertList) and isinstance(ex[3].up_proj, lrgptq.QuantLinear)
    for name in names:
        if ".experts." in name:
            assert torch.equal(loaded.get_submodule(name).dequantize(), expert_weight(model, name)), name
    ref, out = output_of(model, ids), output_of(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), f"{arch}: logits moved"


def test_captured_inputs_are_the_routed_tokens(gen):
    model = build("qwen3_moe")
    ids = ids_for(gen, 2, 16)
    block = model.model.layers[0]
    seen = {}
    handle = block.mlp.experts.register_forward_pre_hook(
        lambda m, args: seen.update(h=args[0].detach().clone(), idx=args[1].clone()))
    ref_out = block.mlp.experts
    caught = {}
    with torch.no_grad():
        model(ids)
    handle.remove()
    with moe.unfused(block) as views:
        linears = find_linears(block)
        with input_hooks(linears, lambda n, X: caught.setdefault(n, []).append(X.clone())), torch.no_grad():
            model(ids)
        view = views["mlp.experts"]
        w = torch.rand(seen["idx"].shape, generator=gen)
        out_view = view(seen["h"], seen["idx"], w)
    out_fused = ref_out(seen["h"], seen["idx"], w)
    torch.testing.assert_close(out_view, out_fused)
    for e in range(E):
        # the reference loop: the tokens whose k-th choice is e, for k = 1, 2, ...
        routed = torch.cat([seen["h"][seen["idx"][:, k] == e] for k in range(seen["idx"].shape[1])])
        got = caught.get(f"mlp.experts.{e}.gate_proj")
        if routed.shape[0] == 0:
            assert got is None
            continue
        torch.testing.assert_close(got[0], routed, rtol=0, atol=0)
        torch.testing.assert_close(caught[f"mlp.experts.{e}.up_proj"][0], routed, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # act(gate)·up; gpt-oss's clamped GLU with biases
def test_down_proj_inputs_come_from_the_quantized_gate_and_up(gen, monkeypatch, arch):
    model = build(arch)
    ids = ids_for(gen)
    seen = {}
    real = pipeline.accumulate

    def spy(acc, X, layer):
        seen.setdefault(layer, []).append(X.clone())
        real(acc, X, layer)

    monkeypatch.setattr(pipeline, "accumulate", spy)
    report = quantize(model, ids, **ACT)
    checked = 0
    with moe.unfused(model):  # the experts as modules over the (now quantized) fused weights
        for e in range(E):
            p = f"model.layers.0.mlp.experts.{e}"
            if f"{p}.gate_proj" not in seen:
                continue
            assert f"{p}.up_proj" not in seen  # gate and up share one capture (one factor)
            X = torch.cat(seen[f"{p}.gate_proj"])
            expert = model.get_submodule(p)
            want = expert.combine(expert.gate_proj(X), expert.up_proj(X))  # with the quantized gate and up
            torch.testing.assert_close(torch.cat(seen[f"{p}.down_proj"]), want)
            assert report.results[f"{p}.up_proj"].perm.equal(report.results[f"{p}.gate_proj"].perm)
            checked += 1
    assert checked >= E - 1
    order = list(dict.fromkeys(n for n in seen if n.startswith("model.layers.0.mlp.experts.")))
    first_down = min(i for i, n in enumerate(order) if n.endswith("down_proj"))
    assert all(n.endswith("gate_proj") for n in order[:first_down])  # every gate/up before any down


@pytest.mark.parametrize("route", [dict(), ACT])
def test_starved_experts_are_rounded_warned_and_reported_without_nan(gen, route):
    model = starve(build("qwen3_moe"))
    ids = ids_for(gen)
    with pytest.warns(UserWarning, match=r"no calibration tokens.*experts\.6\.gate_proj") as rec:
        report = lrgptq.quantize_model(model, ids, lrgptq.QuantConfig(**CFG, **route), progress=False)
    starved_warnings = [w for w in rec if "no calibration tokens" in str(w.message)]
    assert len(starved_warnings) == 1
    rows = {r["name"]: r for r in report.layers}
    for i in range(2):
        for dead in (6, 7):
            for role in moe.ROLES:
                r = rows[f"model.layers.{i}.mlp.experts.{dead}.{role}"]
                assert r["tokens"] == 0 and r["route"] == "rtn" and "rounded to nearest" in r["note"]
        few = rows[f"model.layers.{i}.mlp.experts.5.gate_proj"]
        assert few["tokens"] == 3 * len(calibration_batches(ids)) and few["tokens"] < few["d"]  # 3 per batch
        assert "damped" in few["note"] or "truncated" in few["note"]
        assert rows[f"model.layers.{i}.mlp.experts.5.down_proj"]["tokens"] == few["tokens"]
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())
    for res in report.results.values():
        assert bool(torch.isfinite(res.scales).all())
    # an RTN expert holds exactly the round-to-nearest weights of its grid
    rtn_model = build("qwen3_moe")
    rtn = quantize(rtn_model, ids, route="rtn")
    name = "model.layers.1.mlp.experts.6.down_proj"
    assert torch.equal(report.results[name].codes, rtn.results[name].codes)
    assert torch.isfinite(output_of(model, ids)).all()


def test_unknown_expert_layout_is_a_clear_error(gen):
    model = build("qwen3_moe")
    mystery = nn.Module()
    mystery.w = nn.Parameter(torch.randn(4, 8, 8))  # 3-D, in no layout lrgptq knows (and never run)
    model.model.layers[1].mlp.mystery = mystery
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"mlp\.mystery \(Module\).*w \(4, 8, 8\).*layout lrgptq does not know"
                                         r".*skip=\['mystery'\]"):
        quantize(model, ids_for(gen))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a failed run"
    report = quantize(model, ids_for(gen), skip=["mystery"])  # the way out the message names
    assert "model.layers.1.mlp.experts.0.gate_proj" in report.results
    assert torch.equal(mystery.w, before["model.layers.1.mlp.mystery.w"])


def test_sequential_subsets_put_every_gate_up_before_any_down(gen):
    model = build("qwen2_moe")
    ids = ids_for(gen, 2, 16)
    _, blocks = find_blocks(model)
    inputs = []
    h = blocks[0].register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    with moe.unfused(blocks[0]) as views:
        subsets = pipeline.sequential_subsets(blocks[0], find_linears(blocks[0]), inputs[0], views)
    flat = [[tuple(g) for g in s] for s in subsets]
    gate_up = [s for s in flat if any("experts.0.gate_proj" in n for g in s for n in g)]
    down = [s for s in flat if any("experts.0.down_proj" in n for g in s for n in g)]
    assert len(gate_up) == 1 and len(down) == 1
    assert flat.index(gate_up[0]) < flat.index(down[0])
    assert set(gate_up[0]) == {(f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj") for e in range(E)}
    assert set(down[0]) == {(f"mlp.experts.{e}.down_proj",) for e in range(E)}
    assert [("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")] in flat  # the dense shared expert


def test_streamed_moe_checkpoint_equals_the_in_memory_one(tmp_path, gen):
    from lrgptq import streaming

    from safetensors.torch import save_file

    model = build("qwen2_moe")
    # The fused parameters as the model holds them (save_pretrained writes transformers' per-expert
    # checkpoint names, which the streamed loader does not fuse back yet: docs/moe.md).
    (tmp_path / "src").mkdir()
    model.config.save_pretrained(tmp_path / "src")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
             not model.config.tie_word_embeddings}
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    ids = ids_for(gen)
    qc = lrgptq.QuantConfig(**CFG, **ACT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = streaming.quantize_streamed(tmp_path / "src", ids, tmp_path / "streamed", qc, dtype=torch.float32,
                                               progress=False)
    ref = quantize(model, ids, **ACT)
    lrgptq.save(model, ref, tmp_path / "ref", dtype=torch.float32)
    assert [r["name"] for r in streamed.layers] == [r["name"] for r in ref.layers]
    a, b = lrgptq.load(tmp_path / "streamed"), lrgptq.load(tmp_path / "ref")
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and "model.layers.1.mlp.experts.7.down_proj.qweight" in sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_an_expert_left_out_with_skip_round_trips_in_full_precision(tmp_path, gen):
    model = build("olmoe")
    ids = ids_for(gen)
    kept = expert_weight(model, "model.layers.0.mlp.experts.3.up_proj")
    report = quantize(model, ids, skip=["experts.3."])  # expert 3 of every MoE layer
    assert not any(".experts.3." in n for n in report.results)
    assert "model.layers.1.mlp.experts.2.up_proj" in report.results
    assert torch.equal(expert_weight(model, "model.layers.0.mlp.experts.3.up_proj"), kept)
    lrgptq.save(model, report, tmp_path / "ckpt", dtype=torch.float32)
    loaded = lrgptq.load(tmp_path / "ckpt")
    ex = loaded.model.layers[0].mlp.experts
    assert type(ex[3].up_proj) is nn.Linear and torch.equal(ex[3].up_proj.weight, kept)
    assert isinstance(ex[2].up_proj, lrgptq.QuantLinear)
    ref, out = output_of(model, ids), output_of(loaded, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_checkpoint_missing_an_experts_tensors_is_refused_naming_them(tmp_path, gen):
    from safetensors.torch import load_file, save_file

    model = build("qwen3_moe")
    report = quantize(model, ids_for(gen))
    lrgptq.save(model, report, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if ".experts.4.up_proj." not in k}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.mlp\.experts\.4\.up_proj\.weight is missing"):
        lrgptq.load(tmp_path / "ckpt")
    tensors = load_file(str(path))
    key = "model.layers.0.mlp.experts.2.down_proj.qweight"
    tensors[key] = tensors[key][:1]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"down_proj\.qweight is torch\.int32 \(1, 64\).*needs torch\.int32 \(4, 64\)"):
        lrgptq.load(tmp_path / "ckpt")


def test_experts_with_the_right_shapes_but_another_forward_are_refused(gen):
    model = build("qwen3_moe")
    experts = model.model.layers[1].mlp.experts

    def up_first(hidden_states, top_k_index, top_k_weights):  # reads the up rows as the gate's
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                up, gate = nn.functional.linear(hidden_states[t], experts.gate_up_proj[e]).chunk(2)
                out[t] += top_k_weights[t, k] * nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        return out

    experts.forward = up_first
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"mlp\.experts \(Qwen3MoeExperts\).*computes something else.*skip="):
        quantize(model, ids_for(gen))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a failed run"
    assert experts.forward is up_first and model.model.layers[1].mlp.experts is experts  # put back


def _gloo_worker(rank: int, world: int, port: int, ids: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from lrgptq.distributed import Distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = starve(build("qwen3_moe"))
        report = quantize(model, ids, comm=Distributed(), **ACT)
        if rank == 0:
            torch.save({n: (r.codes, r.scales, r.zeros, r.report["tokens"]) for n, r in report.results.items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_gloo_processes_quantize_the_experts_as_one(tmp_path, gen):
    # Each rank routes its own batches: the experts' accumulators (3 tokens per batch for expert 5,
    # none for 6 and 7) are merged before the factor, so every expert's token count and codes are
    # those of one process that saw every batch.
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    ids = ids_for(gen, 5, 24)  # 5 windows: window 0 alone, the rest grouped; a batch per rank
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_gloo_worker, args=(2, _free_port(), ids, out), nprocs=2, join=True)
    got = torch.load(out)
    ref = quantize(starve(build("qwen3_moe")), ids, **ACT)
    assert sorted(got) == sorted(ref.results)
    for name, res in ref.results.items():
        codes, scales, zeros, tokens = got[name]
        assert tokens == res.report["tokens"], name
        assert torch.equal(codes, res.codes) and torch.equal(scales, res.scales) and torch.equal(zeros, res.zeros), name
    n_batches = len(calibration_batches(ids))  # windows are grouped into batches; the router starves per batch
    assert n_batches >= 2
    assert ref.results["model.layers.0.mlp.experts.5.gate_proj"].report["tokens"] == 3 * n_batches
