"""Calibration data: strings, token tensors or loaders in; a list of model-ready batches out."""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Union

import torch

Calib = Union[str, List[str], torch.Tensor, Iterable[Any]]


def text_windows(text: str, tokenizer: Any, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens from ``text`` (reproducible with ``seed``)."""
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    if ids.numel() <= length:
        raise ValueError(f"the text has {ids.numel()} tokens: too few for windows of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def calibration_batches(
    calib: Calib, tokenizer: Optional[Any] = None, max_length: int = 2048, batch_size: int = 1
) -> List[Any]:
    """Normalises ``calib`` into a list of batches the model can be called with.

    Accepts a list of strings (needs ``tokenizer``; each string is one sample, cut at
    ``max_length`` tokens), a LongTensor of token ids (N, L) or (L,), or any iterable (a
    DataLoader) of such tensors or of dicts holding ``input_ids``.
    """
    if isinstance(calib, str):
        calib = [calib]
    if isinstance(calib, torch.Tensor):
        if calib.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError(f"calibration tensor must hold token ids (int64), got {calib.dtype}")
        ids = calib.long().reshape(-1, calib.shape[-1])
        return [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    items = list(calib)
    if not items:
        raise ValueError("calibration data is empty")
    if all(isinstance(s, str) for s in items):
        if tokenizer is None:
            raise ValueError("calibration data is text: pass tokenizer= to turn it into tokens")
        out = []
        for s in items:
            ids = tokenizer(s, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.numel():
                out.append(ids)
        return out
    out = []
    for item in items:
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError("calibration dicts must hold 'input_ids'")
            item = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask")}
            out.append(item)
        elif isinstance(item, torch.Tensor):
            out.append(item.long().reshape(-1, item.shape[-1]))
        else:
            raise ValueError(f"calibration items must be strings, tensors or dicts, got {type(item).__name__}")
    return out
