"""config.json -> ModelSpec on hand-written dicts: every field a config can get wrong is refused with its name,
never a KeyError or a silently different model."""
from __future__ import annotations

import json

import pytest

from monokernel.errors import CheckpointError, UnsupportedModelError
from monokernel.models.spec import ModelSpec, RopeScaling

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}


def spec(**changes) -> ModelSpec:
    cfg = {**LLAMA, **changes}
    return ModelSpec.from_hf_config({k: v for k, v in cfg.items() if v is not ...})


# ---- rotary embeddings ---------------------------------------------------------------------------
def test_yarn_beside_default_rope():
    """transformers 5 writes rope_parameters; adding YaRN as rope_scaling must not leave plain RoPE running."""
    with pytest.raises(UnsupportedModelError, match=r"rope_scaling\.rope_type='yarn' is not supported"):
        spec(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_scaling=YARN)


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_anywhere(where):
    with pytest.raises(UnsupportedModelError, match=rf"{where}\.rope_type='yarn'"):
        spec(**{where: YARN})
    with pytest.raises(UnsupportedModelError, match=rf"{where}\.rope_type='linear'"):
        spec(**{where: {"type": "linear", "factor": 2.0}})


def test_rope_per_layer_type():
    """transformers 5 may nest one dict per layer type: each is read."""
    with pytest.raises(UnsupportedModelError, match=r"rope_parameters\.sliding_attention\.rope_type='yarn'"):
        spec(rope_parameters={"full_attention": {"rope_type": "default"}, "sliding_attention": YARN})


def test_rope_sources_disagree():
    with pytest.raises(UnsupportedModelError, match="disagree"):
        spec(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_scaling=LLAMA3)
    with pytest.raises(UnsupportedModelError, match="disagree"):
        spec(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_scaling={"rope_type": "default",
                                                                                         "rope_theta": 1e6})


def test_rope_agreeing_sources():
    """One scaling given in either place, or in both alike, reads the same."""
    want = RopeScaling(8.0, 1.0, 4.0, 8192)
    assert spec(rope_scaling=LLAMA3).rope_scaling == want
    assert spec(rope_parameters={**LLAMA3, "rope_theta": 5e5}, rope_theta=...).rope_scaling == want
    both = spec(rope_scaling=LLAMA3, rope_parameters=LLAMA3)
    assert both.rope_scaling == want and both.rope_theta == 5e5
    assert spec(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_theta == 1e6
    assert spec(rope_theta=...).rope_theta == 10000.0 and spec().rope_scaling is None


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={**LLAMA3, "low_freq_factor": 4.0}), "low_freq_factor < high_freq_factor"),
    (dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "factor"}), "lacks 'factor'"),
    (dict(rope_scaling={**LLAMA3, "factor": "8"}), r"factor='8' must be a number"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(rope_theta=0.5), "rope_theta=0.5"),
    (dict(rope_scaling=[1, 2]), r"rope_scaling=\[1, 2\] must be an object"),
])
def test_bad_rope_fields(change, message):
    with pytest.raises((UnsupportedModelError, CheckpointError), match=message):
        spec(**change)


# ---- required and typed fields ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                 "intermediate_size"])
def test_missing_required_field(key):
    with pytest.raises(CheckpointError, match=f"lacks the required field '{key}'"):
        spec(**{key: ...})


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size="64"), "hidden_size='64' must be an integer"),
    (dict(num_hidden_layers=True), "num_hidden_layers=True must be an integer"),
    (dict(num_attention_heads=0), "must be a positive integer"),
    (dict(rms_norm_eps="tiny"), "rms_norm_eps='tiny' must be a number"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps=-1.0"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings='yes' must be true or false"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id"),
    (dict(architectures="LlamaForCausalLM"), "expected exactly one architecture"),
])
def test_mistyped_field(change, message):
    with pytest.raises((CheckpointError, UnsupportedModelError), match=message):
        spec(**change)


def test_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="not a JSON object"):
        ModelSpec.from_config_file(tmp_path / "config.json")


def test_integral_float_accepted():
    assert spec(hidden_size=64.0).hidden_size == 64


# ---- sliding windows ---------------------------------------------------------------------------------
QWEN = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 1024}


@pytest.mark.parametrize("max_window_layers, max_pos", [
    (0, 1024),      # every layer slides
    (2, 1024),      # layers 2 and 3 slide: capping at the window is exact for the full layers too
    (4, 8192),      # no layer slides (i >= 4 never holds): the whole context stays
    (28, 8192),
])
def test_qwen_window_layers(max_window_layers, max_pos):
    """transformers slides layer i when i >= max_window_layers."""
    s = ModelSpec.from_hf_config({**QWEN, "max_window_layers": max_window_layers})
    assert s.max_position_embeddings == max_pos


def test_qwen_window_rules():
    assert ModelSpec.from_hf_config({**QWEN, "use_sliding_window": False}).max_position_embeddings == 8192
    layer_types = ["full_attention"] * 3 + ["sliding_attention"]
    assert ModelSpec.from_hf_config({**QWEN, "layer_types": layer_types}).max_position_embeddings == 1024
    assert ModelSpec.from_hf_config({**QWEN, "layer_types": ["full_attention"] * 4}).max_position_embeddings == 8192
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 512}
    assert ModelSpec.from_hf_config(mistral).max_position_embeddings == 512
