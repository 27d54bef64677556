"""The lrgptq command line, on a tiny model (its loader is swapped for one that needs no files)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import lrgptq  # noqa: E402
from lrgptq import cli  # noqa: E402

from tiny_models import ARCHS, VOCAB  # noqa: E402


class CharTokenizer:
    """One token per character, enough for text_windows and perplexity."""

    def __call__(self, text, return_tensors=None, **_kw):
        ids = [ord(c) % VOCAB for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def save_pretrained(self, path):
        with open(f"{path}/tokenizer.json", "w") as f:
            json.dump({"kind": "chars", "vocab": VOCAB}, f)


CALIB = "It is a truth universally acknowledged, that a single man in possession. " * 40


@pytest.fixture
def calib_text(tmp_path, monkeypatch):
    """A tiny Llama behind the CLI's loader, and a calibration text file for it."""
    torch.manual_seed(0)
    model = ARCHS["llama"]().eval()
    monkeypatch.setattr(cli, "_load", lambda path, gguf: (model, CharTokenizer()))
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


def test_quantize_saves_a_checkpoint_that_loads(tmp_path, calib_text, capsys):
    text = calib_text
    out_dir = tmp_path / "ckpt"
    rc = cli.main(["quantize", "tiny", "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
                   "--eval-text", str(text), "--window", "64", "--bits", "4", "--group-size", "32",
                   "--save", str(out_dir), "--report", str(tmp_path / "report.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity (window 64)" in printed and "model.layers.1.mlp.down_proj" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["layers"]) == 14 and report["config"]["bits"] == 4
    loaded = lrgptq.load(str(out_dir), dtype=torch.float32)
    assert any(isinstance(m, lrgptq.QuantLinear) for m in loaded.modules())


def test_quantize_vq_saves_a_gptvq_checkpoint(tmp_path, calib_text):
    text = calib_text
    out_dir = tmp_path / "ckpt"
    rc = cli.main(["quantize", "tiny", "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--method", "gptq",
                   "--bits", "2", "--vq-dim", "2", "--vq-group-cols", "16", "--vq-group-rows", "8",
                   "--save", str(out_dir), "--report", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["vq_dim"] == 2 and report["config"]["vq_group_cols"] == 16
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptvq"
    loaded = lrgptq.load(str(out_dir), dtype=torch.float32)
    assert any(type(m).__name__ == "VQLinear" for m in loaded.modules())


def test_bad_option_is_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    model = ARCHS["llama"]().eval()
    monkeypatch.setattr(cli, "_load", lambda path, gguf: (model, CharTokenizer()))
    text = tmp_path / "calib.txt"
    text.write_text("short text " * 100)
    assert cli.main(["quantize", "tiny", "--calib", str(text), "--bits", "9", "--seqlen", "16"]) == 2
    assert "bits" in capsys.readouterr().err


def test_quantize_stream_writes_and_resumes_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    ARCHS["llama"]().eval().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(cli, "_tokenizer", lambda path, gguf=None: CharTokenizer())
    text = tmp_path / "calib.txt"
    text.write_text(CALIB)
    argv = ["quantize", str(tmp_path / "model"), "--stream", "--calib", str(text), "--nsamples", "4",
            "--seqlen", "32", "--group-size", "32", "--save", str(tmp_path / "ckpt")]
    assert cli.main(argv) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    loaded = lrgptq.load(str(tmp_path / "ckpt"), dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, lrgptq.QuantLinear)
    assert cli.main(argv) == 0  # a finished run: nothing left to quantize, the same checkpoint
    assert cli.main(argv[:-1] + [str(tmp_path / "model")]) == 2  # not a directory it may write into
    assert "refusing" in capsys.readouterr().err
