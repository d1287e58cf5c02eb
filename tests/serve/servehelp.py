"""What the server tests share: the default model loaded once per session, a decoder wrapper that fails on demand.
(Not a conftest.py: the tests import the root conftest by that name.)"""
from __future__ import annotations

import functools

import pytest

SERVE_MAX_SEQ = 1024     # context of the test engine: 8 slots of fp32 K/V stay at 0.4 GB


class Faults:
    """Armed, the next decoder step raises (once); shared by every decoder the scheduler (re)builds."""

    def __init__(self):
        self.armed = False

    def wrap(self, decoder):
        return FaultyDecoder(decoder, self)


class FaultyDecoder:
    def __init__(self, decoder, faults: Faults):
        self.decoder, self.faults = decoder, faults

    def step(self, tokens, positions):
        if self.faults.armed:
            self.faults.armed = False
            raise RuntimeError("injected fault")
        return self.decoder.step(tokens, positions)


@functools.cache
def load_default_engine():
    from monokernel.runtime.engine import Engine

    return Engine.load(max_seq=SERVE_MAX_SEQ, quiet=True)


@pytest.fixture
def default_engine():
    """The default model (SmolLM2-135M-Instruct, fp32 reference engine), one load for every test module."""
    return load_default_engine()
