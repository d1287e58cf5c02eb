"""monokernel: the whole LLM decode step in one generated CUDA kernel launch."""

__version__ = "0.1.0"
