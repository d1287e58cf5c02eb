"""monokernel: the whole LLM decode step in one generated CUDA kernel launch.

    from monokernel import Engine, SamplingParams

The names are imported on first use, so `import monokernel` (the CLI's --version, a tool reading __version__)
does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "__version__"]

_LAZY = {"Engine": "monokernel.runtime.engine", "SamplingParams": "monokernel.runtime.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'monokernel' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
