"""The step's input check as the kernel does it (templates/kernel/step_check.cuh), for the host's messages
and the simulator: a token outside the vocabulary or a position outside the KV cache makes a step do
nothing at all, reported through the error words (schedule.abi.ERROR_WORDS)."""
from __future__ import annotations

import torch

from .abi import ERROR_MESSAGES, ERRORS

BAD_TOKEN = next(e.code for e in ERRORS if e.name == "ERR_BAD_TOKEN")
BAD_POSITION = next(e.code for e in ERRORS if e.name == "ERR_BAD_POSITION")


def bad_input(tokens: torch.Tensor, positions: torch.Tensor, vocab: int, max_seq: int) -> tuple[int, int, int] | None:
    """(code, sequence, value) of an out-of-range input (the lowest sequence; the kernel reports any one)."""
    for b, (tok, pos) in enumerate(zip(tokens.tolist(), positions.tolist())):
        if not 0 <= tok < vocab:
            return BAD_TOKEN, b, tok
        if not 0 <= pos < max_seq:
            return BAD_POSITION, b, pos
    return None


def input_error_message(code: int, step: int, seq: int, value: int, vocab: int, max_seq: int) -> str:
    limit, n = (("vocabulary", vocab) if code == BAD_TOKEN else ("KV cache", max_seq))
    unit = "tokens" if code == BAD_TOKEN else "positions"
    return (f"step {step}: {ERROR_MESSAGES[code]}: sequence {seq} has {value}, outside the {limit} of {n} {unit} "
            f"(0..{n - 1}); the step did nothing")
