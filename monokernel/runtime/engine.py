"""Engine: prompts in, text out. Prefill through the reference PyTorch forward, then one decoder step per token.

    engine = Engine.load()                                  # default model, best engine for this machine
    [g] = engine.generate("The capital of France is", max_new_tokens=12)
    params = SamplingParams(temperature=0.7, seed=0, max_new_tokens=8)
    for ev in engine.stream(["Hi", "Hello"], params): print(ev.index, ev.text)

Prefill runs over the right-padded batch starting at position 0; padded rows write junk K/V only at
positions each sequence's decode steps overwrite before reading (the attention mask never looks ahead).
Decode steps feed every sequence at its own position; a finished sequence keeps stepping (its output is
ignored) so the batch shape, and with it a compiled megakernel, stays fixed for the whole request.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from numbers import Integral
from typing import Iterator, Sequence as Seq

import torch

from ..errors import EngineBusy, InputError, InsufficientMemory, MonokernelError
from ..models.formats import get_format, quantize_format
from ..models.weights import PackedWeights
from ..reference.model import ReferenceModel
from .decoders import Decoder, ReferenceDecoder
from .kv_cache import KVCache
from .memory import GB, available_bytes, check_fits, estimate_memory, kv_cache_bytes, prefill_chunk, workspace_bytes
from .sampling import SamplingParams, sample
from .sequence import Generation, Sequence, TokenEvent

ENGINES = ("auto", "mega", "reference")
DEFAULT_MAX_SEQ = 4096          # KV-cache positions: 512 MiB of bf16 K+V per sequence on Llama-3.1-8B
PREFILL_PROGRESS_CHUNKS = 4     # a CPU prefill of more chunks than this shows a progress bar
LOOKAHEAD = 2                   # decode steps queued ahead of the host: the GPU never waits for Python


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a device name ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={str(device)!r} requested but no CUDA device is available; use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: bf16 on CUDA (what the megakernel runs), fp32 on CPU (CPU bf16 matmuls are slow)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    f = get_format(dtype)
    if f.quantised:
        raise InputError(f"dtype={f.name!r} is a weight format, not an activation type: quantise with "
                         f"weights={f.name!r} (the CLI's --quantize {f.name}) and compute in bf16, fp16 or fp32")
    return f.torch_dtype


@dataclass
class GenerationStats:
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0          # tokens kept in the outputs (finished sequences' extra steps not counted)
    prefill_s: float = 0.0
    decode_s: float = 0.0        # wall clock from the end of prefill to the last token, as the caller saw it
    decode_steps: int = 0        # steps launched (finished sequences ride along)
    engine: str = ""

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.prefill_s + self.decode_s:.2f} s: {self.tokens_per_s:.1f} tokens/s "
                f"(batch {self.batch}, {self.engine} engine; prefill {self.prompt_tokens} tokens in "
                f"{1e3 * self.prefill_s:.0f} ms, decode {self.ms_per_step:.2f} ms/step)")


class Engine:
    def __init__(self, weights: PackedWeights, tokenizer=None, *, engine: str = "auto", max_seq: int | None = None,
                 name: str | None = None):
        self.weights, self.tokenizer, self.spec = weights, tokenizer, weights.spec
        self.name = name or self.spec.name
        self.device, self.dtype = weights.device, weights.dtype
        self.model = ReferenceModel(weights)
        limit = self.spec.max_position_embeddings
        self.max_seq = _max_seq(max_seq, limit)
        self.eos_token_ids: tuple[int, ...] = tuple(tokenizer.eos_token_ids if tokenizer else self.spec.eos_token_ids)
        self.last_stats = GenerationStats()
        # on the CPU a step computes as it is called: running ahead would only waste steps
        self.lookahead = LOOKAHEAD if self.device.type == "cuda" else 0
        self._slot: tuple[str, int, KVCache, Decoder] | None = None   # (kind, batch, cache, decoder)
        # One request at a time: a request owns the KV cache and the decoder from its prefill to its last token
        # (held by the generator of Engine._run, released when it finishes or is closed).
        self._busy = threading.Lock()
        self.progress: bool | None = None   # a progress bar for long CPU prefills; None: when stderr is a terminal
        if engine not in ENGINES:
            raise InputError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.requested = engine
        self.notice: str | None = None     # why "auto" chose the reference engine, if it did
        self.engine = "reference" if engine == "reference" else self._try_mega()

    @classmethod
    def load(cls, model: str | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, engine: str = "auto", max_seq: int | None = None,
             seed: int = 0, quiet: bool = False, weights: str | None = None) -> "Engine":
        """`model`: None (the default model), "preset:NAME" (random weights), a checkpoint dir or a .gguf file.
        `weights`: as models.load.load_model (None: the checkpoint's own storage, "dense", or a --quantize
        format). None on a GPU with engine "auto"/"mega" loads dense, as the megakernel reads no packed format
        yet (issue 18's kernel half); the reference engine computes from packed weights."""
        from ..models.load import load_model, load_spec, resolve_model

        # everything that can be checked without the weights is, so a typo or a model too big costs no load
        device = resolve_device(device)
        if engine not in ENGINES:
            raise InputError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        dtype = resolve_dtype(dtype, device)
        source = resolve_model(model)
        spec = load_spec(source)
        limit = spec.max_position_embeddings
        if weights is None and device.type == "cuda" and engine != "reference":
            weights = "dense"
        quantised = weights not in (None, "dense")
        check_fits(estimate_memory(spec, dtype, 1, _max_seq(max_seq, limit), device,
                                   weights=quantize_format(weights) if quantised else None),
                   device, str(source), max_seq_limit=limit)
        loaded = load_model(source, dtype=dtype, device=device, seed=seed, weights=weights)
        eng = cls(loaded.weights, loaded.tokenizer, engine=engine, max_seq=max_seq, name=loaded.name)
        if eng.notice and not quiet:
            print(f"monokernel: using the reference engine: {eng.notice}", file=sys.stderr)
        return eng

    @classmethod
    def from_weights(cls, weights: PackedWeights, tokenizer=None, *, engine: str = "reference",
                     max_seq: int | None = None) -> "Engine":
        return cls(weights, tokenizer, engine=engine, max_seq=max_seq)

    # ---- Back ends -----------------------------------------------------------------------------
    def _try_mega(self) -> str:
        """Builds the batch-1 megakernel now, so that "auto" can explain a fallback at load time."""
        if self.device.type != "cuda":
            if self.requested == "mega":
                raise MonokernelError(f"engine 'mega' needs a CUDA device; the weights are on {self.device}")
            self.notice = f"no CUDA device (the weights are on {self.device})"
            return "reference"
        try:
            self._decoder_for(1, self.max_seq, "mega")
            return "mega"
        except (ImportError, MonokernelError) as e:
            if self.requested == "mega":
                raise _unavailable(e) from e
            self.notice = f"the megakernel is unavailable: {str(e).splitlines()[0]}"
            return "reference"

    def _decoder_for(self, batch: int, positions: int, kind: str) -> tuple[KVCache, Decoder]:
        """A KV cache and a decoder for this batch size; reused while it fits (a megakernel bakes the batch
        and max_seq in, so its cache always holds max_seq; the reference one grows as requests need)."""
        if self._slot and self._slot[:2] == (kind, batch) and self._slot[2].max_seq >= positions:
            return self._slot[2:]
        size = self.max_seq if kind == "mega" else min(self.max_seq, -(-positions // 256) * 256)
        self._check_memory(batch, size)
        self._slot = None                 # release the old cache before allocating the new one
        cache = KVCache(self.spec, batch, size, self.dtype, self.device)
        if kind == "mega":
            from .mega import MegaDecoder

            decoder: Decoder = MegaDecoder(self.weights, cache)
        else:
            decoder = ReferenceDecoder(self.model, cache)
        self._slot = (kind, batch, cache, decoder)
        return cache, decoder

    def _check_memory(self, batch: int, size: int) -> None:
        """A new KV cache (and a request's workspace) must fit in what is free once the old cache is released."""
        free = available_bytes(self.device)
        if free is None:
            return
        old = 0 if self._slot is None else 2 * self._slot[2].k.numel() * self._slot[2].k.element_size()
        need = kv_cache_bytes(self.spec, batch, size, self.dtype) + workspace_bytes(self.spec, batch, size, self.device.type)
        if need > free + old:
            raise InsufficientMemory(
                f"{batch} sequences of up to {size} positions need {need / GB:.1f} GB (KV cache and workspace) but "
                f"{free / GB + old / GB:.1f} GB are free; send fewer prompts at once, shorter ones, or a smaller "
                f"max_new_tokens")

    def _decoder(self, batch: int, positions: int) -> tuple[tuple[KVCache, Decoder], str]:
        if self.engine == "mega":
            try:
                return self._decoder_for(batch, positions, "mega"), "mega"
            except (ImportError, MonokernelError) as e:
                if self.requested == "mega":
                    raise _unavailable(e) from e
                print(f"monokernel: batch {batch} runs on the reference engine: {str(e).splitlines()[0]}",
                      file=sys.stderr)
        return self._decoder_for(batch, positions, "reference"), "reference"

    # ---- Public API --------------------------------------------------------------------------------
    def generate(self, prompts: str | Seq[str], params: SamplingParams | None = None, *, chat: bool = False,
                 **overrides) -> list[Generation]:
        """`params` (default: SamplingParams()) with any of its fields given as keywords on top."""
        params = _sampling(params, overrides)
        return self.generate_ids(self.encode_prompts(prompts, chat), params)

    def generate_ids(self, prompt_ids: Seq[Seq[int]], params: SamplingParams | None = None,
                     **overrides) -> list[Generation]:
        seqs, events = self._start(prompt_ids, _sampling(params, overrides))
        for _ in events:
            pass
        return [s.result() for s in seqs]

    def stream(self, prompts: str | Seq[str], params: SamplingParams | None = None, *, chat: bool = False,
               **overrides) -> Iterator[TokenEvent]:
        """Per-token events, in step order. Arguments are checked here, before the first event is asked for."""
        params = _sampling(params, overrides)
        return self.stream_ids(self.encode_prompts(prompts, chat), params)

    def stream_ids(self, prompt_ids: Seq[Seq[int]], params: SamplingParams | None = None,
                   **overrides) -> Iterator[TokenEvent]:
        return self._start(prompt_ids, _sampling(params, overrides))[1]

    def encode_prompts(self, prompts: str | Seq[str], chat: bool = False) -> list[list[int]]:
        if self.tokenizer is None:
            raise InputError(f"model {self.name!r} has no tokenizer (e.g. a preset): pass token ids to generate_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("prompts must be a string or a non-empty list of strings")
        out = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InputError(f"prompt {i} is a {type(p).__name__}, not a string")
            if not p:
                raise InputError(f"prompt {i} is empty")
            if chat:   # as transformers' apply_chat_template(tokenize=True): the template writes any BOS itself
                out.append(self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                                 add_special_tokens=False))
            else:
                out.append(self.tokenizer.encode(p))
        return out

    # ---- The generation loop -----------------------------------------------------------------------
    def _start(self, prompt_ids, params: SamplingParams):
        prompt_ids = self._check_ids(prompt_ids)
        if params.stop and self.tokenizer is None:
            raise InputError(f"stop strings need a tokenizer; model {self.name!r} has none")
        n = params.max_new_tokens
        limit = self.spec.max_position_embeddings
        for i, p in enumerate(prompt_ids):
            if len(p) + n > self.max_seq:
                fix = ("shorten the prompt or lower max_new_tokens" if self.max_seq >= limit else
                       f"shorten the prompt, lower max_new_tokens, or raise max_seq (up to the model's {limit})")
                raise InputError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={n} it needs {len(p) + n} positions "
                    f"but the context holds {self.max_seq} (max_seq={self.max_seq}): {fix}")
        eos = frozenset(self.eos_token_ids)
        seqs = [Sequence(i, p, n, eos, params.stop, self.tokenizer.stream() if self.tokenizer else None)
                for i, p in enumerate(prompt_ids)]
        return seqs, self._run(seqs, _chooser(params, len(seqs), self.device), params.greedy)

    def _run(self, seqs: list[Sequence], choose, greedy: bool) -> Iterator[TokenEvent]:
        """The request's events, with the engine held from its first event to its last (or to close())."""
        if not self._busy.acquire(blocking=False):
            raise EngineBusy("this Engine is still running another request (a stream not yet finished, or a call "
                             "from another thread): finish or close() that stream first, or use one Engine per "
                             "concurrent request")
        try:
            yield from self._steps(seqs, choose, greedy)
        finally:
            self._busy.release()

    def _steps(self, seqs: list[Sequence], choose, greedy: bool) -> Iterator[TokenEvent]:
        """Keeps up to `self.lookahead` decode steps queued on the GPU ahead of the step whose tokens the host is
        reading: each step's input is the previous step's output, already on the device, so only eos/stop
        checks and streaming need the ids on the host, and they can lag. The price: up to `self.lookahead`
        wasted steps when every sequence stops early."""
        B = len(seqs)
        lens = [len(s.prompt_ids) for s in seqs]
        steps_needed = seqs[0].max_new_tokens - 1   # the prefill yields the first token
        (cache, decoder), kind = self._decoder(B, max(lens) + steps_needed + 1)
        stats = self.last_stats = GenerationStats(batch=B, prompt_tokens=sum(lens), engine=kind)

        t0 = time.perf_counter()
        tokens = choose(self._prefill([s.prompt_ids for s in seqs], cache))
        host = _HostCopy(tokens, None).result(decoder)
        stats.prefill_s = time.perf_counter() - t0
        positions = torch.tensor(lens, dtype=torch.long, device=self.device)
        pending: deque[_HostCopy] = deque()
        while True:
            for s in seqs:
                if not s.finished:
                    stats.new_tokens += 1
                    yield s.append(host[s.index])
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            if all(s.finished for s in seqs):
                return
            while stats.decode_steps < steps_needed and len(pending) <= self.lookahead:
                next_greedy, logits = decoder.enqueue(tokens, positions)
                # the greedy ids may be the decoder's own buffer, rewritten by the step they feed; the logits
                # are sampled in stream order before that step
                tokens = next_greedy.clone() if greedy else choose(logits)
                positions = positions + 1
                stats.decode_steps += 1
                pending.append(_HostCopy(tokens, decoder.status))
            host = pending.popleft().result(decoder)

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
        """Logits (B, V) at each prompt's last token, from the reference forward over the right-padded batch,
        in chunks of positions so that the (B, chunk, V) fp32 logits stay bounded (memory.prefill_chunk)."""
        B, V = len(prompts), self.spec.vocab_size
        lens = [len(p) for p in prompts]
        tokens = torch.zeros(B, max(lens), dtype=torch.long)   # pad id 0: any valid id, its K/V are never read
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        chunk = prefill_chunk(B, V, self.device.type)
        last = torch.empty(B, V, dtype=torch.float32, device=self.device)
        starts = range(0, max(lens), chunk)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if show and self.device.type == "cpu" and len(starts) > PREFILL_PROGRESS_CHUNKS:
            from tqdm import tqdm

            starts = tqdm(starts, desc="prefill", unit="chunk", file=sys.stderr, leave=False,
                          postfix=f"{max(lens)} positions in chunks of {chunk}")
        for c0 in starts:
            logits = self.model.forward(tokens[:, c0:c0 + chunk], torch.full((B,), c0, device=self.device), cache)
            for b, n in enumerate(lens):
                if c0 <= n - 1 < c0 + chunk:
                    last[b] = logits[b, n - 1 - c0]
        return last

    # ---- Argument checks -------------------------------------------------------------------------
    def _check_ids(self, prompt_ids) -> list[list[int]]:
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise InputError("prompt ids must be a non-empty list of token-id lists")
        V = self.spec.vocab_size
        out = []
        for i, p in enumerate(prompt_ids):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if not isinstance(p, (list, tuple)):
                raise InputError(f"prompt {i} is a {type(p).__name__}, not a list of token ids")
            if not p:
                raise InputError(f"prompt {i} is empty")
            bad = next((t for t in p if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < V), None)
            if bad is not None:
                raise InputError(f"prompt {i} holds token id {bad!r}, outside the vocabulary 0..{V - 1}")
            out.append([int(t) for t in p])
        return out


def _max_seq(max_seq, limit: int) -> int:
    value = min(limit, DEFAULT_MAX_SEQ) if max_seq is None else max_seq
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise InputError(f"max_seq={max_seq!r} must be an integer in 1..{limit} (the model's max_position_embeddings)")
    return value


def _chooser(params: SamplingParams, batch: int, device: torch.device):
    """logits (B, V) -> tokens (B,). A seeded request gives every sequence its own generator seeded with the seed,
    so a prompt samples the same tokens alone and inside any batch (one generator for the batch would hand each
    sequence different random numbers depending on its neighbours)."""
    t, k, p = params.temperature, params.top_k, params.top_p
    if params.greedy or params.seed is None:
        return lambda logits: sample(logits, t, k, p)
    gens = [torch.Generator(device=device).manual_seed(params.seed) for _ in range(batch)]
    return lambda logits: torch.cat([sample(logits[b:b + 1], t, k, p, g) for b, g in enumerate(gens)])


def _sampling(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """`params` with `overrides` (SamplingParams fields given as keywords) on top; None: the defaults."""
    if params is None:
        return SamplingParams(**overrides)
    if not isinstance(params, SamplingParams):
        raise InputError(f"params must be a SamplingParams, not {type(params).__name__}")
    return dataclasses.replace(params, **overrides) if overrides else params


def _unavailable(e: Exception) -> MonokernelError:
    return e if isinstance(e, MonokernelError) else MonokernelError(f"the megakernel cannot be imported: {e}")


class _HostCopy:
    """A step's token ids (and its decoder's status flag) on their way to the host: copied into pinned memory
    behind the step in stream order, waited for by an event, so reading them never waits for later steps."""

    def __init__(self, tokens: torch.Tensor, status: torch.Tensor | None):
        self.event = None
        if tokens.device.type != "cuda":
            self.tokens, self.status = tokens, status
            return
        self.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
        self.status = None if status is None else \
            torch.empty(status.shape, dtype=status.dtype, pin_memory=True).copy_(status, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self, decoder: Decoder) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        if self.status is not None and bool(self.status.any()):
            decoder.check()   # raises the decoder's own error
        return self.tokens.tolist()
