"""Quantised checkpoints: tiny synthetic GPTQ, AWQ and compressed-tensors checkpoints packed here with each
format's published layout (the packers and the dequantisation formulas below are written from the formats'
descriptions, independently of monokernel's loaders), a packed GGUF, and the bad inputs each loader must refuse.

For every checkpoint: each matrix's dequantize() equals the format's own formula bitwise, and the reference
engine's logits equal transformers' on the same dequantised weights (so q/k/v, gate/up and the row order are
right too)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from monokernel.errors import CheckpointError, UnsupportedModelError
from monokernel.models.load import load_model
from monokernel.models.quant import QuantTensor, dequantize
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

from conftest import FP32_ATOL, FP32_RTOL
from hf_tiny import tiny_hf_model

VOCAB, H, I = 211, 64, 96
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _hf(arch: str = "llama", hidden: int = H, inter: int = I) -> transformers.PreTrainedModel:
    return tiny_hf_model(VOCAB, hidden, inter, arch)


def _linears(model):
    """(module name, N, K) of each quantisable linear layer's weight."""
    for name, p in model.state_dict().items():
        module = name.removesuffix(".weight")
        if any(module.endswith(m) for m in LINEARS):
            yield (module, *p.shape)


def _words(values: np.ndarray, axis: int, bits: int = 4, order=None) -> torch.Tensor:
    """Unsigned `bits`-bit values packed 32/bits to an int32 word along `axis`: slot i of a word holds element
    order[i] of its run (default: element i), at bits*i."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    order = list(range(per)) if order is None else order
    word = np.zeros(v.shape[:-1], dtype=np.uint64)
    for i, col in enumerate(order):
        word |= v[..., col] << np.uint64(bits * i)
    return torch.from_numpy(np.moveaxis(word.astype(np.uint32).view(np.int32), -1, axis).copy())


def _save(path, model, tensors: dict, quantization_config: dict | None):
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def _rest(model) -> dict:
    """Every tensor that is not a quantised linear layer's weight."""
    return {k: v for k, v in model.state_dict().items() if not any(f".{m}.weight" in k for m in LINEARS)}


def _check(path, model, formula: dict):
    """dequantize() of every packed matrix equals the formula's weights bitwise (in fp32, and in the scales' dtype),
    and the whole model's logits equal transformers' with those weights."""
    loaded = load_model(str(path), dtype=torch.float32)
    w = loaded.weights
    for layer in range(2):
        p = f"model.layers.{layer}."
        dense = {m: formula[p + m] for m in LINEARS}
        got_qkv = w.w_qkv[layer]
        assert isinstance(got_qkv, QuantTensor)
        assert torch.equal(dequantize(got_qkv), torch.cat([dense[m] for m in LINEARS[:3]]))
        assert torch.equal(dequantize(w.w_o[layer]), dense["self_attn.o_proj"])
        assert torch.equal(dequantize(w.w_gu[layer])[0::2], dense["mlp.gate_proj"])
        assert torch.equal(dequantize(w.w_gu[layer])[1::2], dense["mlp.up_proj"])
        assert torch.equal(dequantize(w.w_down[layer]), dense["mlp.down_proj"])
        half = dequantize(w.w_down[layer], torch.float16)
        assert torch.equal(half, formula.get(p + "mlp.down_proj#fp16", dense["mlp.down_proj"].half()))
    with torch.no_grad():
        for name, t in formula.items():
            if "#" not in name:
                model.get_parameter(name + ".weight").copy_(t)
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        expected = model(tokens).logits.float()
    cache = KVCache(w.spec, 2, 16, torch.float32, "cpu")
    got = ReferenceModel(w).forward(tokens, torch.zeros(2, dtype=torch.long), cache)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL)
    return w


def _codes(shape, gen, lo=0, hi=16):
    return torch.randint(lo, hi, shape, generator=gen)


def _fp16_scales(shape, gen, dtype=torch.float16):
    return (torch.rand(shape, generator=gen) * 0.01 + 0.005).to(dtype)


# ---- GPTQ --------------------------------------------------------------------------------------
def _gptq(model, group: int, sym: bool, v1: bool, scale_dtype=torch.float16, g_idx=True):
    """qweight (K/8, N) packed along K; qzeros (K/g, N/8) packed along N holding zero - 1 (v1) or zero (v2);
    scales (K/g, N). Published formula: W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k]."""
    gen = torch.Generator().manual_seed(7)
    tensors, formula = _rest(model), {}
    for module, n, k in _linears(model):
        q = _codes((k, n), gen)
        zero = torch.full((k // group, n), 8) if sym else _codes((k // group, n), gen, 1, 16)
        scales = _fp16_scales((k // group, n), gen, scale_dtype)
        gi = torch.arange(k) // group
        tensors[module + ".qweight"] = _words(q.numpy(), axis=0)
        tensors[module + ".qzeros"] = _words((zero - (1 if v1 else 0)).numpy(), axis=1)
        tensors[module + ".scales"] = scales
        if g_idx:
            tensors[module + ".g_idx"] = gi.to(torch.int32)
        for dt, tag in ((torch.float32, ""), (scale_dtype, "#scale")):
            formula[module + tag] = (scales[gi].to(dt) * (q - zero[gi]).to(dt)).T.contiguous()
    config = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": False,
              "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return tensors, formula, config


@pytest.mark.parametrize("sym,v1", [(False, True), (True, True), (False, False)], ids=["asym-v1", "sym-v1", "asym-v2"])
def test_gptq(tmp_path, sym, v1):
    model = _hf("qwen2")
    tensors, formula, config = _gptq(model, 32, sym, v1)
    w = _check(_save(tmp_path / "m", model, tensors, config), model, formula)
    assert w.format.name == ("int4-g32" if sym else "int4-g32-zp")


def test_gptq_g128_bf16_scales(tmp_path):
    """Group 128 and bf16 scales (GPTQModel writes the model's dtype) -> int4-g128-zp-bf16."""
    model = _hf(hidden=128, inter=256)
    tensors, formula, config = _gptq(model, 128, sym=False, v1=True, scale_dtype=torch.bfloat16, g_idx=False)
    w = _check(_save(tmp_path / "m", model, tensors, config), model, formula)
    assert w.format.name == "int4-g128-zp-bf16"


def test_gptq_bad(tmp_path):
    """Bad GPTQ checkpoints: act-order g_idx, missing qzeros, a group size that does not divide K, 8 bits, a v1
    zero that overflows, an unknown quant_method."""
    model = _hf()
    tensors, _, config = _gptq(model, 32, sym=False, v1=True)
    bad = dict(tensors)
    m = "model.layers.0.mlp.down_proj"
    bad[m + ".g_idx"] = torch.randperm(I).to(torch.int32) // 32
    with pytest.raises(UnsupportedModelError, match=r"down_proj\.g_idx is not k // group_size: desc_act=True"):
        load_model(str(_save(tmp_path / "actorder", model, bad, {**config, "desc_act": True})), dtype=torch.float32)
    bad = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.qzeros"}
    with pytest.raises(CheckpointError, match=r"GPTQ tensor model\.layers\.1\.self_attn\.k_proj\.qzeros is missing"):
        load_model(str(_save(tmp_path / "noz", model, bad, config)), dtype=torch.float32)
    t32, _, _ = _gptq(model, 32, sym=False, v1=True, g_idx=False)
    with pytest.raises(UnsupportedModelError, match=r"down_proj: quantization_config\.group_size=64 does not divide K=96"):
        load_model(str(_save(tmp_path / "g", model, _regroup(t32), {**config, "group_size": 64})), dtype=torch.float32)
    for key, value, message in (("bits", 8, r"quantization_config\.bits=8 is not supported"),
                                ("quant_method", "bitsandbytes",
                                 r"quantization_config\.quant_method='bitsandbytes' is not supported: supported: gptq, awq"),
                                ("group_size", -1, r"quantization_config\.group_size=-1 is not supported"),
                                ("checkpoint_format", "marlin", r"checkpoint_format='marlin'")):
        with pytest.raises(UnsupportedModelError, match=message):
            load_model(str(_save(tmp_path / key, model, tensors, {**config, key: value})), dtype=torch.float32)
    over = dict(tensors)
    z = np.full((H // 32, H), 15)                    # a v1 stored zero of 15 reads as 16
    over["model.layers.0.self_attn.o_proj.qzeros"] = _words(z, axis=1)
    with pytest.raises(UnsupportedModelError, match="v1 zero point stored as 15"):
        load_model(str(_save(tmp_path / "over", model, over, config)), dtype=torch.float32)


def _regroup(tensors):
    """Scales and zeros of group 64 for every matrix whose K it divides (K=64), leaving down_proj (K=96) at
    group 32's shapes: the loader must name it as the matrix group 64 does not divide."""
    out = dict(tensors)
    for k in list(out):
        if k.endswith((".scales", ".qzeros")) and ".down_proj." not in k:
            out[k] = out[k][0::2]
    return out


# ---- AWQ ---------------------------------------------------------------------------------------
def test_awq(tmp_path):
    """AWQ GEMM: qweight (K, N/8), qzeros (K/g, N/8), columns in the order [0, 2, 4, 6, 1, 3, 5, 7] within a
    word; W[n, k] = (q[k, n] - zero[k // g, n]) * scales[k // g, n]."""
    model = _hf()
    gen = torch.Generator().manual_seed(3)
    tensors, formula, g = _rest(model), {}, 32
    for module, n, k in _linears(model):
        q, zero, scales = _codes((k, n), gen), _codes((k // g, n), gen), _fp16_scales((k // g, n), gen)
        tensors[module + ".qweight"] = _words(q.numpy(), axis=1, order=AWQ_ORDER)
        tensors[module + ".qzeros"] = _words(zero.numpy(), axis=1, order=AWQ_ORDER)
        tensors[module + ".scales"] = scales
        rows = torch.arange(k) // g
        for dt, tag in ((torch.float32, ""), (torch.float16, "#scale")):
            formula[module + tag] = ((q - zero[rows]).to(dt) * scales[rows].to(dt)).T.contiguous()
    config = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"}
    w = _check(_save(tmp_path / "m", model, tensors, config), model, formula)
    assert w.format.name == "int4-g32-zp"
    with pytest.raises(UnsupportedModelError, match=r"quantization_config\.version='gemv' is not supported"):
        load_model(str(_save(tmp_path / "gemv", model, tensors, {**config, "version": "gemv"})), dtype=torch.float32)
    bad = {k: v for k, v in tensors.items() if k != "model.layers.0.mlp.up_proj.qzeros"}
    with pytest.raises(CheckpointError, match=r"AWQ tensor model\.layers\.0\.mlp\.up_proj\.qzeros is missing"):
        load_model(str(_save(tmp_path / "noz", model, bad, config)), dtype=torch.float32)


# ---- compressed-tensors ------------------------------------------------------------------------
def _ct_config(fmt: str, kind: str, bits: int, strategy: str, symmetric=True, group=None, block=None):
    w = {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy, "group_size": group,
         "block_structure": block, "dynamic": False, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None}}}


@pytest.mark.parametrize("case", ["w4a16-sym", "w4a16-asym", "w8a16-packed", "w8a16-int", "fp8-channel",
                                  "fp8-tensor", "fp8-block"])
def test_compressed_tensors(tmp_path, case):
    """pack-quantized: signed codes + 2^(bits-1), 32/bits to an int32 word along K (element i at bits*i), zero
    points packed the same way along N; int-quantized: int8; float-quantized: e4m3. W = (q - zp) * scale in the
    scale's dtype."""
    model = _hf()
    gen = torch.Generator().manual_seed(5)
    tensors, formula, g = _rest(model), {}, 32
    for module, n, k in _linears(model):
        zp = None
        if case.startswith("w4a16"):
            q = _codes((n, k), gen, -8, 8)
            scale = _fp16_scales((n, k // g), gen, torch.bfloat16)
            tensors[module + ".weight_packed"] = _words((q + 8).numpy(), axis=1)
            tensors[module + ".weight_shape"] = torch.tensor([n, k], dtype=torch.int32)
            if case == "w4a16-asym":
                zp = _codes((n, k // g), gen, -8, 8)
                tensors[module + ".weight_zero_point"] = _words((zp + 8).numpy(), axis=0)
            full = scale.repeat_interleave(g, 1)
            zfull = 0 if zp is None else zp.repeat_interleave(g, 1)
        elif case.startswith("w8a16"):
            q = _codes((n, k), gen, -127, 128)
            scale = _fp16_scales((n, 1), gen, torch.bfloat16)
            if case == "w8a16-packed":
                tensors[module + ".weight_packed"] = _words((q + 128).numpy(), axis=1, bits=8)
                tensors[module + ".weight_shape"] = torch.tensor([n, k], dtype=torch.int32)
            else:
                tensors[module + ".weight"] = q.to(torch.int8)
            full, zfull = scale, 0
        else:
            q = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
            tensors[module + ".weight"] = q
            if case == "fp8-block":
                scale = torch.rand(-(-n // 128), -(-k // 128), generator=gen) * 1e-3 + 1e-3        # fp32
                full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
            else:
                scale = _fp16_scales((n, 1) if case == "fp8-channel" else (1,), gen, torch.bfloat16) / 10
                full = scale
            tensors[module + ".input_scale"] = torch.ones(1)        # a static activation scale, dropped
            zfull = 0
        tensors[module + ".weight_scale"] = scale
        for dt, tag in ((torch.float32, ""), (scale.dtype, "#scale")):
            formula[module + tag] = (q.to(dt) - torch.as_tensor(zfull).to(dt)) * full.to(dt)
    cfg = {"w4a16-sym": ("pack-quantized", "int", 4, "group", True, g), "w4a16-asym": ("pack-quantized", "int", 4, "group", False, g),
           "w8a16-packed": ("pack-quantized", "int", 8, "channel", True, None),
           "w8a16-int": ("int-quantized", "int", 8, "channel", True, None),
           "fp8-channel": ("float-quantized", "float", 8, "channel", True, None),
           "fp8-tensor": ("float-quantized", "float", 8, "tensor", True, None),
           "fp8-block": ("float-quantized", "float", 8, "block", True, None)}[case]
    config = _ct_config(*cfg, block=[128, 128] if case == "fp8-block" else None)
    w = _check(_save(tmp_path / "m", model, tensors, config), model, formula)
    if case == "fp8-block":   # q/k/v of 64 and 32 rows and interleaved gate/up rows take a scale per row
        assert {k: v for k, v in w.formats().items() if k.startswith("w_")} == {
            "w_qkv": ["fp8-g128"], "w_o": ["fp8-b128"], "w_gu": ["fp8-g128"], "w_down": ["fp8-b128"]}
        return
    expect = {"w4a16-sym": "int4-g32-bf16", "w4a16-asym": "int4-g32-zp-bf16"}
    assert w.format.name == expect.get(case, "fp8" if case.startswith("fp8") else "int8")


def test_compressed_tensors_refused(tmp_path):
    """Unsupported compressed-tensors configs are refused by field and value."""
    model = _hf()
    base = _ct_config("pack-quantized", "int", 4, "group", True, 32)
    group = lambda **w: {**base, "config_groups": {"group_0": {**base["config_groups"]["group_0"],
                                                               "weights": {**base["config_groups"]["group_0"]["weights"], **w}}}}
    cases = [({**base, "format": "marlin-24"}, r"quantization_config\.format='marlin-24'"),
             (group(num_bits=2), r"weights\.num_bits=2"),
             (group(strategy="channel"), r"weights\.strategy='channel'.*int 4-bit weights are read as: group"),
             (group(group_size=16), r"weights\.group_size=16"),
             ({**base, "kv_cache_scheme": {"num_bits": 8}}, r"quantization_config\.kv_cache_scheme"),
             ({**base, "config_groups": {"a": base["config_groups"]["group_0"], "b": base["config_groups"]["group_0"]}},
              r"quantization_config\.config_groups=\['a', 'b'\]")]
    for i, (config, message) in enumerate(cases):
        with pytest.raises(UnsupportedModelError, match=message):
            load_model(str(_save(tmp_path / str(i), model, _rest(model), config)), dtype=torch.float32)
