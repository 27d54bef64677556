"""Interop, save side (run by bench/interop.sh with lrgptq's own environment).

Quantizes the packaged SmolLM2-135M once per quantization case, saves it in each checkpoint
format the case lists, and writes lrgptq.load's float32 logits on one fixed token batch beside
the checkpoints (OUT/ref/<checkpoint>.float32.pt, and .float16.pt with the model's float
tensors in float16), the batch itself (OUT/ids.pt) and OUT/cases.json,
which bench/interop_load.py reads. RTN is enough where the case is about the file format; the
act-order and default cases calibrate briefly, since only a calibrated order makes g_idx non-monotonic.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

import lrgptq
from lrgptq.calib import text_windows
from lrgptq.demo.data import CALIB_BOOK, EVAL_BOOK, austen_books, load_demo_model

# The fixed batch every reader computes logits on.
BATCH, LENGTH, SEED = 2, 64, 1
# Brief calibration for the cases that need an order from the data.
CALIB_N, CALIB_LEN = 16, 256


@dataclass(frozen=True)
class Case:
    """One quantization of the demo model, saved once per entry of ``formats``."""

    name: str
    method: str
    overrides: Tuple[Tuple[str, Any], ...]
    formats: Tuple[str, ...]  # checkpoint_format values passed to lrgptq.save
    calibrate: bool = False


CASES = (
    Case("sym4", "rtn", (("bits", 4), ("sym", True)), ("auto",)),
    Case("sym8", "rtn", (("bits", 8), ("sym", True)), ("auto",)),
    Case("asym4", "rtn", (("bits", 4), ("sym", False)), ("gptq", "gptq_v2")),
    Case("asym4-act", "gptq", (("bits", 4), ("sym", False), ("order", "act")), ("gptq", "gptq_v2"), True),
    Case("asym3", "rtn", (("bits", 3), ("sym", False)), ("gptq", "gptq_v2")),
    Case("asym8", "rtn", (("bits", 8), ("sym", False)), ("gptq", "gptq_v2")),
    # QuantConfig()'s defaults (the lrgptq route, asymmetric, pivoted order) saved as save() decides.
    Case("default", "lrgptq", (), ("auto",), True),
)


def checkpoint_name(case: Case, fmt: str) -> str:
    return case.name if len(case.formats) == 1 else f"{case.name}-{'v1' if fmt == 'gptq' else 'v2'}"


def quantize(case: Case, calib: torch.Tensor) -> Tuple[Any, Any, Any]:
    """(model, tokenizer, report): a fresh demo model quantized in place as ``case`` says."""
    model, tok = load_demo_model()
    cfg = lrgptq.QuantConfig.for_method(case.method, group_size=128, **dict(case.overrides))
    ids = calib if case.calibrate else calib[:1, :16]  # RTN ignores the data; one short window
    report = lrgptq.quantize_model(model, ids, cfg, progress=False)
    return model, tok, report


@torch.no_grad()
def reference_logits(path: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What lrgptq.load computes on ``ids`` with the model's float tensors in ``dtype`` (float16:
    the size of float16 rounding, for readers that compute only in float16)."""
    model = lrgptq.load(path, dtype=dtype)
    return model(ids).logits.float()


def save_case(case: Case, calib: torch.Tensor, ids: torch.Tensor, out: Path) -> List[Dict[str, Any]]:
    t0 = time.perf_counter()
    model, tok, report = quantize(case, calib)
    rows = []
    for fmt in case.formats:
        name = checkpoint_name(case, fmt)
        row: Dict[str, Any] = {"name": name, "requested_format": fmt, "bits": report.config.bits,
                               "sym": report.config.sym, "group_size": report.config.group_size,
                               "method": case.method}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                saved = lrgptq.save(model, report, out / "ckpt" / name, tok, checkpoint_format=fmt)
            row.update(path=str(saved.path), checkpoint_format=saved.checkpoint_format,
                       zero_point_layers=len(saved.zero_point_layers),
                       warnings=[str(w.message) for w in caught])
            qc = json.loads((saved.path / "config.json").read_text())["quantization_config"]
            row["desc_act"] = qc["desc_act"]
            for dtype in (torch.float32, torch.float16):
                dt = str(dtype).replace("torch.", "")
                torch.save(reference_logits(saved.path, ids, dtype), out / "ref" / f"{name}.{dt}.pt")
        except ValueError as e:  # e.g. "gptq" (v1) refused because an asymmetric z = 0
            row["save_error"] = str(e)
        rows.append(row)
        print(f"  {name}: {row.get('checkpoint_format', 'not written: ' + row.get('save_error', ''))}", flush=True)
    print(f"{case.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    ap.add_argument("--only", nargs="*", help="case names to save (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"interop_save: {out} is not empty; pass a new directory")
    (out / "ref").mkdir(parents=True)
    (out / "ckpt").mkdir()
    _, tok = load_demo_model()
    books = austen_books()
    ids = text_windows(books[EVAL_BOOK], tok, BATCH, LENGTH, seed=SEED)
    calib = text_windows(books[CALIB_BOOK], tok, CALIB_N, CALIB_LEN, seed=0)
    torch.save(ids, out / "ids.pt")
    rows: List[Dict[str, Any]] = []
    for case in CASES:
        if not args.only or case.name in args.only:
            rows += save_case(case, calib, ids, out)
    meta = {"lrgptq": lrgptq.__version__, "torch": torch.__version__, "batch": list(ids.shape),
            "eval_book": EVAL_BOOK, "checkpoints": rows}
    (out / "cases.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
