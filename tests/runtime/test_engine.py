"""Engine, sampling and per-sequence bookkeeping on a tiny random model (CPU, fp32, reference engine)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from monokernel.errors import EngineBusy, InputError, InsufficientMemory, MonokernelError
from monokernel.models.tokenizer import Tokenizer
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime import memory as memory_module
from monokernel.runtime.engine import Engine
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.sampling import SamplingParams, sample

from conftest import ENGINE_SPEC as SPEC

VOCAB = SPEC.vocab_size   # 61: odd on purpose
PROMPTS = [[3, 17, 9, 44, 5, 21, 8], [30], [12, 7, 7, 58, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


def word_tokenizer(eos: tuple[int, ...] = ()) -> Tokenizer:
    """Token i is the word "w{i}": text and ids map one to one, so stop-string tests can be exact."""
    tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, eos_token_ids=eos, chat_template="<{% for m in messages %}{{ m['content'] }}{% endfor %}>")


@pytest.fixture(scope="module")
def weights():
    return random_weights(SPEC, torch.float32, "cpu", seed=3)


@pytest.fixture
def engine(weights):
    return Engine.from_weights(weights)


@pytest.fixture
def text_engine(weights):
    return Engine.from_weights(weights, word_tokenizer())


def greedy_by_recompute(weights, prompt: list[int], n: int) -> list[int]:
    """The slow obvious way: rerun the whole sequence through a fresh cache for every token."""
    model, ids = ReferenceModel(weights), list(prompt)
    for _ in range(n):
        cache = KVCache(SPEC, 1, len(ids), torch.float32, "cpu")
        ids.append(int(model.forward(torch.tensor([ids]), torch.zeros(1, dtype=torch.long), cache)[0, -1].argmax()))
    return ids[len(prompt):]


# ---- generation ------------------------------------------------------------------------------------
def test_greedy_matches_recompute(engine, weights):
    """Greedy matches recomputing the whole sequence, and is deterministic."""
    first = engine.generate_ids(PROMPTS, max_new_tokens=12)
    again = engine.generate_ids(PROMPTS, max_new_tokens=12)
    for b, p in enumerate(PROMPTS):
        assert first[b].token_ids == greedy_by_recompute(weights, p, 12)
        assert first[b].token_ids == again[b].token_ids
        assert first[b].prompt_token_ids == p and first[b].finish_reason == "length"


def test_batched_equals_one_at_a_time(engine):
    batched = engine.generate_ids(PROMPTS, max_new_tokens=20)
    for b, p in enumerate(PROMPTS):
        assert engine.generate_ids([p], max_new_tokens=20)[0].token_ids == batched[b].token_ids


def test_chunked_prefill_matches(engine):
    long_prompt = [(7 * i + 3) % VOCAB for i in range(40)]
    whole = engine.generate_ids([long_prompt, PROMPTS[1]], max_new_tokens=6)
    engine.prefill_chunk = 16
    chunked = engine.generate_ids([long_prompt, PROMPTS[1]], max_new_tokens=6)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in whole]


def test_seeded_sampling(engine):
    """Seeded sampling is reproducible."""
    run = lambda seed: [g.token_ids for g in engine.generate_ids(PROMPTS, max_new_tokens=24, temperature=1.0, seed=seed)]
    assert run(5) == run(5)
    assert run(5) != run(6)
    assert run(5) != [g.token_ids for g in engine.generate_ids(PROMPTS, max_new_tokens=24)]


def test_seed_alone_equals_batched(engine):
    """A prompt with a seed samples the same tokens alone and at any place in a batch (each sequence has its
    own generator seeded with the seed)."""
    params = SamplingParams(temperature=1.0, top_k=20, seed=11, max_new_tokens=16)
    alone = [engine.generate_ids([p], params)[0].token_ids for p in PROMPTS]
    batched = [g.token_ids for g in engine.generate_ids(PROMPTS, params)]
    reordered = [g.token_ids for g in engine.generate_ids(PROMPTS[::-1], params)][::-1]
    assert batched == alone and reordered == alone
    assert len({tuple(t) for t in alone}) == len(PROMPTS)   # and they are not all the same draw


@pytest.mark.parametrize("opts", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)])
def test_degenerate_sampling(engine, opts):
    """Degenerate sampling equals greedy."""
    greedy = engine.generate_ids(PROMPTS, max_new_tokens=16)
    sampled = engine.generate_ids(PROMPTS, max_new_tokens=16, **{"temperature": 1.5, "seed": 0, **opts})
    assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


def test_stream_events(text_engine):
    """Stream events add up to what generate returns."""
    prompts = ["w3 w5 w8", "w1", "w40 w2 w2 w9"]
    gens = text_engine.generate(prompts, max_new_tokens=9)
    events = list(text_engine.stream(prompts, max_new_tokens=9))
    for b, g in enumerate(gens):
        mine = [e for e in events if e.index == b]
        assert [e.token_id for e in mine] == g.token_ids
        assert "".join(e.text for e in mine) == g.text
        assert [e.finish_reason for e in mine] == [None] * 8 + ["length"]
        assert g.text == " ".join(f"w{t}" for t in g.token_ids)
    assert text_engine.last_stats.new_tokens == 27 and text_engine.last_stats.tokens_per_s > 0


def test_stats_split_prefill_and_decode(engine, monkeypatch):
    """prefill_s ends at the step that gives the last prompt its first token (that step decodes too, so its
    sequence already holds two tokens when the events are read); decode_s runs from there to the last token.
    A clock that advances one second a Scheduler step: a 40-token prompt in chunks of 16 takes 3 steps."""
    from types import SimpleNamespace

    from monokernel.runtime.scheduler import Scheduler

    steps = [0]
    step = Scheduler.step

    def counted(self):
        steps[0] += 1
        return step(self)

    monkeypatch.setattr(Scheduler, "step", counted)
    monkeypatch.setattr("monokernel.runtime.engine.time", SimpleNamespace(perf_counter=lambda: float(steps[0])))
    engine.prefill_chunk = 16
    engine.generate_ids([[(7 * i + 3) % VOCAB for i in range(40)], [5]], max_new_tokens=4)
    st = engine.last_stats
    assert (st.prefill_s, st.decode_s, st.decode_steps, st.new_tokens) == (3.0, 2.0, 3, 8)


def test_eos_stops_one_sequence_only(weights):
    ref = Engine.from_weights(weights).generate_ids(PROMPTS, max_new_tokens=10)
    eos = ref[0].token_ids[3]
    eng = Engine.from_weights(weights)
    eng.eos_token_ids = (eos,)
    gens = eng.generate_ids(PROMPTS, max_new_tokens=10)
    for g, r in zip(gens, ref):
        if eos in r.token_ids:   # stops at the first eos, which is kept in token_ids
            cut = r.token_ids.index(eos) + 1
            assert (g.token_ids, g.finish_reason) == (r.token_ids[:cut], "eos")
        else:   # the others run on undisturbed next to it
            assert (g.token_ids, g.finish_reason) == (r.token_ids, "length")
    assert gens[0].finish_reason == "eos" and len(gens[0].token_ids) <= 4


def test_finished_sequences_leave(weights):
    """A sequence that finishes leaves the batch at once, and the run ends with the last one: no step is
    spent past the longest sequence."""
    eng = Engine.from_weights(weights)
    eng.eos_token_ids = tuple(g.token_ids[b + 1] for b, g in enumerate(eng.generate_ids(PROMPTS, max_new_tokens=10)))
    gens = eng.generate_ids(PROMPTS, max_new_tokens=10)   # every sequence stops by its 4th token
    assert {g.finish_reason for g in gens} == {"eos"}
    assert eng.last_stats.decode_steps == max(len(g.token_ids) for g in gens) - 1


def test_stop_string(text_engine):
    """A stop string truncates and never streams."""
    ref = text_engine.generate("w3 w5 w8", max_new_tokens=12)[0]
    stop = f" w{ref.token_ids[4]} w"      # spans a token boundary and ends mid-word
    events = list(text_engine.stream("w3 w5 w8", max_new_tokens=12, stop=[stop, "never"]))
    text = "".join(e.text for e in events)
    cut = ref.text.index(stop)
    assert text == ref.text[:cut] and stop not in text
    assert events[-1].finish_reason == "stop"
    gen = text_engine.generate("w3 w5 w8", max_new_tokens=12, stop=stop)[0]
    assert gen.text == text and gen.finish_reason == "stop"


def test_chat_uses_template(text_engine):
    with_chat = text_engine.generate("w4 w6", max_new_tokens=3, chat=True)[0]
    assert with_chat.prompt_token_ids == text_engine.tokenizer.encode("<w4 w6>", add_special_tokens=False)


def test_max_seq_limits_context(weights):
    eng = Engine.from_weights(weights, max_seq=20)
    assert len(eng.generate_ids([list(range(1, 11))], max_new_tokens=10)[0].token_ids) == 10   # exactly fits
    with pytest.raises(InputError, match="prompt 0 has 11 tokens.*max_new_tokens=10.*21 positions.*20.*"
                                         "raise max_seq \\(up to the model's 96\\)"):
        eng.generate_ids([list(range(1, 12))], max_new_tokens=10)
    with pytest.raises(InputError, match="shorten the prompt or lower max_new_tokens$"):   # nothing more to raise
        Engine.from_weights(weights, max_seq=96).generate_ids([[1] * 90], max_new_tokens=10)


# ---- one request at a time -------------------------------------------------------------------------
def test_stream_then_generate_is_busy(text_engine):
    """A second request while a stream is running is refused, the stream's text is untouched, and the engine
    serves the next request once the stream is done."""
    want = text_engine.generate("w3 w5 w8", max_new_tokens=8)[0]
    stream = text_engine.stream("w3 w5 w8", max_new_tokens=8)
    first = [next(stream), next(stream)]
    with pytest.raises(EngineBusy, match="still running another request.*close\\(\\)"):
        text_engine.generate("w40 w2", max_new_tokens=4)
    with pytest.raises(EngineBusy):
        next(text_engine.stream_ids([[1, 2]], max_new_tokens=2))
    events = first + list(stream)
    assert [e.token_id for e in events] == want.token_ids and "".join(e.text for e in events) == want.text
    assert text_engine.generate("w3 w5 w8", max_new_tokens=8)[0].token_ids == want.token_ids


def test_closed_stream_frees_engine(engine):
    stream = engine.stream_ids(PROMPTS, max_new_tokens=8)
    next(stream)
    stream.close()
    unstarted = engine.stream_ids(PROMPTS, max_new_tokens=8)   # not started: holds nothing
    assert len(engine.generate_ids(PROMPTS, max_new_tokens=3)) == 3
    assert len(list(unstarted)) == 3 * 8


def test_failed_request_frees_engine(engine, monkeypatch):
    monkeypatch.setattr("monokernel.runtime.scheduler.prefill_chunk",
                        lambda *a, **k: (_ for _ in ()).throw(InputError("boom")))
    with pytest.raises(InputError, match="boom"):
        engine.generate_ids(PROMPTS, max_new_tokens=3)
    monkeypatch.undo()
    assert len(engine.generate_ids(PROMPTS, max_new_tokens=3)) == 3


# ---- memory and progress ---------------------------------------------------------------------------
def test_request_too_big_for_memory(engine, monkeypatch):
    """A KV cache that cannot fit is refused before it is allocated, and the engine stays usable."""
    monkeypatch.setattr("monokernel.runtime.engine.available_bytes", lambda device: 1 << 20)
    with pytest.raises(InsufficientMemory, match=r"3 sequences of up to 96 positions need .* GB .* free; send fewer"):
        engine.generate_ids(PROMPTS, max_new_tokens=20)
    monkeypatch.undo()
    assert len(engine.generate_ids(PROMPTS, max_new_tokens=3)) == 3


def test_prefill_progress(engine, capsys):
    """A CPU prefill of many chunks shows a progress bar on stderr (when asked, or on a terminal)."""
    engine.prefill_chunk = 16
    long_prompt = [(7 * i + 3) % VOCAB for i in range(90)]
    engine.generate_ids([long_prompt], max_new_tokens=2)
    assert "prefill" not in capsys.readouterr().err
    engine.progress = True
    engine.generate_ids([long_prompt], max_new_tokens=2)
    assert "prefill" in capsys.readouterr().err


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda e: e.generate(""), "prompt 0 is empty"),
    (lambda e: e.generate(["w1", ""]), "prompt 1 is empty"),
    (lambda e: e.generate([]), "non-empty list"),
    (lambda e: e.generate_ids([[1], []]), "prompt 1 is empty"),
    (lambda e: e.generate_ids([[1, VOCAB]]), f"token id {VOCAB}, outside the vocabulary 0..{VOCAB - 1}"),
    (lambda e: e.generate_ids([[-1]]), "token id -1"),
    (lambda e: e.generate_ids([[1.5]]), "token id 1.5"),
    (lambda e: e.generate_ids([[1] * 90], max_new_tokens=10), "prompt 0 has 90 tokens"),
    (lambda e: e.generate_ids([[1]], max_new_tokens=0), "max_new_tokens=0"),
    (lambda e: e.generate_ids([[1]], temperature=-0.5), "temperature=-0.5"),
    (lambda e: e.generate_ids([[1]], temperature=math.nan), "temperature=nan"),
    (lambda e: e.generate_ids([[1]], temperature=1.0, top_p=0.0), "top_p=0.0"),
    (lambda e: e.generate_ids([[1]], temperature=1.0, top_p=1.5), "top_p=1.5"),
    (lambda e: e.generate_ids([[1]], temperature=1.0, top_k=0), "top_k=0"),
    (lambda e: e.generate_ids([[1]], seed="x"), "seed='x'"),
    (lambda e: e.generate_ids([[1]], stop=[""]), "non-empty strings"),
    (lambda e: e.stream("w1", max_new_tokens=-1), "max_new_tokens=-1"),   # raised at the call, not at next()
])
def test_bad_input_is_named(text_engine, call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.").replace("*", ".*")):
        call(text_engine)


def test_errors_without_tokenizer(engine):
    with pytest.raises(InputError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        engine.generate_ids([[1]], stop="x")


def test_bad_engine_arguments(weights):
    with pytest.raises(InputError, match="engine 'fast'"):
        Engine.from_weights(weights, engine="fast")
    with pytest.raises(InputError, match="max_seq=97"):
        Engine.from_weights(weights, max_seq=97)
    with pytest.raises(MonokernelError, match="needs a CUDA device"):
        Engine.from_weights(weights, engine="mega")
    auto = Engine(weights, engine="auto")
    assert auto.engine == "reference" and "no CUDA device" in auto.notice


# ---- sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("temperature", math.inf), ("temperature", "hot"), ("top_k", 0), ("top_k", 2.0),
    ("top_p", 0.0), ("top_p", 1.01), ("seed", 1.5), ("seed", True), ("max_new_tokens", 0),
    ("max_new_tokens", 3.0), ("stop", [""]), ("stop", ["ok", 5]), ("stop", 5),
])
def test_sampling_params_reject(field, value):
    """Each bad field raises InputError at construction, naming the field and the value."""
    with pytest.raises(InputError, match=f"^{field}="):
        SamplingParams(**{field: value})


def test_sampling_params_value():
    """A frozen, hashable value: stop normalised to a tuple, so equal requests compare equal."""
    p = SamplingParams(temperature=0.5, top_k=4, stop="w3")
    assert p.stop == ("w3",) and not p.greedy and SamplingParams().greedy
    assert p == SamplingParams(temperature=0.5, top_k=4, stop=["w3"]) and len({p, dataclasses.replace(p)}) == 1
    assert SamplingParams(stop=None).stop == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 2
    with pytest.raises(InputError, match="top_p=2"):
        dataclasses.replace(p, top_p=2)     # replace() checks again


def test_params_and_overrides(text_engine):
    """generate/stream take a SamplingParams, keywords override its fields, anything else is refused."""
    params = SamplingParams(temperature=1.0, seed=4, max_new_tokens=9)
    want = [g.token_ids for g in text_engine.generate_ids(PROMPTS, params)]
    assert [g.token_ids for g in text_engine.generate_ids(PROMPTS, temperature=1.0, seed=4, max_new_tokens=9)] == want
    short = text_engine.generate_ids(PROMPTS, params, max_new_tokens=3)
    assert [g.token_ids for g in short] == [t[:3] for t in want]
    events = list(text_engine.stream("w3 w5", SamplingParams(max_new_tokens=4)))
    assert [e.token_id for e in events] == text_engine.generate("w3 w5", max_new_tokens=4)[0].token_ids
    with pytest.raises(InputError, match="params must be a SamplingParams, not int"):
        text_engine.generate_ids(PROMPTS, 12)
    with pytest.raises(TypeError, match="top_q"):
        text_engine.generate_ids(PROMPTS, top_q=0.5)


def test_sample_top_k_top_p():
    """sample respects top_k and top_p."""
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.05, 0.3, 0.1]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=gen).tolist()) == {1, 3}
    assert set(sample(logits, 1.0, top_p=0.75, generator=gen).tolist()) == {1, 3}   # 0.5 < 0.75 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.85, generator=gen).tolist()) == {1, 3, 4}
    counts = torch.bincount(sample(logits, 1.0, generator=gen), minlength=5).float() / 4000
    assert torch.allclose(counts, logits[0].exp(), atol=0.03)
    assert torch.equal(sample(logits[:2], 0.0), torch.tensor([1, 1]))


def test_load_refuses_what_cannot_fit(tiny_preset, monkeypatch):
    """Engine.load estimates weights + KV cache + workspace before loading and refuses with the numbers."""
    monkeypatch.setattr("monokernel.models.load.load_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: 10**6)
    with pytest.raises(InsufficientMemory, match=r"preset:tiny needs .* GB \(weights 0\.0 GB in fp32, KV cache .* for "
                                                 r"1 x 256 positions.*\) but the CPU has 0\.0 GB free; use dtype='bf16'"):
        Engine.load("preset:tiny", device="cpu")


def test_estimate_counts_everything():
    from monokernel.models.presets import PRESETS

    spec = PRESETS["llama-3.1-8b"]
    est = memory_module.estimate_memory(spec, "bf16", 1, 4096, "cpu")
    assert est.weights == spec.num_params() * 2 and abs(est.weights / 1e9 - 16.06) < 0.01
    assert est.kv_cache == 2 * 32 * 8 * 4096 * 128 * 2       # K and V, 32 layers, 8 KV heads, bf16
    assert 0 < est.workspace < 8e9
    assert memory_module.estimate_memory(spec, "fp32", 1, 4096, "cpu").weights == 2 * est.weights


def test_api_errors_name_arguments(weights, tiny_preset, monkeypatch):
    """Errors of the Python API name Python arguments, never CLI flags (cli.cli_words translates them)."""
    from monokernel.runtime.engine import resolve_device

    calls = [lambda: Engine.from_weights(weights, max_seq=20).generate_ids([[1] * 15], max_new_tokens=10),
             lambda: Engine.from_weights(weights, max_seq=0), lambda: SamplingParams(top_p=2.0)]
    if not torch.cuda.is_available():
        calls.append(lambda: resolve_device("cuda"))
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: 10**6)
    calls.append(lambda: Engine.load("preset:tiny", device="cpu"))
    for call in calls:
        with pytest.raises(MonokernelError) as e:
            call()
        assert "--" not in str(e.value), str(e.value)
