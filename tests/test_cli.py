"""The lrgptq command line, on a tiny model (its loader is swapped for one that needs no files)."""

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq import cli  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402


def char_tokenizer():
    """A real (saveable, AutoTokenizer-loadable) tokenizer: one token per printable character."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i): i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]")),
                                  unk_token="[UNK]")


CALIB = "It is a truth universally acknowledged, that a single man in possession. " * 40


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face model directory, with its tokenizer."""
    torch.manual_seed(0)
    root = tmp_path / "model"
    ARCHS["llama"]().eval().save_pretrained(root)
    char_tokenizer().save_pretrained(root)
    return root


@pytest.fixture
def calib_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(CALIB)
    return text


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = capsys.readouterr().out
    for option in ("--method", "--bits", "--group-size", "--order", "--accumulator", "--damp", "--truncation",
                   "--save", "--skip", "--calib"):
        assert option in out


def test_options_are_built_from_quantconfig_fields(capsys):
    """Every QuantConfig field is an option with its help text; an option not given takes QuantConfig's
    default (or the preset's), and one given reaches the config."""
    from dataclasses import fields

    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = capsys.readouterr().out
    for f in fields(lrgptq.QuantConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    parse = cli.build_parser().parse_args
    assert cli._config(parse(["quantize", "m", "--calib", "c"])) == lrgptq.QuantConfig.for_method("lrgptq")
    cfg = cli._config(parse(["quantize", "m", "--calib", "c", "--method", "gptq", "--bits", "3", "--sym",
                             "--damp", "0.05", "--order", "act", "--no-vq-codebook-int8", "--factor-dtype", "float32",
                             "--sketch-size", "64"]))
    assert cfg == lrgptq.QuantConfig.for_method("gptq", bits=3, sym=True, damp=0.05, order="act",
                                                vq_codebook_int8=False, factor_dtype=torch.float32, sketch_size=64)


def test_quantize_saves_a_checkpoint_that_loads(tmp_path, model_dir, calib_text, capsys):
    text = calib_text
    out_dir = tmp_path / "ckpt"
    rc = cli.main(["quantize", str(model_dir), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
                   "--eval-text", str(text), "--window", "64", "--bits", "4", "--group-size", "32",
                   "--save", str(out_dir), "--report", str(tmp_path / "report.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity (window 64)" in printed and "model.layers.1.mlp.down_proj" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["layers"]) == 14 and report["config"]["bits"] == 4
    loaded = lrgptq.load(str(out_dir), dtype=torch.float32)
    assert any(isinstance(m, lrgptq.QuantLinear) for m in loaded.modules())


def test_quantize_vq_saves_a_gptvq_checkpoint(tmp_path, model_dir, calib_text):
    text = calib_text
    out_dir = tmp_path / "ckpt"
    rc = cli.main(["quantize", str(model_dir), "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--method", "gptq",
                   "--bits", "2", "--vq-dim", "2", "--vq-group-cols", "16", "--vq-group-rows", "8",
                   "--save", str(out_dir), "--report", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["vq_dim"] == 2 and report["config"]["vq_group_cols"] == 16
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptvq"
    loaded = lrgptq.load(str(out_dir), dtype=torch.float32)
    assert any(type(m).__name__ == "VQLinear" for m in loaded.modules())


def test_bad_option_is_an_error_not_a_traceback(tmp_path, model_dir, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("short text " * 100)
    assert cli.main(["quantize", str(model_dir), "--calib", str(text), "--bits", "9", "--seqlen", "16"]) == 2
    assert "bits" in capsys.readouterr().err


def test_quantize_stream_writes_and_resumes_a_checkpoint(tmp_path, model_dir, calib_text, capsys):
    argv = ["quantize", str(model_dir), "--stream", "--calib", str(calib_text), "--nsamples", "4",
            "--seqlen", "32", "--group-size", "32", "--save", str(tmp_path / "ckpt")]
    assert cli.main(argv) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    loaded = lrgptq.load(str(tmp_path / "ckpt"), dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, lrgptq.QuantLinear)
    assert cli.main(argv) == 0  # a finished run: nothing left to quantize, the same checkpoint
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")  # a directory it may not write into
    assert cli.main(argv[:-1] + [str(tmp_path / "other")]) == 2
    assert "refusing" in capsys.readouterr().err


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the CLI loads a model (a pre-check must refuse first)."""
    def load(*_a, **_k):
        pytest.fail("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_model", load)


@pytest.mark.parametrize("save", ["model", "model/quantized"])
@pytest.mark.parametrize("stream", [False, True])
def test_save_into_the_model_directory_is_refused_before_loading(tmp_path, model_dir, calib_text, capsys,
                                                                 no_model_load, save, stream):
    before = _snapshot(model_dir)
    argv = ["quantize", str(model_dir), "--calib", str(calib_text), "--save", str(tmp_path / save)]
    assert cli.main(argv + (["--stream"] if stream else [])) == 2
    err = capsys.readouterr().err
    assert re.search(r"is (the|inside the) model directory .*; refusing to write the checkpoint there", err), err
    assert _snapshot(model_dir) == before


def _setup(tmp_path, model_dir, calib_text):
    """Files the pre-check cases point at."""
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("Elle était là. ".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("x")
    (tmp_path / "no-tok").mkdir()
    (tmp_path / "no-tok" / "config.json").write_text((model_dir / "config.json").read_text())
    return {"MODEL": str(model_dir), "CALIB": str(calib_text), "TMP": str(tmp_path)}


QUANTIZE_CASES = {  # extra arguments -> what the error line must say
    "missing calib": (["--calib", "TMP/nope.txt"], r"--calib \S*nope\.txt: cannot read it"),
    "empty calib": (["--calib", "TMP/empty.txt"], r"--calib \S*empty\.txt: the file is empty"),
    "latin-1 calib": (["--calib", "TMP/latin1.txt"], r"--calib \S*latin1\.txt: not UTF-8 text \(byte 5 is 0xe9\)"),
    "calib shorter than a window": (["--calib", "TMP/short.txt"],
                                    r"--calib \S*short\.txt: the text has 10 tokens: too few for windows of 32"),
    "missing eval text": (["--eval-text", "TMP/nope.txt"], r"--eval-text \S*nope\.txt: cannot read it"),
    "empty eval text": (["--eval-text", "TMP/empty.txt"], r"--eval-text \S*empty\.txt: the file is empty"),
    "latin-1 eval text": (["--eval-text", "TMP/latin1.txt"], r"--eval-text \S*latin1\.txt: not UTF-8"),
    "eval text shorter than a window": (["--eval-text", "TMP/short.txt", "--window", "64"],
                                        r"short\.txt: 10 tokens, fewer than one perplexity window of 64"),
    "report in a missing directory": (["--report", "TMP/nope/r.json"], r"--report .*does not exist; create it"),
    "report is a directory": (["--report", "TMP"], r"--report \S+ is a directory"),
    "save is a file": (["--save", "TMP/a-file"], r"a-file exists and is not a directory"),
    "save holds user files": (["--save", "TMP/user"], r"user holds 1 files .* lrgptq did not write it"),
    "nsamples 0": (["--nsamples", "0"], r"--nsamples must be >= 1"),
    "seqlen 0": (["--seqlen", "0"], r"--seqlen must be >= 1"),
    "window 0": (["--eval-text", "CALIB", "--window", "0"], r"--window must be >= 2"),
    "window 1": (["--eval-text", "CALIB", "--window", "1"], r"--window must be >= 2"),
    "max windows 0": (["--eval-text", "CALIB", "--max-windows", "0"], r"--max-windows must be >= 1"),
    "spill without stream": (["--spill"], r"--spill .* works only with --stream"),
    "save at 5 bits": (["--bits", "5", "--save", "TMP/out"], r"the GPTQ layout holds bits \(2, 3, 4, 8\)"),
    "save float codebooks": (["--vq-dim", "2", "--bits", "2", "--no-vq-codebook-int8", "--save", "TMP/out"],
                             r"the gptvq layout stores int8 codebooks"),
    "missing model": (["@model", "TMP/nope"], r"model directory \S*nope does not exist"),
    "model is a file": (["@model", "TMP/a-file"], r"is not a directory"),
    "no tokenizer files": (["@model", "TMP/no-tok"], r"no-tok has no tokenizer files"),
}


EVAL_CASES = {
    "window 0": (["--window", "0"], r"--window must be >= 2"),
    "window 1": (["--window", "1"], r"--window must be >= 2"),
    "missing text": (["--text", "TMP/nope.txt"], r"--text \S*nope\.txt: cannot read it"),
    "empty text": (["--text", "TMP/empty.txt"], r"--text \S*empty\.txt: the file is empty"),
    "latin-1 text": (["--text", "TMP/latin1.txt"], r"--text \S*latin1\.txt: not UTF-8"),
    "text shorter than a window": (["--text", "TMP/short.txt"], r"10 tokens, fewer than one perplexity window"),
    "missing model": (["@model", "TMP/nope"], r"does not exist"),
}


BASE = {"quantize": ["--calib", "CALIB", "--seqlen", "32", "--nsamples", "2"],
        "eval": ["--text", "CALIB", "--window", "64"]}
CASES = [(c, n) for c, table in (("quantize", QUANTIZE_CASES), ("eval", EVAL_CASES)) for n in sorted(table)]


@pytest.mark.parametrize("command,case", CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_paths_and_options_are_checked_before_loading(tmp_path, model_dir, calib_text, capsys, no_model_load,
                                                      command, case):
    where = _setup(tmp_path, model_dir, calib_text)
    extra, message = {"quantize": QUANTIZE_CASES, "eval": EVAL_CASES}[command][case]
    args = [where.get(a.split("/")[0], a.split("/")[0]) + a[len(a.split("/")[0]):] for a in BASE[command] + extra]
    model = str(model_dir)
    if "@model" in args:  # later options win; the model is positional
        i = args.index("@model")
        model = args.pop(i + 1)
        args.pop(i)
    assert cli.main([command, model, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrgptq {command}: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert "Repo id" not in err and "Traceback" not in err


def test_eval_reads_an_lrgptq_checkpoint(tmp_path, model_dir, calib_text, capsys):
    ckpt = tmp_path / "ckpt"
    assert cli.main(["quantize", str(model_dir), "--calib", str(calib_text), "--nsamples", "4", "--seqlen", "32",
                     "--group-size", "32", "--save", str(ckpt)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(ckpt), "--text", str(calib_text), "--window", "64", "--max-windows", "4"]) == 0
    printed = capsys.readouterr().out
    ids = char_tokenizer()(CALIB, return_tensors="pt")["input_ids"]
    expect = lrgptq.perplexity(lrgptq.load(ckpt, dtype=torch.float32), ids, 64, 4)
    assert f"perplexity (window 64): {expect:.3f}" in printed, printed
    # Quantizing it again is refused (it is not a full-precision model).
    assert cli.main(["quantize", str(ckpt), "--calib", str(calib_text), "--seqlen", "32"]) == 2
    assert "already a quantized checkpoint" in capsys.readouterr().err


def test_warnings_are_lines_of_the_output(tmp_path, model_dir, calib_text, capsys):
    argv = ["quantize", str(model_dir), "--calib", str(calib_text), "--nsamples", "1", "--seqlen", "32",
            "--window", "64", "--vq-group-rows", "8"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    for said in ("--window and --max-windows have no effect without --eval-text",
                 "14 of 14 layers saw fewer calibration tokens than they have inputs",
                 "these options have no effect with the other settings: vq_group_rows=8"):
        assert [line for line in err if line.startswith("lrgptq quantize: warning: ") and said in line], err
    assert cli.main(argv + ["--skip", "proj"]) == 0
    assert "warning: no layer was quantized" in capsys.readouterr().err


def test_perplexity_under_bfloat16_autocast():
    """The demo's evaluation under bfloat16 autocast: the matmuls round to bfloat16 (so the value
    moves, a little), the weights stay float32, and an autocast dtype that is not a half type is refused."""
    torch.manual_seed(0)
    model = ARCHS["llama"]().eval()
    ids = torch.randint(0, VOCAB, (1, 256))
    fp32 = lrgptq.perplexity(model, ids, 64, 4)
    bf16 = lrgptq.perplexity(model, ids, 64, 4, autocast=torch.bfloat16)
    assert fp32 != bf16 and abs(bf16 / fp32 - 1) < 0.02
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        lrgptq.perplexity(model, ids, 64, 4, autocast=torch.float64)
