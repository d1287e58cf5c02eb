"""A draft model: a small model of the target's tokenizer over a KV cache of its own, proposing up to K tokens a
pass (greedily; sampled with the request's parameters, its distributions q returned for the acceptance rule; or
drawn by the in-kernel sampler's keys, coupled.py). Its cache keeps the tokens whose K/V it holds; a call finds
where the new context leaves them (rejected drafts, a new prompt) and computes only the rest: positions decide,
nothing is cleared. The context it has not seen goes through the reference model's prefill; each draft token
after that is one decode step, of its own megakernel (batch 1, a cache of fixed size) where the target runs on
the megakernel, else of the reference model. On the megakernel the last few unseen context tokens are such steps
too (a pass leaves a few), so every draft is the kernel's own choice."""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from .. import gumbel
from ..errors import InputError
from ..models.weights import PackedWeights
from ..reference.model import ReferenceModel
from ..runtime.kv_cache import KVCache
from ..runtime.prefill import chunk_size, prefill_chunk
from ..runtime.sampling import SamplingParams, probabilities

PREFIX = "model:"
MEGA_CATCH_UP = 16     # unseen context tokens a megakernel drafter decodes step by step rather than prefills


def draft_source(method: str) -> str | None:
    """`model:PATH` -> PATH as the model loader reads it (`model:default` -> None, the default model)."""
    path = method.removeprefix(PREFIX)
    if not path:
        raise InputError("speculative='model:' names no draft model: give model:PATH (a checkpoint dir, a .gguf, "
                         "preset:NAME or default)")
    return None if path == "default" else path


def check_same_tokenizer(target_vocab: int, target_tok, draft_vocab: int, draft_tok, draft_name: str) -> None:
    """A draft token must mean to the target what it means to the drafter: the same vocabulary size and, where
    the models have tokenizers, the same token for every id."""
    if target_vocab != draft_vocab:
        raise InputError(f"draft model {draft_name!r} has a vocabulary of {draft_vocab} tokens but the target has "
                         f"{target_vocab}: a draft model needs the target's tokenizer")
    if (target_tok is None) != (draft_tok is None):
        has, lacks = ("the target", "the draft model") if draft_tok is None else ("the draft model", "the target")
        raise InputError(f"{has} has a tokenizer and {lacks} ({draft_name!r}) has none: their token ids cannot be "
                         "shown to mean the same; use a draft model with the target's tokenizer")
    if target_tok is not None:
        a, b = target_tok._tok.get_vocab(with_added_tokens=True), draft_tok._tok.get_vocab(with_added_tokens=True)
        if a != b:
            ta, tb = ({i: t for t, i in v.items()} for v in (a, b))
            i = min(i for i in ta.keys() | tb.keys() if ta.get(i) != tb.get(i))
            raise InputError(f"draft model {draft_name!r} has another tokenizer than the target ({len(b)} vs "
                             f"{len(a)} tokens; id {i} is {tb.get(i)!r} to it, {ta.get(i)!r} to the target): a "
                             "draft model needs the target's tokenizer")


class DraftModel:
    def __init__(self, weights: PackedWeights, tokenizer=None, name: str | None = None, mega_positions: int | None = None):
        """mega_positions: decode the drafts on a megakernel of the drafter's own over a cache of that many
        positions (the target's context and a draft), built at the first call; None: on the reference model."""
        self.model, self.tokenizer = ReferenceModel(weights), tokenizer
        self.spec, self.name = weights.spec, name or weights.spec.name
        self.cache: KVCache | None = None
        self.cached: list[int] = []      # tokens whose K/V are valid at positions 0 .. len - 1
        self.mega_positions = None if mega_positions is None else min(mega_positions, self.spec.max_position_embeddings)
        self.mega = None                 # the drafter's MegaDecoder, once built
        self.notice: str | None = None   # why the drafts decode on the reference model, where the megakernel failed

    @classmethod
    def load(cls, method: str, target) -> "DraftModel":
        """The drafter of `model:PATH` for `target` (an Engine), in its device and dtype, dense; on the megakernel
        where the target runs on it (a cache of the target's max_seq plus the longest draft)."""
        from ..models.load import load_model
        from .run import MAX_DRAFT_TOKENS

        m = load_model(draft_source(method), dtype=target.dtype, device=target.device, weights="dense")
        check_same_tokenizer(target.spec.vocab_size, target.tokenizer, m.spec.vocab_size, m.tokenizer, m.name)
        mega = target.max_seq + MAX_DRAFT_TOKENS + 1 if getattr(target, "engine", None) == "mega" else None
        return cls(m.weights, m.tokenizer, m.name, mega_positions=mega)

    def _reserve(self, positions: int) -> int:
        """A cache of at least `positions` (within the drafter's own limit); its size. On the megakernel the cache
        is allocated once, of mega_positions, with its decoder (a kernel is built for one cache length)."""
        if self.mega_positions is not None:
            return self._reserve_mega()
        limit = self.spec.max_position_embeddings
        if self.cache is None or self.cache.max_seq < min(positions, limit):
            size = min(limit, max(positions, 2 * (self.cache.max_seq if self.cache else 0), 256))
            self.cache, self.cached = None, []     # release the old one first
            w = self.model.w
            self.cache = KVCache(self.spec, 1, size, w.dtype, w.device)
        return self.cache.max_seq

    def _reserve_mega(self) -> int:
        if self.cache is None:
            from ..errors import MonokernelError
            from ..runtime.mega import MegaDecoder

            w = self.model.w
            self.cache, self.cached = KVCache(self.spec, 1, self.mega_positions, w.dtype, w.device), []
            try:
                self.mega = MegaDecoder(w, self.cache)
            except (ImportError, MonokernelError) as e:    # the drafts then decode on the reference model
                self.notice = f"draft model {self.name!r} decodes on the reference engine: {str(e).splitlines()[0]}"
                print(f"monokernel: {self.notice}", file=sys.stderr)
        return self.cache.max_seq

    def _decode(self, token: int, position: int) -> tuple[torch.Tensor, int | None]:
        """The drafter's logits (V,) after `token` at `position`, its K/V written into the cache, and on the
        megakernel the token it chose (its argmax, or its draw under the sampling words _run set)."""
        if self.mega is None:
            return prefill_chunk(self.model, [token], position, self.cache, 0), None
        dev = self.cache.k.device
        chosen, logits = self.mega.step(torch.tensor([token], device=dev), torch.tensor([position], device=dev))
        return logits[0], int(chosen[0])

    @torch.no_grad()
    def _run(self, context: Sequence[int], k: int, choose, sampling: tuple | None = None) -> list[int]:
        """Up to k drafts after `context`, each `choose(logits, position of the input row, the decoder's own
        choice or None)`; `sampling` (SamplingParams, seed): the megakernel's in-kernel sampling, None greedy."""
        size = self._reserve(len(context) + k)
        k = min(k, size - len(context) + 1)      # drafts 1 .. k-1 are fed back at positions len .. len + k - 2
        if k < 1:
            return []
        n = 0                                    # reuse the cached prefix the context still agrees with
        for a, b in zip(self.cached, context[:-1]):
            if a != b:
                break
            n += 1
        drawn = None
        if self.mega is not None:
            # the few tokens a pass leaves unseen (the accepted drafts and the target's own) go through the kernel
            # one at a time, far cheaper than the reference model's prefill; the last one's choice comes back
            p, seed = sampling if sampling else (None, 0)
            self.mega.set_sampling([p.temperature if p else 0.0], [seed], [p.top_k if p else None],
                                   [p.top_p if p else None])
            stepped = max(n, len(context) - MEGA_CATCH_UP)
        else:
            stepped = len(context)
        chunk = chunk_size(self.model.w.device)
        for start in range(n, stepped, chunk):
            logits = prefill_chunk(self.model, list(context[start:min(start + chunk, stepped)]), start, self.cache, 0,
                                   last_logits=start + chunk >= stepped)
        for j in range(stepped, len(context)):
            logits, drawn = self._decode(context[j], j)
        out = []
        for i in range(k):
            out.append(choose(logits, len(context) - 1 + i, drawn))
            if i < k - 1:
                logits, drawn = self._decode(out[-1], len(context) + i)
        self.cached = list(context) + out[:-1]
        return out

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k greedy draft tokens after `context` (the greedy Drafter)."""
        return self._run(context, k, lambda logits, position, drawn: int(logits.argmax()) if drawn is None else drawn)

    def coupled(self, params: SamplingParams, seed: int):
        """A verify.Draft whose drafts are drawn by the in-kernel sampler's rule (`params`: temperature, top-k,
        top-p) and keys (seed, position) on the drafter's own logits (coupled.py): in its megakernel, else by the
        sampler's numpy model. q is moot (None)."""
        def choose(logits, position, drawn):
            if drawn is not None:
                return drawn
            return gumbel.sample_one(logits.float().cpu().numpy(), params.temperature, seed, position, params.top_k,
                                     params.top_p)

        def draft(context: Sequence[int], k: int) -> tuple[list[int], None]:
            return self._run(context, k, choose, (params, seed)), None
        return draft

    def sampler(self, params: SamplingParams, generator: torch.Generator | None):
        """A verify.Draft that samples with `params` from `generator` and returns its distributions q."""
        def draft(context: Sequence[int], k: int) -> tuple[list[int], torch.Tensor | None]:
            rows = []

            def choose(logits, position, drawn):
                rows.append(probabilities(logits[None].float().cpu(), params.temperature, params.top_k,
                                          params.top_p)[0])
                return int(torch.multinomial(rows[-1], 1, generator=generator))
            tokens = self._run(context, k, choose)
            return tokens, torch.stack(rows) if rows else None
        return draft
