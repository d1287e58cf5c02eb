"""Speculative greedy generation inside the Engine: each prompt prefilled into a cache of its own, then
decoded by verify passes of the reference model over the last token and a prompt-lookup draft. It runs on
the reference engine only: the megakernel has no multi-token verify step yet (issue 20), and verifying
through the reference model on a GPU would be slower than the megakernel's plain decode."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import InputError
from ..runtime.kv_cache import KVCache
from ..runtime.prefill import chunk_size, prefill_chunk
from ..runtime.sampling import SamplingParams
from ..runtime.sequence import Sequence, TokenEvent
from .greedy import SpeculativeStats, speculative_greedy
from .ngram import propose

METHODS = ("ngram",)
MAX_DRAFT_TOKENS = 16


def check_speculative(method: str, draft_tokens: int, params: SamplingParams, engine_kind: str) -> None:
    """Refuses what speculative decoding cannot do here, before anything runs."""
    if method not in METHODS:
        hint = " (a draft model, model:PATH, is not built yet)" if method.startswith("model:") else ""
        raise InputError(f"speculative method {method!r} is not one of {', '.join(METHODS)}{hint}")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise InputError(f"draft_tokens={draft_tokens} must be in 1..{MAX_DRAFT_TOKENS}")
    if not params.greedy:
        raise InputError("speculative decoding is greedy only so far: use temperature 0, or no --speculative")
    if engine_kind != "reference":
        raise InputError("speculative decoding runs on the reference engine for now (the megakernel has no multi-token "
                         "verify step yet): use engine='reference' (--engine reference), or no --speculative")


def speculative_events(engine, seqs: list[Sequence], draft_tokens: int, stats: SpeculativeStats
                       ) -> Iterator[TokenEvent]:
    """The events of each sequence in turn (prompts one after another, each in its own cache)."""
    model, dev = engine.model, engine.device
    chunk = engine.prefill_chunk or chunk_size(dev)
    for seq in seqs:
        p = seq.prompt_ids
        size = min(engine.max_seq, len(p) + seq.max_new_tokens)
        cache = KVCache(engine.spec, 1, size, engine.dtype, dev)
        for start in range(0, len(p), chunk):
            logits = prefill_chunk(model, p[start:start + chunk], start, cache, 0,
                                   last_logits=start + chunk >= len(p))
        first = int(logits.argmax())
        yield seq.append(first)
        if seq.finished:
            continue

        def verify(tokens: torch.Tensor, position: int, cache=cache) -> torch.Tensor:
            return model.forward(tokens.to(dev), torch.tensor([position], device=dev), cache)

        for tok in speculative_greedy(verify, propose, list(p) + [first], first, len(p), seq.max_new_tokens, size,
                                      draft_tokens, eos=seq.eos_ids, stats=stats):
            yield seq.append(tok)
            if seq.finished:     # a stop string ends it before the draft's last tokens
                break
