"""Streamed quantization (one block in memory at a time, from safetensors files on disk): the
same checkpoint as the in-memory pipeline, a resident size far below the model's, and a run
killed after block k that resumes to the very same files as an uninterrupted run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq import streaming  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402

GPTQ = dict(route="cholesky", accumulator="gram", order="identity")
VQ = dict(vq_dim=2, bits=2, vq_group_cols=16, vq_group_rows=8)  # GPTVQ, in the gptvq layout


def saved(arch, tmp_path, gen, dtype=torch.float32):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = ARCHS[arch]().eval()
    model.to(dtype).save_pretrained(tmp_path / "src")
    return model.float(), tmp_path / "src"


def files_of(path: Path) -> dict:
    """Every tensor and every JSON file of a checkpoint directory (not the run's manifest)."""
    out = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
        elif f.suffix == ".json" and f.name != streaming.MANIFEST:
            out[f.name] = json.loads(f.read_text())
    return out


def assert_same_files(a: Path, b: Path) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


@pytest.mark.parametrize("arch,cfg", [("llama", {}), ("gpt2", GPTQ), ("llama", VQ),  # gpt2: Conv1D, tied lm_head
                                      ("llama", {"damp": "auto", "mse": True})])  # the lrgptq preset's search
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, gen, arch, cfg):
    model, src = saved(arch, tmp_path, gen)
    ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
    qc = lrgptq.QuantConfig(**{"bits": 4, "group_size": 32, **cfg})
    report = streaming.quantize_streamed(src, ids, tmp_path / "streamed", qc, dtype=torch.float32, progress=False)
    ref = lrgptq.quantize_model(model, ids, qc, progress=False)
    lrgptq.save(model, ref, tmp_path / "ref", dtype=torch.float32)
    assert [r["name"] for r in report.layers] == [r["name"] for r in ref.layers]
    a, b = lrgptq.load(tmp_path / "streamed"), lrgptq.load(tmp_path / "ref")
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    cfg_a = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    cfg_b = json.loads((tmp_path / "ref" / "config.json").read_text())["quantization_config"]
    assert cfg_a == cfg_b


def test_a_zero_point_in_a_later_block_streams_as_save_writes(tmp_path, gen):
    # Block 1's up_proj has no negative weight, so its asymmetric grids have z = 0, which only
    # gptq_v2 stores; an asymmetric grid is written as gptq_v2 from block 0 on in any case
    # (docs/interop.md), so streaming and save agree with no rewrite and no warning.
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = ARCHS["llama"]().eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.abs_()
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
    qc = lrgptq.QuantConfig(bits=4, group_size=32)
    streaming.quantize_streamed(tmp_path / "src", ids, tmp_path / "out", qc, dtype=torch.float32, progress=False)
    manifest = json.loads((tmp_path / "out" / streaming.MANIFEST).read_text())
    assert "model.layers.1.mlp.up_proj" in manifest["blocks"]["1"]["zero_point_layers"]
    assert not manifest["blocks"]["0"]["zero_point_layers"]
    ref = lrgptq.quantize_model(model, ids, qc, progress=False)
    lrgptq.save(model, ref, tmp_path / "ref", dtype=torch.float32)
    a, b = lrgptq.load(tmp_path / "out"), lrgptq.load(tmp_path / "ref")
    assert a.model.layers[0].self_attn.q_proj.checkpoint_format == "gptq_v2"
    assert [e["checkpoint_format"] for e in manifest["blocks"].values()] == ["gptq_v2"] * len(manifest["blocks"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_fault_after_block_k_resumes_from_the_spilled_activations(tmp_path, gen):
    _, src = saved("llama", tmp_path, gen, torch.bfloat16)
    ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
    qc = lrgptq.QuantConfig(bits=3, group_size=32)

    def fault(i):
        if i == 0:
            raise KeyboardInterrupt("injected after block 0")

    with pytest.raises(KeyboardInterrupt):
        streaming.quantize_streamed(src, ids, tmp_path / "out", qc, spill=True, progress=False, on_block=fault)
    manifest = json.loads((tmp_path / "out" / streaming.MANIFEST).read_text())
    assert sorted(manifest["blocks"]) == ["0"] and not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(ValueError, match="not a quantized checkpoint|config.json"):
        lrgptq.load(tmp_path / "out")  # a partial run is not a loadable checkpoint
    seen = []
    streaming.quantize_streamed(src, ids, tmp_path / "out", qc, spill=True, progress=False, on_block=seen.append)
    assert seen == [1]  # block 0 was not quantized again
    streaming.quantize_streamed(src, ids, tmp_path / "once", qc, progress=False)
    assert_same_files(tmp_path / "out", tmp_path / "once")
    assert not list((tmp_path / "out").glob("activations-*"))


def test_a_killed_gptvq_run_resumes_to_the_same_files(tmp_path, gen):
    # Without a spill file the resumed run recomputes block 1's inputs from block 0's file, read
    # back through the gptvq layout.
    _, src = saved("llama", tmp_path, gen)
    ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
    qc = lrgptq.QuantConfig(**VQ)

    def fault(i):
        if i == 0:
            raise KeyboardInterrupt("injected after block 0")

    with pytest.raises(KeyboardInterrupt):
        streaming.quantize_streamed(src, ids, tmp_path / "out", qc, progress=False, on_block=fault)
    seen = []
    streaming.quantize_streamed(src, ids, tmp_path / "out", qc, progress=False, on_block=seen.append)
    assert seen == [1]
    streaming.quantize_streamed(src, ids, tmp_path / "once", qc, progress=False)
    assert_same_files(tmp_path / "out", tmp_path / "once")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptvq"


def test_cli_streams_a_gptvq_quantization(tmp_path, gen):
    from lrgptq import cli
    from test_cli import CALIB, char_tokenizer

    _, src = saved("llama", tmp_path, gen)
    char_tokenizer().save_pretrained(src)  # the CLI checks the model directory's tokenizer before loading
    (tmp_path / "calib.txt").write_text(CALIB)
    rc = cli.main(["quantize", str(src), "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
                   "--bits", "2", "--vq-dim", "2", "--vq-group-cols", "16", "--vq-group-rows", "8", "--stream",
                   "--save", str(tmp_path / "out")])
    assert rc == 0
    loaded = lrgptq.load(tmp_path / "out", dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, lrgptq.VQLinear)


def test_resuming_with_other_settings_is_refused(tmp_path, gen):
    _, src = saved("llama", tmp_path, gen)
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
    streaming.quantize_streamed(src, ids, tmp_path / "out", lrgptq.QuantConfig(group_size=32), progress=False)
    with pytest.raises(ValueError, match="another model, settings or calibration"):
        streaming.quantize_streamed(src, ids, tmp_path / "out", lrgptq.QuantConfig(group_size=16), progress=False)
    with pytest.raises(ValueError, match="another model, settings or calibration"):
        streaming.quantize_streamed(src, ids + 1, tmp_path / "out", lrgptq.QuantConfig(group_size=32),
                                    progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="lrgptq did not write it; refusing to write a streamed checkpoint there"):
        streaming.quantize_streamed(src, ids, tmp_path / "other", lrgptq.QuantConfig(group_size=32), progress=False)


# The run in a subprocess: its peak resident size (VmHWM) is measured above a baseline taken
# after a streamed run of a 1-block model of the same shapes (imports, thread pools, allocator
# arenas, the factor's workspace, one block), so what remains is what the model's depth costs.
# It exits abruptly (os._exit, no cleanup) after block KILL.
RUN = textwrap.dedent("""
    import os, sys, torch, transformers
    import lrgptq
    from lrgptq import streaming

    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    src, out, warm, kill = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = lrgptq.QuantConfig(route="cholesky", accumulator="gram", order="identity", group_size=64)
    one = transformers.AutoConfig.from_pretrained(src)
    one.num_hidden_layers = 1
    transformers.LlamaForCausalLM(one).to(torch.bfloat16).save_pretrained(warm + "/src")  # as the model: bf16
    streaming.quantize_streamed(warm + "/src", torch.randint(0, 256, (2, 32)), warm + "/out", cfg, progress=False)
    base = hwm()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))

    def on_block(i):
        if i == kill:
            print("GROWTH", hwm() - base, flush=True)
            os._exit(3)

    streaming.quantize_streamed(src, ids, out, cfg, progress=False, on_block=on_block)
    print("GROWTH", hwm() - base, flush=True)
""")


def run_streamed(script: Path, src: Path, out: Path, warm: Path, kill: int) -> tuple:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(script), str(src), str(out), str(warm), str(kill)],
                          capture_output=True, text=True, env=env, timeout=300)
    growth = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("GROWTH")]
    assert growth, proc.stderr[-3000:]
    return proc.returncode, growth[0]


@pytest.mark.slow  # minutes, and its resident-size cap is sensitive to a busy machine
def test_killed_streamed_run_resumes_to_the_same_checkpoint_under_a_memory_cap(tmp_path):
    import transformers

    # 48 blocks of 2.6 MB each (float32), 127 MB in all: the peak must not grow with the depth.
    # Measured above a 1-block model of the same shapes: 5-24 MB whatever the depth (killed after
    # block 1, 5, 11, 17 or 23 of 24), noise from run to run; 24 blocks (a 21 MB cap) failed
    # 2 runs in 5 on that noise, hence 48.
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=48,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    del model
    script = tmp_path / "run.py"
    script.write_text(RUN)
    rc, killed_growth = run_streamed(script, tmp_path / "src", tmp_path / "out", tmp_path / "w1", kill=23)
    assert rc == 3
    manifest = json.loads((tmp_path / "out" / streaming.MANIFEST).read_text())
    assert sorted(map(int, manifest["blocks"])) == list(range(24))
    rc, resumed_growth = run_streamed(script, tmp_path / "src", tmp_path / "out", tmp_path / "w2", kill=-1)
    assert rc == 0
    cap = model_bytes // 3  # the in-memory pipeline would need more than the whole model
    assert killed_growth < cap and resumed_growth < cap, (killed_growth, resumed_growth, model_bytes)
    cfg = lrgptq.QuantConfig(route="cholesky", accumulator="gram", order="identity", group_size=64)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    streaming.quantize_streamed(tmp_path / "src", ids, tmp_path / "once", cfg, progress=False)
    assert_same_files(tmp_path / "out", tmp_path / "once")
    loaded = lrgptq.load(tmp_path / "out", dtype=torch.float32)
    assert isinstance(loaded.model.layers[47].mlp.down_proj, lrgptq.QuantLinear)


@pytest.mark.filterwarnings("ignore:.*calibration tokens")
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_mapped_experts_stream_byte_identical_and_a_killed_run_resumes(tmp_path, gen, monkeypatch, layout):
    # Sources: transformers 5's save_pretrained (per-expert matrices) or the fused 3-D tensors
    # under the model's names, in bf16. expert_budget=0: every block's experts live in a shared
    # mapping of a scratch file, filled expert by expert; the checkpoint must equal the in-memory
    # run's byte for byte, also after a kill (the resumed run recomputes block 1's inputs through
    # mapped experts), and no scratch file may be left behind, even by the killed run.
    from safetensors.torch import save_file
    from tiny_models import MOE_ARCHS

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = MOE_ARCHS["qwen3_moe"]().eval().to(torch.bfloat16)
    src, out = tmp_path / "src", tmp_path / "out"
    if layout == "per_expert":
        model.save_pretrained(src)
    else:
        src.mkdir()
        model.config.save_pretrained(src)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
    qc = lrgptq.QuantConfig(bits=4, group_size=32, route="cholesky", accumulator="gram", order="act")
    loads = []
    real = streaming.load_experts
    monkeypatch.setattr(streaming, "load_experts",
                        lambda expert, key, shape, where, path=None: loads.append((key, path is not None))
                        or real(expert, key, shape, where, path))

    def fault(i):
        assert not (out / "experts-rank0").exists()  # the block's scratch went with it
        if i == 0:
            raise KeyboardInterrupt("injected after block 0")

    with pytest.raises(KeyboardInterrupt):
        streaming.quantize_streamed(src, ids, out, qc, dtype=torch.float32, expert_budget=0, progress=False,
                                    on_block=fault)
    assert not (out / "experts-rank0").exists()
    seen = []
    streaming.quantize_streamed(src, ids, out, qc, dtype=torch.float32, expert_budget=0, progress=False,
                                on_block=seen.append)
    assert seen == [1]
    fused = [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert sorted(loads) == sorted((k, True) for k in fused[:2] + fused)  # block 0 twice: run, then resume
    loads.clear()
    streaming.quantize_streamed(src, ids, tmp_path / "once", qc, dtype=torch.float32, expert_budget=10**12,
                                progress=False)
    assert loads and not any(mapped for _, mapped in loads)  # under the budget: held in memory
    assert_same_files(out, tmp_path / "once")
    ref = MOE_ARCHS["qwen3_moe"]().eval()  # float32 buffers (rotary), the bf16 weights upcast
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    lrgptq.save(ref, lrgptq.quantize_model(ref, ids, qc, progress=False), tmp_path / "ref", dtype=torch.float32)
    a, b = lrgptq.load(out).state_dict(), lrgptq.load(tmp_path / "ref").state_dict()
    assert sorted(a) == sorted(b) and "model.layers.1.mlp.experts.7.down_proj.qweight" in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    with pytest.raises(ValueError, match="expert_budget=-1"):
        streaming.quantize_streamed(src, ids, tmp_path / "bad", qc, expert_budget=-1, progress=False)


def test_budget_runs_split_a_subset_into_runs_that_fit():
    from lrgptq.pipeline import budget_runs

    linears = {n: torch.nn.Linear(d, 8) for n, d in (("a", 64), ("b", 64), ("c", 32), ("d", 64))}
    groups = [["a"], ["b"], ["c"], ["d"]]
    need = 2 * 8 * 64 * 64  # twice a gram accumulator at d = 64, float64
    cfg = lrgptq.QuantConfig(accumulator="gram")
    assert budget_runs(groups, linears, cfg, None) == [groups]
    assert budget_runs(groups, linears, cfg, 2 * need) == [[["a"], ["b"]], [["c"], ["d"]]]
    assert budget_runs(groups, linears, cfg, 0) == [[g] for g in groups]  # at least one group per run
    sketch = lrgptq.QuantConfig(accumulator="sketch", sketch_size=16)  # 16 x d states: all four fit
    assert budget_runs(groups, linears, sketch, 2 * 8 * 16 * 224) == [groups]
