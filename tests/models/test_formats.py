"""The format table: names, byte counts of packed weights, and the errors for formats the kernel cannot run."""
import pytest
import torch

from monokernel.errors import InputError, UnsupportedModelError
from monokernel.models.formats import FORMATS, Format, get_format, kernel_activation
from monokernel.models.presets import preset
from monokernel.schedule.inputs import KernelInputs


def test_lookup_by_name_alias_and_dtype():
    assert get_format("BF16") is get_format("bfloat16") is get_format(torch.bfloat16) is FORMATS["bf16"]
    assert get_format("half").torch_dtype == torch.float16 and get_format(torch.float32).element_bytes == 4
    with pytest.raises(InputError, match="dtype 'int3' is not supported; use one of bf16, fp16, fp32"):
        get_format("int3")
    with pytest.raises(UnsupportedModelError, match="runs bf16 or fp16 activations, not fp32"):
        kernel_activation(torch.float32)


def test_packed_bytes():
    """Packed bytes count codes and scales. A 4-bit group-128 format (the shape quantised rows will take): codes plus
    one fp16 scale a group."""
    int4 = Format("int4-g128", 4, torch.uint8, "uint8_t", group_size=128, scale_format="fp16")
    assert int4.bytes_for(4096 * 4096, 4096) == 4096 * 4096 // 2 + 4096 * 32 * 2
    with pytest.raises(ValueError, match="count with bytes_for"):
        int4.element_bytes
    with pytest.raises(ValueError, match="group size and a scale format go together"):
        Format("bad", 4, torch.uint8, None, group_size=32)


def test_weight_bytes_per_step():
    """weight_bytes_per_step matches the parameter count."""
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        s = preset(name)
        untied = 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size
        assert s.weight_bytes_per_step("bf16") == (s.num_params() - untied) * 2
        assert s.weight_bytes_per_step(torch.float32) == (s.num_params() - untied) * 4


def test_kernel_inputs_formats():
    """KernelInputs keep the weight and activation formats apart."""
    i = KernelInputs(preset("llama-3.2-1b"), 1, 4096, "bf16", torch.bfloat16)
    assert i.weights is FORMATS["bf16"] and i.activations is FORMATS["bf16"] and i.wb == i.ab == 2
    with pytest.raises(UnsupportedModelError, match="fp16 weights with bf16 activations are not supported yet"):
        KernelInputs(preset("llama-3.2-1b"), 1, 4096, "fp16", "bf16")
    with pytest.raises(UnsupportedModelError, match="cannot read fp32 weights"):
        KernelInputs(preset("llama-3.2-1b"), 1, 4096, "fp32", "bf16")
