"""The request-level engine: requests come and go while a fixed batch of B slots decodes (continuous batching).

    sched = Scheduler(engine, max_batch=4)
    rid = sched.add_request("Hello", SamplingParams(max_new_tokens=8))
    while sched.has_work:
        for ev in sched.step(): print(ev.request_id, ev.text, ev.finish_reason)

Every step runs the decoder over all B slots, so the batch shape (and a megakernel compiled for B) never
changes. A slot with no decoding request (free, or still prefilling) feeds a pad token at the first position
past its valid K/V: that write lands where nothing valid lives, its output is ignored, and the decoder needs
no notion of an empty row. Positions decide what attention reads, so a slot's old K/V never leak into a new
request: its prefill overwrites every position the request will read.

A step admits waiting requests into free slots, prefills at most one chunk of prompt positions (prefill.CHUNK,
over one or several prompts: the bound on how long prefill stalls the running decodes), then one decode step.
A free slot keeps the tokens its last request left cached; a new request whose prompt starts with them (the next
turn of the same chat) takes that slot and prefills only the rest.

On a decoder that samples in the kernel (the megakernel: `samples_in_kernel`, `set_sampling`), a sampled
request (SamplingParams.in_kernel: temperature > 0, with or without top-k / top-p) is drawn there by the
Gumbel-max trick with its seed (monokernel/gumbel.py; a row the kernel cannot draw exactly, the decoder draws
by the same rule), its first token by the same rule on the host; greedy requests take the argmax, and every
request on the reference decoder is sampled on the host from the logits as before (runtime/sampling.py).
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING, Callable, Sequence as Seq

import torch

from ..errors import InputError
from .decoders import Decoder
from .prefill import chunk_size, prefill_chunk
from .requests import Request, RequestEvent
from .sampling import SamplingParams
from .sequence import Generation, Sequence

if TYPE_CHECKING:
    from .engine import Engine

PAD_TOKEN = 0        # any valid id: a pad row's K/V land past its slot's valid positions and its output is dropped
ROLES = ("system", "user", "assistant")


@dataclass
class SchedulerStats:
    steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0      # prompt positions computed
    reused_tokens: int = 0       # prompt positions found cached in a slot (prefix reuse) and not computed
    generated_tokens: int = 0
    aborted: int = 0
    failures: int = 0            # steps that raised (their requests got an error event, the engine was reset)


class Scheduler:
    def __init__(self, engine: "Engine", max_batch: int = 8, *, prefill_chunk_size: int | None = None,
                 max_positions: int | None = None, wrap_decoder: Callable[[Decoder], Decoder] | None = None,
                 speculative: Callable[["Scheduler", list[Request]], list[RequestEvent]] | None = None):
        """max_positions: KV-cache positions per slot (default, and always for the megakernel: engine.max_seq);
        wrap_decoder: applied to every decoder built (at start and after a failed step's reset), a test hook
        for fault injection; speculative: replaces the batched decode step (speculative.scheduled: a verify
        pass per decoding request, which may yield several tokens of it in one step)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch={max_batch!r} must be an integer >= 1")
        chunk = chunk_size(engine.device) if prefill_chunk_size is None else prefill_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"prefill_chunk_size={prefill_chunk_size!r} must be an integer >= 1")
        self.engine, self.batch, self.chunk = engine, max_batch, chunk
        self.max_seq = engine.max_seq if max_positions is None else min(max_positions, engine.max_seq)
        self.wrap_decoder, self.speculative = wrap_decoder, speculative
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_batch
        self.cached: list[list[int]] = [[] for _ in range(max_batch)]   # tokens valid in each free slot
        self.live: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._build()

    def _build(self) -> None:
        # a speculative hook may want positions past the context (the megakernel's verify step pads its rows)
        extra = getattr(self.speculative, "extra_positions", 0)
        self.cache, decoder, self.kind = self.engine.make_decoder(self.batch, self.max_seq, extra)
        self.max_seq = self.cache.max_seq - extra   # a megakernel's cache holds the engine's whole max_seq
        self.decoder = self.wrap_decoder(decoder) if self.wrap_decoder else decoder
        self._sampling_rows: list[Request | None] | None = None   # what the new decoder's sampling was set for
        # a speculative step verifies on its own: in-kernel sampling where it draws by the kernel's keys too
        self.samples_in_kernel = bool(getattr(self.decoder, "samples_in_kernel", False)) and (
            self.speculative is None or (self.kind == "mega" and getattr(self.speculative, "samples_in_kernel", False)))

    # ---- Requests in ---------------------------------------------------------------------------
    def make_request(self, prompt: str | Seq[int] | None = None, params: SamplingParams | None = None, *,
                     messages: list[dict] | None = None, request_id: str | None = None,
                     logprobs: int | None = None, ignore_eos: bool = False) -> Request:
        """A checked request, not yet queued (reads nothing the step loop writes: another thread may call it).
        logprobs: None, or k >= 0 to report the chosen token's log-probability and the k most likely;
        ignore_eos: run to max_new_tokens (or a stop string) past any end-of-sequence token (benchmarks)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, not {type(params).__name__}")
        ids = self.encode(prompt, messages)
        n, limit = params.max_new_tokens, self.max_seq
        if len(ids) >= limit:
            raise InputError(f"the prompt has {len(ids)} tokens but the context holds {limit} (max_seq={limit}): "
                             "shorten the prompt")
        if len(ids) + n > limit:
            raise InputError(f"the prompt has {len(ids)} tokens and max_new_tokens={n}: {len(ids) + n} positions, "
                             f"but the context holds {limit} (max_seq={limit}); lower max_new_tokens to at most "
                             f"{limit - len(ids)} or shorten the prompt")
        if params.stop and self.engine.tokenizer is None:
            raise InputError(f"stop strings need a tokenizer; model {self.engine.name!r} has none")
        tok = self.engine.tokenizer
        eos = frozenset() if ignore_eos else frozenset(self.engine.eos_token_ids)
        seq = Sequence(0, ids, n, eos, params.stop, tok.stream() if tok else None)
        return Request(request_id or f"req-{next(self._ids)}", ids, params, seq, logprobs=logprobs)

    def encode(self, prompt: str | Seq[int] | None, messages: list[dict] | None) -> list[int]:
        tok, V = self.engine.tokenizer, self.engine.spec.vocab_size
        if (prompt is None) == (messages is None):
            raise InputError("give either a prompt (text or token ids) or chat messages")
        if messages is not None:
            if tok is None:
                raise InputError(f"model {self.engine.name!r} has no tokenizer, so no chat template: send a prompt")
            _check_messages(messages)
            # as transformers' apply_chat_template(tokenize=True): the template writes any BOS itself
            return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        if isinstance(prompt, str):
            if tok is None:
                raise InputError(f"model {self.engine.name!r} has no tokenizer: send token ids")
            if not prompt:
                raise InputError("the prompt is empty")
            return tok.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InputError("the prompt must be a non-empty string or list of token ids")
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < V), None)
        if bad is not None:
            raise InputError(f"the prompt holds token id {bad!r}, outside the vocabulary 0..{V - 1}")
        return [int(t) for t in prompt]

    def submit(self, request: Request) -> str:
        if request.id in self.live:
            raise InputError(f"request id {request.id!r} is already in use")
        self.live[request.id] = request
        self.waiting.append(request)
        return request.id

    def add_request(self, prompt: str | Seq[int] | None = None, params: SamplingParams | None = None, *,
                    messages: list[dict] | None = None, request_id: str | None = None,
                    logprobs: int | None = None) -> str:
        return self.submit(self.make_request(prompt, params, messages=messages, request_id=request_id,
                                             logprobs=logprobs))

    def abort(self, request_id: str) -> bool:
        """Drops a request wherever it is; its slot is free for the next step. False when it is not live."""
        r = self.live.pop(request_id, None)
        if r is None:
            return False
        if r.slot is None:
            self.waiting.remove(r)
        else:
            self._release(r)
        r.seq.finish_reason = "abort"
        self.stats.aborted += 1
        return True

    # ---- State -----------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # ---- The step --------------------------------------------------------------------------------
    def step(self) -> list[RequestEvent]:
        """Admits, prefills one chunk, decodes one token for every decoding request. A failure inside ends every
        request in a slot with an error event and resets the engine; waiting requests stay queued."""
        self.stats.steps += 1
        self._admit()
        events: list[RequestEvent] = []
        try:
            events += self._prefill()
            events += self._decode()
        except Exception as e:   # noqa: BLE001 - any failure of a step must leave a working engine behind
            events += self._fail(e)
        return events

    def _admit(self) -> None:
        if not self.waiting:
            return
        free = [s for s, r in enumerate(self.slots) if r is None]
        while self.waiting and free:
            r = self.waiting.popleft()
            # the slot whose cached tokens share the longest prefix with the prompt (at least the prompt's last
            # token is prefilled, for its logits); among equals the one caching least, keeping longer
            # conversations for their next turn
            reuse, _, slot = max((min(_common_prefix(self.cached[s], r.prompt_ids), len(r.prompt_ids) - 1),
                                  -len(self.cached[s]), s) for s in free)
            free.remove(slot)
            r.slot, r.prefilled, r.reused = slot, reuse, reuse
            r.in_kernel = self.samples_in_kernel and r.params.in_kernel
            self.slots[slot] = r
            self.stats.reused_tokens += reuse

    def _prefill(self) -> list[RequestEvent]:
        """Prefills up to `self.chunk` prompt positions in all, oldest request first: one long prompt advances a
        chunk, several short ones may all finish in one step; either way the step's stall stays bounded."""
        events, budget = [], self.chunk
        pending = sorted((r for r in self.slots if r is not None and r.prefilled < len(r.prompt_ids)),
                         key=lambda q: q.arrival)
        for r in pending:
            if budget == 0:
                break
            start = r.prefilled
            tokens = r.prompt_ids[start:start + budget]
            last = start + len(tokens) == len(r.prompt_ids)
            logits = prefill_chunk(self.engine.model, tokens, start, self.cache, r.slot, last_logits=last)
            r.prefilled += len(tokens)
            budget -= len(tokens)
            self.stats.prefill_tokens += len(tokens)
            if last:
                events.append(self._choose(r, logits))
        return events

    def _decode(self) -> list[RequestEvent]:
        B = self.batch
        running, tokens, positions, drawn = [], [PAD_TOKEN] * B, [0] * B, [None] * B
        for s, r in enumerate(self.slots):   # one pass: a step's host work grows with the batch
            if r is None:
                positions[s] = len(self.cached[s])
            elif r.decoding:
                running.append(r)
                tokens[s], positions[s] = r.seq.token_ids[-1], r.next_position
                if r.in_kernel:
                    drawn[s] = r
            else:
                positions[s] = r.prefilled
        if not running:
            return []
        if self.speculative is not None:
            self.stats.decode_steps += 1
            return self.speculative(self, running)
        if self.samples_in_kernel:
            self._set_sampling(drawn)
        ids = torch.tensor([tokens, positions], device=self.engine.device)   # one copy to the device for both
        chosen, logits = self.decoder.step(ids[0], ids[1])
        chosen = chosen.tolist()   # one copy to the host for every greedy or in-kernel sampled row
        self.stats.decode_steps += 1
        return [self._choose(r, logits[r.slot] if r.reads_logits else None, chosen[r.slot]) for r in running]

    def _set_sampling(self, drawn: list[Request | None]) -> None:
        """The decoder's sampling for the rows `drawn` names (an in-kernel request, else greedy). Its arguments
        follow from the requests alone (params and seed never change), so they are built and handed over only
        when a row changes: most steps run the same requests as the last."""
        if drawn == self._sampling_rows:
            return
        self.decoder.set_sampling([0.0 if r is None else r.params.temperature for r in drawn],
                                  [0 if r is None else r.seed for r in drawn],
                                  [None if r is None else r.params.top_k for r in drawn],
                                  [None if r is None else r.params.top_p for r in drawn])
        self._sampling_rows = drawn

    def _choose(self, r: Request, logits: torch.Tensor | None, token: int | None = None) -> RequestEvent:
        return self.took(r, r.choose(logits, token))

    def took(self, r: Request, ev: RequestEvent) -> RequestEvent:
        """Counts the token `ev` appended to `r` (by Request.choose or .take), and frees r's slot if it ended."""
        self.stats.generated_tokens += 1
        if ev.finished:
            self.live.pop(r.id, None)
            self._release(r)
        return ev

    def _release(self, r: Request) -> None:
        # the pad row of a free slot writes at len(cached): keep that inside the cache
        self.cached[r.slot] = r.cached_tokens()[:self.max_seq - 1]
        self.slots[r.slot] = None

    def _fail(self, error: Exception) -> list[RequestEvent]:
        self.stats.failures += 1
        events = []
        for r in self.slots:
            if r is not None:
                self.live.pop(r.id, None)
                r.seq.finish_reason = "error"
                events.append(RequestEvent(r.id, None, "", "error", error=error))
        self.reset()
        return events

    def reset(self) -> None:
        """Empty slots, nothing cached, a fresh decoder (a failed kernel may leave its counters anywhere)."""
        for r in self.slots:
            if r is not None:
                self.live.pop(r.id, None)
        self.slots = [None] * self.batch
        self.cached = [[] for _ in range(self.batch)]
        self.decoder = None
        self._build()

    # ---- Convenience -----------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | None = None) -> list[Generation]:
        """Runs the prompts to completion (with whatever else is queued) and returns their generations in order."""
        reqs = [self.make_request(p, params) for p in prompts]
        for r in reqs:
            self.submit(r)
        while any(not r.finished for r in reqs):
            for ev in self.step():
                if ev.error is not None and ev.request_id in {r.id for r in reqs}:
                    raise ev.error
        return [r.seq.result() for r in reqs]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
