"""Loads a Hugging Face checkpoint directory: config.json + one or many *.safetensors files.

Tensors are read lazily, one at a time, and packed straight into the engine layout, so peak host
memory is about one packed model plus one tensor, never two copies of the checkpoint.

A config.json with a `quantization_config` (GPTQ, AWQ, compressed-tensors: models/quant/hf_config.py) has its
linear layers read through that scheme, kept packed as QuantTensors; anything it cannot honour is refused by
field and value before a tensor is read.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..errors import CheckpointError, UnsupportedModelError
from .quant.hf_config import scheme_for
from .spec import ModelSpec
from .weights import PackedWeights, pack_from_hf

INDEX_FILE = "model.safetensors.index.json"


def load_safetensors_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                                device: torch.device | str = "cpu") -> tuple[ModelSpec, PackedWeights]:
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config} not found: a checkpoint directory needs the model's config.json "
                              "(download it with the weights, or save the model with save_pretrained)")
    spec = ModelSpec.from_config_file(config)
    scheme = scheme_for(json.loads(config.read_text()))
    shards = _tensor_locations(path)
    opened: dict[Path, object] = {}
    used: set[str] = set()

    def get(name: str):
        module = name.removesuffix(".weight")
        if scheme is not None and name.endswith(".weight") and scheme.quantised(module, shards.__contains__):
            return scheme.matrix(module, raw)
        return raw(name)

    def raw(name: str) -> torch.Tensor:
        used.add(name)
        shard = shards.get(name)
        if shard is None:
            raise CheckpointError(f"tensor {name!r} is in none of the safetensors files in {path}; "
                                  "the checkpoint is incomplete or not a supported architecture")
        try:
            if shard not in opened:
                opened[shard] = safe_open(str(shard), framework="pt")
            f = opened[shard]
            if name not in f.keys():
                raise CheckpointError(f"{INDEX_FILE} places tensor {name!r} in {shard}, which does not hold it; "
                                      "re-download the checkpoint")
            return f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{shard} is truncated or corrupt ({e}); re-download it") from None

    layers = tqdm(range(spec.num_layers), desc=f"loading {spec.name}", unit="layer", file=sys.stderr,
                  disable=not sys.stderr.isatty(), leave=False)
    weights = pack_from_hf(spec, get, dtype, device, progress=layers)
    # A tensor the packed layout has no place for (e.g. o_proj.bias of a Llama with attention_bias) would
    # be dropped silently and change the model's output, so it is an error, not a warning.
    ignored = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    # what a quantisation scheme reads or may drop (g_idx of a matrix in group order, input_scale of W8A8)
    droppable = tuple(f".{x}" for x in scheme.suffixes) if scheme is not None else ()
    unused = sorted(n for n in shards if n not in used and n not in ignored and not n.endswith("rotary_emb.inv_freq")
                    and not (droppable and n.endswith(droppable)))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise UnsupportedModelError(f"{path} holds tensors the engine has no place for: {', '.join(unused[:3])}{more}; "
                                    f"this variant of {spec.arch} is not supported")
    return spec, weights


def _tensor_locations(path: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it, from the index when there is one, else from the file headers."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); re-download it") from None
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / shard} is missing: {INDEX_FILE} lists it as a shard; "
                                      "download every shard the index names")
        return {name: path / shard for name, shard in weight_map.items()}

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}: download the weights in safetensors format "
                              "(.bin / .pt checkpoints are not read; convert with save_pretrained(safe_serialization=True))")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                where.update((name, file) for name in f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it") from None
    return where
