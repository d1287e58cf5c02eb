"""The host side of a decode step, where it keeps state between steps (perf note 39): Sequence's stop-string
search and hold-back, the Scheduler's sampling rows, the logits rows it hands requests, and MegaDecoder's
record of whether any row asks for top-k / top-p. Each against the obvious rule it shortcuts (CPU)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monokernel import gumbel
from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine
from monokernel.runtime.requests import Request
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler
from monokernel.runtime.sequence import Sequence

from conftest import ENGINE_SPEC as SPEC

PROMPTS = [[3, 17, 9, 44, 5, 21, 8], [30], [12, 7, 7, 58, 1, 2, 3, 4, 5, 6, 7, 8, 9], [5, 5, 6], [40, 41]]


class Pieces:
    """A detokeniser whose token i releases pieces[i] (flush: nothing left)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def push(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        return ""


def released_by_rule(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], str | None]:
    """The obvious rule over the whole text after every token: cut at the first stop string anywhere; else
    release all but the longest tail that is a proper prefix of a stop string."""
    deltas, out, text = [], "", ""
    for piece in pieces:
        text += piece
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            deltas.append(text[:min(cuts)][len(out):])
            return deltas, "stop"
        held = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        deltas.append(text[:len(text) - held][len(out):])
        out = text[:len(text) - held]
    return deltas, None


@pytest.mark.parametrize("seed", range(40))
def test_sequence_stop_strings_as_the_rule(seed):
    """Random pieces (empty ones included) over a small alphabet against stop strings that share characters:
    the deltas Sequence.append releases equal the whole-text rule's, and so does the finish."""
    rng = random.Random(seed)
    stop = tuple(rng.choice(["ab:", "\n\n", "b", "a:a", "::b:"]) for _ in range(rng.randint(1, 3)))
    pieces = ["".join(rng.choice("ab:\nc") for _ in range(rng.randint(0, 3))) for _ in range(40)]
    seq = Sequence(0, [1], len(pieces) + 1, frozenset(), stop, Pieces(pieces))
    got = []
    for i in range(len(pieces)):
        ev = seq.append(i)
        got.append(ev.text)
        if ev.finish_reason:
            break
    want, reason = released_by_rule(pieces, stop)
    assert got == want and seq.finish_reason == reason
    assert seq.text == "".join(got) or reason is None


def test_sequence_holds_back_a_stop_prefix():
    """A tail that could still become a stop string waits; a character that ends no stop prefix releases it."""
    seq = Sequence(0, [1], 10, frozenset(), ("END",), Pieces(["abc E", "N", "x", "EN", "D"]))
    assert [seq.append(i).text for i in range(3)] == ["abc ", "", "ENx"]
    ev3, ev4 = seq.append(3), seq.append(4)
    assert (ev3.text, ev4.text, ev4.finish_reason, seq.text) == ("", "", "stop", "abc ENx")
