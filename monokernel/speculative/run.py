"""Speculative generation inside the Engine: each prompt prefilled into a cache of its own, then decoded by
verify passes over the last token and a draft (prompt lookup, or a draft model's), greedy or sampled (by the
host's rule, sampling.py, or, for a sampled request on the megakernel, by the kernel's own draws, coupled.py).
The pass is the reference model's forward on the reference engine and the megakernel's verify step (one launch
of T = draft_tokens + 1 rows of the sequence, runtime/mega.py) on the megakernel engine. The Scheduler's
speculation (serve, chat) is scheduled.py."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import gumbel
from ..errors import InputError
from ..runtime.kv_cache import KVCache
from ..runtime.prefill import chunk_size, prefill_chunk
from ..runtime.requests import Request
from ..runtime.sampling import sample
from ..runtime.sequence import TokenEvent
from ..schedule.inputs import MAX_TOKENS_PER_SEQ
from .draft_model import PREFIX, DraftModel, draft_source
from .greedy import greedy_accept
from .ngram import propose
from .coupled import coupled_accept, draw_rows
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
    if engine_kind == "mega" and draft_tokens + 1 > MAX_TOKENS_PER_SEQ:
        raise InputError(f"draft_tokens={draft_tokens}: the megakernel verifies at most {MAX_TOKENS_PER_SEQ - 1} draft "
                         f"tokens a pass ({MAX_TOKENS_PER_SEQ} rows a sequence); use --draft-tokens "
                         f"{MAX_TOKENS_PER_SEQ - 1} or fewer, or engine='reference'")


def mega_verifier(engine, draft_tokens: int):
    """The megakernel's verify step for T = draft_tokens + 1 rows of one sequence, built once an engine and T:
    (cache, decoder). Its cache holds T - 1 positions past the engine's max_seq, where a short draft's padding
    rows land (their K/V past the accepted position is never read)."""
    from ..runtime.mega import MegaDecoder

    t = draft_tokens + 1
    held = engine.__dict__.setdefault("_verifiers", {})
    if t not in held:
        cache = KVCache(engine.spec, 1, min(engine.max_seq + t - 1, engine.spec.max_position_embeddings),
                        engine.dtype, engine.device)
        held[t] = cache, MegaDecoder(engine.weights, cache, tokens_per_seq=t)
    return held[t]


def _mega_verify(decoder, t: int, model, sampling: tuple | None = None):
    """Verify (verify.py) through the megakernel, returning the logits and the kernel's own tokens: its argmax,
    or with `sampling` (SamplingParams, seed: a coupled request, coupled.py) its draw at every row. A draft shorter
    than t - 1 is padded with its last token (rows whose outputs nobody reads). Where the padding would pass the
    cache (a context ending at the model's max_position_embeddings), that pass runs through the reference model
    on the same cache, its rows chosen by the kernel's rule on the host."""
    p, seed = sampling if sampling else (None, 0)
    decoder.set_sampling([p.temperature if p else 0.0] * t, [seed] * t, [p.top_k if p else None] * t,
                         [p.top_p if p else None] * t)

    def verify(tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[1]
        if position + t > decoder.cache.max_seq:
            dev = decoder.cache.k.device
            logits = model.forward(tokens.to(dev), torch.tensor([position], device=dev), decoder.cache)
            drawn = logits.argmax(-1) if sampling is None else draw_rows(logits[0], *sampling, position)[None]
            return logits, drawn
        padded = torch.cat([tokens, tokens[:, -1:].expand(1, t - n)], dim=1) if n < t else tokens
        chosen, _, logits = decoder.verify(padded, torch.tensor([position]))
        return logits[:, :n], chosen[:, :n]
    return verify


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

    def functions(self, request: Request, drafter: DraftModel | None = None, coupled: bool = False):
        """(draft, accept) for `request` (its parameters, its generator); `drafter`: the draft model state to
        use (one per concurrent sequence; default the loaded one); `coupled`: a sampled request whose verify
        rows the megakernel draws (coupled.py), else the host's rule (sampling.py)."""
        drafter = drafter or self.drafter
        p = request.params
        if p.greedy:
            fn = propose if drafter is None else drafter.propose
            return (lambda ctx, k: (fn(ctx, k), None)), greedy_accept
        if coupled:
            draft = ((lambda ctx, k: (propose(ctx, k), None)) if drafter is None
                     else drafter.coupled(p, request.seed))
            return draft, coupled_accept
        draft = ((lambda ctx, k: (propose(ctx, k), None)) if drafter is None
                 else drafter.sampler(p, request.generator))
        return draft, sampled_accept(p, request.generator)

    def new_drafter(self) -> DraftModel | None:
        """Another draft model state over the same weights (an own cache), for another concurrent sequence."""
        d = self.drafter
        return None if d is None else DraftModel(d.model.w, d.tokenizer, d.name, mega_positions=d.mega_positions)


def speculative_events(engine, reqs: list[Request], speculation: Speculation, stats: SpeculativeStats
                       ) -> Iterator[TokenEvent]:
    """The events of each request in turn (prompts one after another, each in its own cache)."""
    model, dev = engine.model, engine.device
    chunk = engine.prefill_chunk or chunk_size(dev)
    mega = engine.engine == "mega"
    for r in reqs:
        seq, p = r.seq, r.prompt_ids
        size = min(engine.max_seq, len(p) + seq.max_new_tokens)
        if mega:
            cache, decoder = mega_verifier(engine, speculation.draft_tokens)
        else:
            cache = KVCache(engine.spec, 1, size, engine.dtype, dev)
        for start in range(0, len(p), chunk):
            logits = prefill_chunk(model, p[start:start + chunk], start, cache, 0,
                                   last_logits=start + chunk >= len(p))
        params = r.params
        # a sampled request on the megakernel draws by the kernel's rule and keys, its first token too (coupled.py)
        coupled = mega and params.in_kernel
        if coupled:
            first = gumbel.sample_one(logits.float().cpu().numpy(), params.temperature, r.seed, len(p) - 1,
                                      params.top_k, params.top_p)
        else:
            first = int(sample(logits[None].cpu(), params.temperature, params.top_k, params.top_p, r.generator)[0])
        yield seq.append(first)
        if seq.finished:
            continue

        def verify(tokens: torch.Tensor, position: int, cache=cache) -> torch.Tensor:
            return model.forward(tokens.to(dev), torch.tensor([position], device=dev), cache)

        if mega:
            verify = _mega_verify(decoder, speculation.draft_tokens + 1, model, (params, r.seed) if coupled else None)

        draft, accept = speculation.functions(r, coupled=coupled)
        for tok in speculative_decode(verify, draft, accept, list(p) + [first], first, len(p), seq.max_new_tokens,
                                      size, speculation.draft_tokens, eos=seq.eos_ids, stats=stats):
            yield seq.append(tok)
            if seq.finished:     # a stop string ends it before the draft's last tokens
                break
