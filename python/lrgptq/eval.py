"""Perplexity over a token stream with non-overlapping windows (the GPTQ/wikitext2 protocol)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int = 2048,
    max_windows: Optional[int] = None,
    device: Optional[torch.device] = None,
    autocast: Optional[torch.dtype] = None,
) -> float:
    """exp(mean next-token NLL) over ``ids`` (1-D or (1, T)) cut into windows of ``window`` tokens.

    Every window is scored on its own (no context carried across), as in the GPTQ papers; report
    the window with the number. ``autocast``: run the forward passes under ``torch.autocast`` in
    that dtype (e.g. bfloat16: the weights stay as they are, the matmuls run in bfloat16); the
    log-likelihoods are taken in float32 either way.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (a window scores each token after its first), got {window!r}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows!r}")
    ids = ids.reshape(-1)
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"need at least {window} tokens for one window, got {ids.numel()}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(n):
        x = ids[i * window : (i + 1) * window].unsqueeze(0).to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(x).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += window - 1
    return math.exp(nll / count)
