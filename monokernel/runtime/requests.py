"""One request of the request-level engine: its prompt, sampling, generation state, timings, and the events
the engine's step() hands back for it."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .. import gumbel
from .sampling import SamplingParams, sample
from .sequence import Sequence


@dataclass(frozen=True)
class RequestEvent:
    """What one step produced for one request: a token (with the text it released), or an error."""

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None               # "eos", "stop", "length", "abort" or "error" on the last event
    logprob: float | None = None            # of the chosen token, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: BaseException | None = None      # set when finish_reason == "error": the step that failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    seq: Sequence
    logprobs: int | None = None             # None: none; 0: the chosen token's; k: and the k most likely
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    slot: int | None = None
    prefilled: int = 0                      # prompt positions whose K/V are in the slot
    reused: int = 0                         # of those, positions found cached in the slot (not computed)
    generator: torch.Generator | None = None
    seed: int | None = None                 # what seeds the sampler: the params' seed, or a fresh random one
    # Drawn by the decoder's in-kernel sampler (Gumbel-max with top-k/top-p, monokernel/gumbel.py) rather than
    # by torch.multinomial: set by the Scheduler for a sampled request on a decoder that samples, before its
    # first token
    in_kernel: bool = False

    def __post_init__(self):
        if not self.params.greedy:
            # unseeded: a fresh random seed, so no request draws from (or disturbs) torch's global generator
            seed = self.params.seed if self.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.seed = seed
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def finished(self) -> bool:
        return self.seq.finished

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.prefilled == len(self.prompt_ids) and not self.finished

    @property
    def next_position(self) -> int:
        """The position of the last sampled token, fed to the next decode step."""
        return len(self.prompt_ids) + len(self.seq.token_ids) - 1

    @property
    def reads_logits(self) -> bool:
        """Whether choose() reads the logits row beside the decoder's own token: for logprobs, or to sample on
        the host. Otherwise the row may be None (the Scheduler then leaves the batch's logits untouched)."""
        return self.logprobs is not None or not (self.params.greedy or self.in_kernel)

    def choose(self, logits: torch.Tensor | None, token: int | None = None) -> RequestEvent:
        """Samples the next token from this request's logits row (V,) fp32 and appends it; `token`: the
        decoder's own choice for the row, already on the host: its argmax, taken when the request is greedy,
        or its in-kernel draw, taken when `in_kernel`. An in-kernel request without one (its first token,
        from the prefill's logits) is drawn here by the kernel's rule at the row's position, so its whole
        stream follows one rule and one seed. `logits` may be None where a token is given and not
        `reads_logits`."""
        p = self.params
        if p.greedy and self.logprobs is None:
            return self.take(int(logits.argmax()) if token is None else token)
        if self.in_kernel:
            if token is None:
                row = logits.float().cpu()
                token = gumbel.sample_one(row.numpy(), p.temperature, self.seed, self.next_position, p.top_k, p.top_p)
            return self.take(token, logits if self.logprobs is not None else None)
        row = logits.cpu()   # the generator lives on the CPU: the same draws on every device
        return self.take(int(sample(row[None], p.temperature, p.top_k, p.top_p, self.generator)[0]), row)

    def take(self, token: int, logits: torch.Tensor | None = None) -> RequestEvent:
        """Appends `token`, chosen by choose() or by a speculative pass; `logits` (V,), the row it was chosen
        from, gives the logprobs where the request asked for them."""
        lp, top = None, ()
        if self.logprobs is not None:
            logp = logits.float().cpu().log_softmax(-1)
            lp = float(logp[token])
            if self.logprobs:
                values, ids = logp.topk(self.logprobs)
                top = tuple(zip(ids.tolist(), values.tolist()))
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        text, reason = self.seq.add(token)
        if reason:
            self.finished_at = now
        return RequestEvent(self.id, token, text, reason, lp, top)

    def cached_tokens(self) -> list[int]:
        """Tokens whose K/V this request left valid in its slot: the prompt prefilled so far and every generated
        token but the last (a token's K/V are written by the step that reads it as input)."""
        if self.prefilled < len(self.prompt_ids):
            return self.prompt_ids[:self.prefilled]
        return self.prompt_ids + self.seq.token_ids[:-1]
