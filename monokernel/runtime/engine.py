"""Engine: prompts in, text out, over the request-level Scheduler (runtime/scheduler.py).

    engine = Engine.load()                                  # default model, best engine for this machine
    [g] = engine.generate("The capital of France is", max_new_tokens=12)
    params = SamplingParams(temperature=0.7, seed=0, max_new_tokens=8)
    for ev in engine.stream(["Hi", "Hello"], params): print(ev.index, ev.text)

generate()/stream() hand their prompts to a Scheduler of as many slots as prompts: each prompt is prefilled
on its own (chunked SDPA, runtime/prefill.py) and decodes as soon as its prefill is done, a finished sequence
leaves the batch at once (its slot then runs a pad row), and the batch shape, with it a compiled megakernel,
stays fixed. The Scheduler is kept for the next call of the same batch size, so a prompt extending the previous
one (the next turn of a chat) prefills only its new tokens.

On the megakernel a sampled request (top-k / top-p included) is drawn inside the kernel with its seed
(Gumbel-max, monokernel/gumbel.py; rows the kernel flags, by the same rule on the host): reproducible for a
seed, but not the reference engine's tokens for that seed (its host sampler draws by torch.multinomial).
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
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
from .memory import GB, available_bytes, check_fits, estimate_memory, kv_cache_bytes, workspace_bytes
from .prefill import chunk_size
from .requests import Request
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Generation, Sequence, TokenEvent

ENGINES = ("auto", "mega", "reference")
DEFAULT_MAX_SEQ = 4096          # KV-cache positions: 512 MiB of bf16 K+V per sequence on Llama-3.1-8B
PREFILL_PROGRESS_CHUNKS = 4     # a CPU prefill of more chunks than this shows a progress bar


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
        self.last_speculative = None         # SpeculativeStats of the last speculative request
        self._drafters: dict = {}            # speculative "model:PATH" -> its DraftModel, loaded once
        self._scheduler: Scheduler | None = None   # generate()'s, kept for the next call of the same batch
        # One request at a time: a request owns the scheduler from its prefill to its last token (held by the
        # generator of Engine._run, released when it finishes or is closed).
        self._busy = threading.Lock()
        self.progress: bool | None = None   # a progress bar for long CPU prefills; None: when stderr is a terminal
        self.prefill_chunk: int | None = None   # positions per prefill step; None: prefill.CHUNK for the device
        if engine not in ENGINES:
            raise InputError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.requested = engine
        self._mega_weights: PackedWeights | None = None   # what the megakernel reads (with_dense_head), made once
        self.notice: str | None = None     # why "auto" chose the reference engine, if it did
        self.engine = "reference" if engine == "reference" else self._try_mega()

    @classmethod
    def load(cls, model: str | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, engine: str = "auto", max_seq: int | None = None,
             seed: int = 0, quiet: bool = False, weights: str | None = None) -> "Engine":
        """`model`: None (the default model), "preset:NAME" (random weights), a checkpoint dir or a .gguf file.
        `weights`: None or "dense" (dense in `dtype` at load), "packed" (a quantised checkpoint kept as stored,
        dequantised a matmul at a time on the reference engine), or a --quantize format (the megakernel reads
        int8 and symmetric int4)."""
        from ..models.load import load_model, load_spec, resolve_model

        # everything that can be checked without the weights is, so a typo or a model too big costs no load
        device = resolve_device(device)
        if engine not in ENGINES:
            raise InputError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        dtype = resolve_dtype(dtype, device)
        source = resolve_model(model)
        spec = load_spec(source)
        limit = spec.max_position_embeddings
        # dense unless asked: the fastest path on every device today (the megakernel reads none of the
        # checkpoints' packed formats, and the CPU reference computes a token 3.5x faster from dense weights)
        weights = "dense" if weights is None else (None if weights == "packed" else weights)
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
            self._check_memory(1, self.max_seq)
            self._build_decoder(1, self.max_seq, "mega")   # compiled (and cached on disk) now; built again on use
            return "mega"
        except (ImportError, MonokernelError) as e:
            if self.requested == "mega":
                raise _unavailable(e) from e
            self.notice = f"the megakernel is unavailable: {str(e).splitlines()[0]}"
            return "reference"

    def _build_decoder(self, batch: int, size: int, kind: str) -> tuple[KVCache, Decoder]:
        cache = KVCache(self.spec, batch, size, self.dtype, self.device)
        if kind == "mega":
            from .mega import MegaDecoder

            if self._mega_weights is None:   # a GGUF's Q8_0 embedding / LM head dense, the layers as stored
                self._mega_weights = self.weights.with_dense_head()
            return cache, MegaDecoder(self._mega_weights, cache)
        return cache, ReferenceDecoder(self.model, cache)

    def make_decoder(self, batch: int, positions: int, extra: int = 0) -> tuple[KVCache, Decoder, str]:
        """A KV cache of `positions` and a decoder of `batch` rows owned by the caller (the request-level
        Scheduler), not shared with generate(); the megakernel when this engine runs it, else the reference.
        extra: positions the cache holds past those (within the model's limit), for a verify step's padded rows."""
        limit = self.spec.max_position_embeddings
        if self.engine == "mega":
            try:
                size = min(self.max_seq + extra, limit)
                self._check_memory(batch, size)
                return (*self._build_decoder(batch, size, "mega"), "mega")
            except (ImportError, MonokernelError) as e:
                if self.requested == "mega":
                    raise _unavailable(e) from e
                print(f"monokernel: batch {batch} runs on the reference engine: {str(e).splitlines()[0]}",
                      file=sys.stderr)
        size = min(positions + extra, limit)
        self._check_memory(batch, size)
        return (*self._build_decoder(batch, size, "reference"), "reference")

    def _check_memory(self, batch: int, size: int) -> None:
        """A new KV cache (and a request's workspace) must fit in what is free once the old cache is released."""
        free = available_bytes(self.device)
        if free is None:
            return
        held = self._scheduler.cache if self._scheduler is not None else None
        old = 0 if held is None else 2 * held.k.numel() * held.k.element_size()
        need = kv_cache_bytes(self.spec, batch, size, self.dtype) + workspace_bytes(self.spec, batch, size, self.device.type)
        if need > free + old:
            raise InsufficientMemory(
                f"{batch} sequences of up to {size} positions need {need / GB:.1f} GB (KV cache and workspace) but "
                f"{free / GB + old / GB:.1f} GB are free; send fewer prompts at once, shorter ones, or a smaller "
                f"max_new_tokens")

    def _scheduler_for(self, batch: int, positions: int) -> Scheduler:
        """generate()'s scheduler: the last one while its batch matches and its cache holds `positions` (a
        megakernel bakes max_seq in, so its cache always holds max_seq; the reference one grows as needed)."""
        s = self._scheduler
        if s is not None and s.batch == batch and s.max_seq >= positions:
            s.chunk = self.prefill_chunk or chunk_size(self.device)
            return s
        size = min(self.max_seq, -(-positions // 256) * 256)
        self._check_memory(batch, size)
        self._scheduler = None            # release the old cache before allocating the new one
        self._scheduler = Scheduler(self, batch, prefill_chunk_size=self.prefill_chunk, max_positions=size)
        return self._scheduler

    # ---- Public API --------------------------------------------------------------------------------
    def generate(self, prompts: str | Seq[str], params: SamplingParams | None = None, *, chat: bool = False,
                 speculative: str | None = None, draft_tokens: int = 4, **overrides) -> list[Generation]:
        """`params` (default: SamplingParams()) with any of its fields given as keywords on top. speculative:
        "ngram" (prompt-lookup drafts) or "model:PATH" (a draft model of the same tokenizer: PATH as `model`
        of load(), or "default") proposes up to `draft_tokens` tokens that the target verifies in one pass:
        greedy decoding gives the same tokens, sampling the same distribution, in fewer passes
        (`last_speculative` says how many). On the megakernel engine each pass is one verify launch of
        draft_tokens + 1 rows (at most 7 draft tokens)."""
        params = _sampling(params, overrides)
        return self.generate_ids(self.encode_prompts(prompts, chat), params, speculative=speculative,
                                 draft_tokens=draft_tokens)

    def generate_ids(self, prompt_ids: Seq[Seq[int]], params: SamplingParams | None = None, *,
                     speculative: str | None = None, draft_tokens: int = 4, **overrides) -> list[Generation]:
        seqs, events = self._start(prompt_ids, _sampling(params, overrides), speculative, draft_tokens)
        for _ in events:
            pass
        return [s.result() for s in seqs]

    def stream(self, prompts: str | Seq[str], params: SamplingParams | None = None, *, chat: bool = False,
               speculative: str | None = None, draft_tokens: int = 4, **overrides) -> Iterator[TokenEvent]:
        """Per-token events, in step order. Arguments are checked here, before the first event is asked for."""
        params = _sampling(params, overrides)
        return self.stream_ids(self.encode_prompts(prompts, chat), params, speculative=speculative,
                               draft_tokens=draft_tokens)

    def stream_ids(self, prompt_ids: Seq[Seq[int]], params: SamplingParams | None = None, *,
                   speculative: str | None = None, draft_tokens: int = 4, **overrides) -> Iterator[TokenEvent]:
        return self._start(prompt_ids, _sampling(params, overrides), speculative, draft_tokens)[1]

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
    def _start(self, prompt_ids, params: SamplingParams, speculative: str | None = None, draft_tokens: int = 4):
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
        speculation = None
        if speculative is not None:   # checked, and any draft model loaded, before the first event is asked for
            from ..speculative.run import Speculation
            speculation = Speculation.create(speculative, draft_tokens, self, self._drafters)
        eos = frozenset(self.eos_token_ids)
        reqs = [Request(str(i), p, params, Sequence(i, p, n, eos, params.stop,
                                                    self.tokenizer.stream() if self.tokenizer else None))
                for i, p in enumerate(prompt_ids)]
        if speculation is not None:
            return [r.seq for r in reqs], self._run_speculative(reqs, speculation)
        return [r.seq for r in reqs], self._run(reqs)

    def _run_speculative(self, reqs: list[Request], speculation) -> Iterator[TokenEvent]:
        from ..speculative.run import speculative_events
        from ..speculative.verify import SpeculativeStats

        if not self._busy.acquire(blocking=False):
            raise EngineBusy("this Engine is still running another request: finish or close() that stream first")
        try:
            stats = self.last_stats = GenerationStats(batch=len(reqs), prompt_tokens=sum(len(r.prompt_ids) for r in reqs),
                                                      engine=f"{self.engine}, speculative {speculation.method}")
            spec = self.last_speculative = SpeculativeStats()
            t0 = time.perf_counter()
            for ev in speculative_events(self, reqs, speculation, spec):
                stats.new_tokens += 1
                if stats.new_tokens == 1:
                    stats.prefill_s = time.perf_counter() - t0
                stats.decode_steps = spec.passes
                stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
                yield ev
        finally:
            self._busy.release()

    def _run(self, reqs: list[Request]) -> Iterator[TokenEvent]:
        """The request's events, with the engine held from its first event to its last (or to close())."""
        if not self._busy.acquire(blocking=False):
            raise EngineBusy("this Engine is still running another request (a stream not yet finished, or a call "
                             "from another thread): finish or close() that stream first, or use one Engine per "
                             "concurrent request")
        sched = None
        try:
            need = max(len(r.prompt_ids) for r in reqs) + reqs[0].params.max_new_tokens
            sched = self._scheduler_for(len(reqs), need)
            for r in reqs:
                sched.submit(r)
            yield from self._steps(sched, reqs)
        finally:
            if sched is not None:   # a closed stream: its sequences leave their slots
                for r in reqs:
                    sched.abort(r.id)
            self._busy.release()

    def _steps(self, sched: Scheduler, reqs: list[Request]) -> Iterator[TokenEvent]:
        stats = self.last_stats = GenerationStats(batch=len(reqs), prompt_tokens=sum(len(r.prompt_ids) for r in reqs),
                                                  engine=sched.kind)
        index = {r.id: r.seq.index for r in reqs}
        steps0, t0 = sched.stats.decode_steps, time.perf_counter()
        progress = self._progress_bar(sched, stats.prompt_tokens)
        # requests without a token yet, counted by their events: a step that ends a prefill decodes that request
        # too, so by the time its events are read its sequence holds two tokens
        unstarted = set(index)
        while any(not r.finished for r in reqs):
            events = sched.step()
            for ev in events:
                if ev.error is not None:
                    raise ev.error
                if ev.token_id is None:
                    continue
                if unstarted and ev.request_id in unstarted:
                    unstarted.discard(ev.request_id)
                    if not unstarted:
                        stats.prefill_s = time.perf_counter() - t0
                        if progress is not None:
                            progress.close()
                            progress = None
                stats.new_tokens += 1
                yield TokenEvent(index[ev.request_id], ev.token_id, ev.text, ev.finish_reason)
            if progress is not None:
                progress.n = sched.stats.prefill_tokens - progress.start
                progress.refresh()
            stats.decode_steps = sched.stats.decode_steps - steps0
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s

    def _progress_bar(self, sched: Scheduler, prompt_tokens: int):
        """A progress bar over the prompt positions, for a CPU prefill of more than a few chunks."""
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show or self.device.type != "cpu" or prompt_tokens <= PREFILL_PROGRESS_CHUNKS * sched.chunk:
            return None
        from tqdm import tqdm

        bar = tqdm(total=prompt_tokens, desc="prefill", unit="tok", file=sys.stderr, leave=False,
                   postfix=f"chunks of {sched.chunk}")
        bar.start = sched.stats.prefill_tokens
        return bar

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


def _sampling(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """`params` with `overrides` (SamplingParams fields given as keywords) on top; None: the defaults."""
    if params is None:
        return SamplingParams(**overrides)
    if not isinstance(params, SamplingParams):
        raise InputError(f"params must be a SamplingParams, not {type(params).__name__}")
    return dataclasses.replace(params, **overrides) if overrides else params


def _unavailable(e: Exception) -> MonokernelError:
    return e if isinstance(e, MonokernelError) else MonokernelError(f"the megakernel cannot be imported: {e}")
