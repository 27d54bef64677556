"""Calibration data: strings, token tensors or loaders in; a list of model-ready batches out,
checked before any block runs (an empty, mistyped or out-of-vocabulary input is refused here
with the argument named, not found as an IndexError deep inside the model)."""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Union

import torch
from torch import nn

Calib = Union[str, List[str], torch.Tensor, Iterable[Any]]
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
BATCH_TOKENS = 4096  # tokens per forward pass when calibration_batches groups windows of one length
FORMS = "a LongTensor of token ids (N, L), a list of strings with tokenizer=, or an iterable of such tensors " \
        "or of dicts with input_ids"


def text_windows(text: str, tokenizer: Any, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens from ``text`` (reproducible with ``seed``)."""
    if n < 1 or length < 1:
        raise ValueError(f"text_windows needs n >= 1 windows of length >= 1 tokens, got n={n}, length={length}")
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    if ids.numel() <= length:
        raise ValueError(f"the text has {ids.numel()} tokens: too few for windows of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def vocab_size(model: nn.Module) -> Optional[int]:
    """Rows of ``model``'s input embedding (the token ids it can take), None if it has none."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        emb = None
    return getattr(emb, "num_embeddings", None)


def _token_ids(t: Any, where: str) -> torch.Tensor:
    """``t`` as int64 token ids (N, L) with N, L >= 1; ValueError naming ``where`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where} must be a tensor of token ids, got {type(t).__name__}")
    if t.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{where} must hold integer token ids (int64), got {t.dtype}: pass the tokenizer's "
                         "input_ids, not embeddings or floats")
    if t.dim() == 0:
        raise ValueError(f"{where} is a single number; token ids are (N, L) or (L,)")
    if t.numel() == 0:
        raise ValueError(f"{where} has shape {tuple(t.shape)}: no tokens (it needs N >= 1 samples of L >= 1 tokens)")
    return t.long().reshape(-1, t.shape[-1])


def _check_vocab(ids: torch.Tensor, vocab: int, where: str) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where} holds token id {bad}, outside the model's vocabulary of {vocab} "
                         f"(ids 0..{vocab - 1}): was it tokenized with this model's tokenizer?")


def calibration_batches(
    calib: Calib,
    tokenizer: Optional[Any] = None,
    max_length: int = 2048,
    batch_size: int = 1,
    vocab_size: Optional[int] = None,
    batch_tokens: Optional[int] = BATCH_TOKENS,
) -> List[Any]:
    """Normalises ``calib`` into a list of batches the model can be called with.

    Accepts a list of strings (needs ``tokenizer``; each string is one sample, cut at
    ``max_length`` tokens), a LongTensor of token ids (N, L) or (L,), or any iterable (a
    DataLoader) of such tensors or of dicts holding ``input_ids``. Refused with ValueError naming
    ``calib``: None, nothing in it, no tokens (shape (0, L) or (N, 0), empty strings), ids that
    are not integers, and ids outside ``0..vocab_size - 1`` when ``vocab_size`` is given.
    ``batch_tokens``: consecutive windows of one length are then grouped into batches of at most
    that many tokens (:func:`group_windows`); None keeps a batch per item (``batch_size`` rows of a tensor).
    """
    if calib is None:
        raise ValueError(f"calib is None: quantization needs calibration data, {FORMS}")
    if isinstance(calib, str):
        calib = [calib]
    if isinstance(calib, torch.Tensor):
        ids = _token_ids(calib, "calib")
        out: List[Any] = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    else:
        try:
            items = list(calib)
        except TypeError as err:
            raise ValueError(f"calib is a {type(calib).__name__}; it must be {FORMS}") from err
        if not items:
            raise ValueError(f"calib is empty: it must hold at least one sample ({FORMS})")
        out = _batches_of(items, tokenizer, max_length)
    if vocab_size is not None:
        for i, b in enumerate(out):
            _check_vocab(b["input_ids"] if isinstance(b, dict) else b, vocab_size, f"calib (batch {i})")
    return out if batch_tokens is None else group_windows(out, batch_tokens)


def group_windows(batches: List[Any], max_tokens: int) -> List[Any]:
    """Consecutive token tensors of one length concatenated along the batch dimension, at most
    ``max_tokens`` tokens per batch (fewer, larger forward passes: the same tokens in the same
    order). The first batch stays as it is: a pass over batch 0 is the pipeline's cheap probe of
    which layers share an input. Dicts (which may carry the attention mask of padded text) and
    tensors of another length or dtype end a group and stay as they are."""
    out: List[Any] = list(batches[:1])
    group: List[torch.Tensor] = []

    def close() -> None:
        if group:
            out.append(torch.cat(group) if len(group) > 1 else group[0])
            group.clear()

    for b in batches[1:]:
        if not (isinstance(b, torch.Tensor) and b.dim() == 2):
            close()
            out.append(b)
            continue
        if group and (b.shape[1] != group[0].shape[1] or b.dtype != group[0].dtype
                      or sum(g.numel() for g in group) + b.numel() > max_tokens):
            close()
        group.append(b)
    close()
    return out


def _batches_of(items: List[Any], tokenizer: Optional[Any], max_length: int) -> List[Any]:
    if all(isinstance(s, str) for s in items):
        if tokenizer is None:
            raise ValueError("calib is text: pass tokenizer= to turn it into tokens")
        out = []
        for s in items:
            ids = tokenizer(s, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.numel():
                out.append(ids)
        if not out:
            raise ValueError(f"calib's {len(items)} strings give no tokens (all empty?)")
        return out
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"calib[{i}] is a dict without 'input_ids'")
            item = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask")}
            item["input_ids"] = _token_ids(item["input_ids"], f"calib[{i}]['input_ids']")
            out.append(item)
        elif isinstance(item, torch.Tensor):
            out.append(_token_ids(item, f"calib[{i}]"))
        else:
            raise ValueError(f"calib[{i}] is a {type(item).__name__}; calibration items must be strings, tensors "
                             "or dicts with input_ids")
    return out
