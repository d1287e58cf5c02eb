"""Prompt lookup (as llama.cpp's and vLLM's n-gram speculation): the tokens that followed the latest earlier
occurrence of the context's last n tokens, for the longest n that occurs. No second model: text that
repeats its prompt (summaries, edits of code, continued lists) drafts itself."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose(context: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k draft tokens for what follows `context`, or [] where no n-gram of it repeats."""
    if k < 1 or len(context) < 2:
        return []
    ctx = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ctx) - 1), min_ngram - 1, -1):
        suffix = ctx[-n:]
        # every window of n tokens that ends before the suffix itself starts
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n                 # the latest occurrence: the most local repetition
            return ctx[start:start + k].tolist()
    return []
