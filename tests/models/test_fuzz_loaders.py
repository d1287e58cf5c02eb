"""Fuzzing the loaders with hypothesis: config.json dicts, safetensors headers, GGUF headers and metadata, each
mutated from a valid tiny checkpoint. A loader may refuse anything, but only with the project's own errors
(MonokernelError): never a KeyError, an IndexError or a library's exception type.

Bounded for CI (derandomized, so a run is repeatable; about 15 s in all on a laptop core); set
MONOKERNEL_FUZZ_EXAMPLES to search longer (a new seed each run then)."""
from __future__ import annotations

import json
import os
import struct

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from monokernel.baselines.hf import hf_state_dict
from monokernel.errors import MonokernelError
from monokernel.models import gguf_loader
from monokernel.models.gguf_loader import load_gguf_checkpoint
from monokernel.models.safetensors_loader import load_safetensors_checkpoint
from monokernel.models.spec import ModelSpec
from monokernel.models.weights import random_weights

EXAMPLES = int(os.environ.get("MONOKERNEL_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 200, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_GGUF = settings(FUZZ, max_examples=EXAMPLES or 120)

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 257, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
SPEC = ModelSpec.from_hf_config(CONFIG, name="fuzz")



def _json(floats, text):
    """Any JSON value, nested a little."""
    return st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | floats | text(max_size=12),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=8), inner, max_size=4),
                        max_leaves=8)


JSON = _json(st.floats(), st.text)      # Python's json reads NaN, Infinity and lone surrogates
_TEXT = lambda max_size: st.text(st.characters(exclude_categories=("Cs",)), max_size=max_size)  # noqa: E731
STRICT_JSON = _json(st.floats(allow_nan=False, allow_infinity=False), _TEXT)   # safetensors' parser reads none
ROPE = st.fixed_dictionaries({}, optional={
    "rope_type": st.sampled_from(["default", "llama3", "yarn", "linear", "dynamic", None, 3]),
    "type": st.sampled_from(["linear", "llama3"]), "rope_theta": JSON | st.floats(1, 1e7),
    "factor": JSON | st.floats(0, 64), "low_freq_factor": JSON | st.floats(0, 8),
    "high_freq_factor": JSON | st.floats(0, 8), "original_max_position_embeddings": JSON | st.integers(0, 10**6),
    "full_attention": JSON})
CONFIG_KEYS = [*CONFIG, "rope_parameters", "rope_scaling", "sliding_window", "use_sliding_window", "max_window_layers",
               "layer_types", "attention_bias", "mlp_bias", "partial_rotary_factor", "_name_or_path"]


def _refused_cleanly(load) -> None:
    try:
        load()
    except MonokernelError:
        pass


# ---- config.json ---------------------------------------------------------------------------------
@FUZZ
@given(drop=st.sets(st.sampled_from(CONFIG_KEYS)),
       put=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON | ROPE | st.integers(-3, 5000), max_size=5),
       arch=st.sampled_from(["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"]))
def test_fuzz_config_dict(drop, put, arch):
    cfg = {k: v for k, v in {**CONFIG, "architectures": [arch]}.items() if k not in drop}
    cfg.update(put)
    _refused_cleanly(lambda: ModelSpec.from_hf_config(cfg))


@FUZZ
@given(data=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_config_file(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    _refused_cleanly(lambda: ModelSpec.from_config_file(tmp_path / "config.json"))


# ---- safetensors ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> tuple[dict, bytes]:
    """The header (as a dict) and the data of a valid single-file checkpoint of SPEC."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    state = {k: v.contiguous().clone() for k, v in hf_state_dict(random_weights(SPEC, torch.float32, "cpu")).items()}
    save_file(state, path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), _Bytes(raw[8 + n:])


DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3",
          "F8_E5M2", "Q4", "", "f32"]
ENTRY_EDITS = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(DTYPES) | STRICT_JSON, "shape": st.lists(st.integers(-2, 100), max_size=4) | STRICT_JSON,
    "data_offsets": st.lists(st.integers(-2, 40000), min_size=0, max_size=3) | STRICT_JSON})


@FUZZ
@given(edits=st.dictionaries(st.integers(0, 30), ENTRY_EDITS, max_size=3), drop=st.sets(st.integers(0, 30), max_size=2),
       extra=st.dictionaries(_TEXT(10), STRICT_JSON, max_size=2), damage=st.sampled_from(["", "", "cut", "length"]),
       data=st.data())
def test_fuzz_safetensors_header(tmp_path, safetensors_file, edits, drop, extra, damage, data):
    """Header entries with another dtype, shape or offsets, entries dropped or added, then (sometimes) the file
    cut short or its header length field rewritten."""
    header, payload = safetensors_file
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    for i, change in edits.items():
        header[names[i % len(names)]].update(change)
    for i in drop:
        header.pop(names[i % len(names)], None)
    header.update(extra)
    blob = json.dumps(header).encode()
    length = data.draw(st.integers(0, 2**64 - 1)) if damage == "length" else len(blob)
    raw = struct.pack("<Q", length) + blob + payload
    if damage == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    (tmp_path / "model.safetensors").write_bytes(raw)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    _refused_cleanly(lambda: load_safetensors_checkpoint(tmp_path, torch.float32, "cpu"))


# ---- GGUF ----------------------------------------------------------------------------------------
_TO_GGUF = {hf: g for g, hf in gguf_loader._GLOBAL_NAMES.items()}
_TO_GGUF_LAYER = {hf: g for g, hf in gguf_loader._LAYER_NAMES.items()}
TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]   # 257 tokens, one merge
# (key, writer method, valid value): the metadata the loader and the tokenizer read
METADATA = [("llama.block_count", "add_uint32", SPEC.num_layers), ("llama.context_length", "add_uint32", 64),
            ("llama.embedding_length", "add_uint32", SPEC.hidden_size),
            ("llama.feed_forward_length", "add_uint32", SPEC.intermediate_size),
            ("llama.attention.head_count", "add_uint32", SPEC.num_heads),
            ("llama.attention.head_count_kv", "add_uint32", SPEC.num_kv_heads),
            ("llama.attention.key_length", "add_uint32", SPEC.head_dim),
            ("llama.rope.dimension_count", "add_uint32", SPEC.head_dim),
            ("llama.rope.freq_base", "add_float32", 10000.0),
            ("llama.attention.layer_norm_rms_epsilon", "add_float32", 1e-5),
            ("llama.vocab_size", "add_uint32", SPEC.vocab_size), ("tokenizer.ggml.model", "add_string", "gpt2"),
            ("tokenizer.ggml.pre", "add_string", "gpt2"), ("tokenizer.ggml.tokens", "add_array", TOKENS),
            ("tokenizer.ggml.token_type", "add_array", [1] * len(TOKENS)),
            ("tokenizer.ggml.merges", "add_array", ["Ġ t"]), ("tokenizer.ggml.bos_token_id", "add_uint32", 1),
            ("tokenizer.ggml.eos_token_id", "add_uint32", 2), ("tokenizer.chat_template", "add_string", "{{ x }}")]
GGUF_VALUE = (st.integers(-2**31, 2**31 - 1).map(lambda v: ("add_int32", v))
              | st.integers(0, 2**32 - 1).map(lambda v: ("add_uint32", v))
              | st.floats(width=32).map(lambda v: ("add_float32", v))
              | st.booleans().map(lambda v: ("add_bool", v))
              | st.text(max_size=10).map(lambda v: ("add_string", v))
              | st.lists(st.integers(0, 300), min_size=1, max_size=5).map(lambda v: ("add_array", v))
              | st.lists(st.text(max_size=3), min_size=1, max_size=5).map(lambda v: ("add_array", v)))


def _write_gguf(path, meta_changes: dict | None = None, drop: frozenset = frozenset(), arch: str = "llama") -> bytes:
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, method, value in METADATA:
        if key in drop:
            continue
        method, value = (meta_changes or {}).get(key, (method, value))
        getattr(w, method)(key, value)
    state = hf_state_dict(random_weights(SPEC, torch.float32, "cpu"))
    for name, t in state.items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{_TO_GGUF_LAYER[rest]}"
        else:
            gname = _TO_GGUF[name]
        w.add_tensor(gname, t.contiguous().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class _Bytes(bytes):
    def __repr__(self) -> str:   # hypothesis prints the fixtures of a failing example: not 300 kB of them
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    raw = _write_gguf(path)
    spec, _, tok = load_gguf_checkpoint(path, torch.float32, "cpu")   # the unmutated file loads
    assert spec.num_layers == 1 and tok.encode("hi")
    return _Bytes(raw)


@FUZZ_GGUF
@given(cut=st.none() | st.integers(4, 6000), tail=st.binary(max_size=64),
       flips=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 255)), max_size=4))
def test_fuzz_gguf_bytes(tmp_path, gguf_bytes, cut, tail, flips):
    """Bytes overwritten anywhere in the header (about the first 4 kB), the file cut there, garbage after."""
    raw = bytearray(gguf_bytes if cut is None or cut >= len(gguf_bytes) else gguf_bytes[:cut] + tail)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    (tmp_path / "f.gguf").write_bytes(bytes(raw))
    _refused_cleanly(lambda: load_gguf_checkpoint(tmp_path / "f.gguf", torch.float32, "cpu"))


@FUZZ_GGUF
@given(changes=st.dictionaries(st.sampled_from([k for k, _, _ in METADATA]), GGUF_VALUE, max_size=3),
       drop=st.frozensets(st.sampled_from([k for k, _, _ in METADATA]), max_size=2),
       arch=st.sampled_from(["llama", "llama", "gpt2", ""]))
def test_fuzz_gguf_metadata(tmp_path, changes, drop, arch):
    """Metadata of the wrong type or value, or missing, as a converter could write it."""
    _write_gguf(tmp_path / "m.gguf", changes, drop, arch)
    _refused_cleanly(lambda: load_gguf_checkpoint(tmp_path / "m.gguf", torch.float32, "cpu"))
