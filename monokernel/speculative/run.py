"""Speculative generation inside the Engine: each prompt prefilled into a cache of its own, then decoded by
verify passes of the reference model over the last token and a draft (prompt lookup, or a draft model's),
greedy or sampled. It runs on the reference engine only: the megakernel has no multi-token verify step yet
(issue 20), and verifying through the reference model on a GPU would be slower than the megakernel's plain
decode."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..runtime.kv_cache import KVCache
from ..runtime.prefill import chunk_size, prefill_chunk
from ..runtime.requests import Request
from ..runtime.sampling import sample
from ..runtime.sequence import TokenEvent
from .draft_model import PREFIX, DraftModel, draft_source
from .greedy import greedy_accept
from .ngram import propose
from .sampling import sampled_accept
from .verify import SpeculativeStats, speculative_decode

METHODS = ("ngram", "model:PATH")
MAX_DRAFT_TOKENS = 16


def check_speculative(method: str, draft_tokens: int, engine_kind: str) -> None:
    """Refuses what speculative decoding cannot do here, before anything runs (or loads)."""
    if not isinstance(method, str) or not (method == "ngram" or method.startswith(PREFIX)):
        raise InputError(f"speculative method {method!r} is not one of {', '.join(METHODS)}")
    if method.startswith(PREFIX):   # a draft model that is not there is named before any weights load
        from ..models.load import resolve_model
        resolve_model(draft_source(method))
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise InputError(f"draft_tokens={draft_tokens!r} must be an integer in 1..{MAX_DRAFT_TOKENS}")
    if engine_kind != "reference":
        raise InputError("speculative decoding runs on the reference engine for now (the megakernel has no multi-token "
                         "verify step yet): use engine='reference' (--engine reference), or no --speculative")


@dataclass(frozen=True)
class Speculation:
    """One speculative method for one engine, checked: its draft model (loaded once, checked against the
    target's tokenizer), and per request the Draft and Accept functions verify.py runs."""

    method: str
    draft_tokens: int
    drafter: DraftModel | None = None     # model:PATH's; None for prompt lookup

    @classmethod
    def create(cls, method: str, draft_tokens: int, engine, drafters: dict | None = None) -> "Speculation":
        """Checked for `engine`; `drafters` (method -> DraftModel) keeps loaded draft models between calls."""
        check_speculative(method, draft_tokens, engine.engine)
        drafter = None
        if method.startswith(PREFIX):
            drafters = {} if drafters is None else drafters
            drafter = drafters.get(method) or DraftModel.load(method, engine)
            drafters[method] = drafter
        return cls(method, draft_tokens, drafter)

    def functions(self, request: Request, drafter: DraftModel | None = None):
        """(draft, accept) for `request` (its parameters, its generator); `drafter`: the draft model state to
        use (one per concurrent sequence; default the loaded one)."""
        drafter = drafter or self.drafter
        p = request.params
        if p.greedy:
            fn = propose if drafter is None else drafter.propose
            return (lambda ctx, k: (fn(ctx, k), None)), greedy_accept
        draft = ((lambda ctx, k: (propose(ctx, k), None)) if drafter is None
                 else drafter.sampler(p, request.generator))
        return draft, sampled_accept(p, request.generator)

    def new_drafter(self) -> DraftModel | None:
        """Another draft model state over the same weights (an own cache), for another concurrent sequence."""
        d = self.drafter
        return None if d is None else DraftModel(d.model.w, d.tokenizer, d.name)


def speculative_events(engine, reqs: list[Request], speculation: Speculation, stats: SpeculativeStats
                       ) -> Iterator[TokenEvent]:
    """The events of each request in turn (prompts one after another, each in its own cache)."""
    model, dev = engine.model, engine.device
    chunk = engine.prefill_chunk or chunk_size(dev)
    for r in reqs:
        seq, p = r.seq, r.prompt_ids
        size = min(engine.max_seq, len(p) + seq.max_new_tokens)
        cache = KVCache(engine.spec, 1, size, engine.dtype, dev)
        for start in range(0, len(p), chunk):
            logits = prefill_chunk(model, p[start:start + chunk], start, cache, 0,
                                   last_logits=start + chunk >= len(p))
        params = r.params
        first = int(sample(logits[None].cpu(), params.temperature, params.top_k, params.top_p, r.generator)[0])
        yield seq.append(first)
        if seq.finished:
            continue

        def verify(tokens: torch.Tensor, position: int, cache=cache) -> torch.Tensor:
            return model.forward(tokens.to(dev), torch.tensor([position], device=dev), cache)

        draft, accept = speculation.functions(r)
        for tok in speculative_decode(verify, draft, accept, list(p) + [first], first, len(p), seq.max_new_tokens,
                                      size, speculation.draft_tokens, eos=seq.eos_ids, stats=stats):
            yield seq.append(tok)
            if seq.finished:     # a stop string ends it before the draft's last tokens
                break
