"""Interop for MoE checkpoints, save side: the tiny random MoE models of tests/tiny_models.py
(Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE; 8 experts, top-2) quantized with GPTQ (4 bits, symmetric,
group size 32, act-order) and saved per expert, in the directory layout bench/interop_load.py
reads (OUT/ckpt/<name>, OUT/ref/<name>.{float32,float16}.pt, OUT/ids.pt, OUT/cases.json), with
the demo model's tokenizer beside each (GPTQModel loads one).

    PYTHONPATH=python python bench/interop_moe_save.py --out /tmp/lrgptq-interop-moe
    /work/interop-venv/bin/python bench/interop_load.py --out /tmp/lrgptq-interop-moe
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

import lrgptq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import MOE_ARCHS, VOCAB  # noqa: E402

from interop_save import reference_logits  # noqa: E402  (bench/ is the script's directory)

CONFIG = dict(bits=4, group_size=32, sym=True, order="act")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    args = ap.parse_args()
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"interop_moe_save: {out} is not empty; pass a new directory")
    (out / "ref").mkdir(parents=True)
    (out / "ckpt").mkdir()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 32), generator=gen)
    calib = torch.randint(0, VOCAB, (8, 64), generator=gen)
    torch.save(ids, out / "ids.pt")
    # GPTQModel.load always loads a tokenizer: give each checkpoint the demo's (ids < VOCAB, so it
    # changes nothing in the logits).
    from transformers import AutoTokenizer
    from lrgptq.demo.data import cache_dir, load_demo_model

    if not (Path(cache_dir()) / "smollm2-135m" / "config.json").is_file():
        load_demo_model()  # fills the cache
    tok = AutoTokenizer.from_pretrained(str(Path(cache_dir()) / "smollm2-135m"), local_files_only=True)
    rows: List[Dict[str, Any]] = []
    for arch, build in sorted(MOE_ARCHS.items()):
        torch.manual_seed(0)
        model = build().eval()
        cfg = lrgptq.QuantConfig.for_method("gptq", **CONFIG)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lrgptq.quantize_model(model, calib, cfg, progress=False)
        saved = lrgptq.save(model, report, out / "ckpt" / arch, tok)
        qc = json.loads((saved.path / "config.json").read_text())["quantization_config"]
        for dtype in (torch.float32, torch.float16):
            torch.save(reference_logits(saved.path, ids, dtype), out / "ref" / f"{arch}.{str(dtype)[6:]}.pt")
        tokens = {r["name"]: r["tokens"] for r in report.layers if ".experts." in r["name"]}
        rows.append({"name": arch, "bits": cfg.bits, "sym": cfg.sym, "group_size": cfg.group_size,
                     "checkpoint_format": saved.checkpoint_format, "desc_act": qc["desc_act"],
                     "expert_tokens_min": min(tokens.values()), "expert_layers": len(tokens)})
        print(f"{arch}: {saved.checkpoint_format}, {len(tokens)} expert matrices, "
              f"fewest tokens {min(tokens.values())}", flush=True)
    meta = {"lrgptq": lrgptq.__version__, "torch": torch.__version__, "batch": list(ids.shape),
            "eval_book": "random ids", "checkpoints": rows}
    (out / "cases.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
