"""The step's input check as the kernel does it (templates/kernel/step_check.cuh), for the host's messages
and the simulator: a token outside the vocabulary or a position outside the KV cache makes a step do
nothing at all, reported through the error words (schedule.abi.ERROR_WORDS)."""
from __future__ import annotations

import torch

from .abi import ERROR_MESSAGES, ERRORS

BAD_TOKEN = next(e.code for e in ERRORS if e.name == "ERR_BAD_TOKEN")
BAD_POSITION = next(e.code for e in ERRORS if e.name == "ERR_BAD_POSITION")
BAD_VERIFY_POSITION = next(e.code for e in ERRORS if e.name == "ERR_BAD_VERIFY_POSITION")


def bad_input(tokens: torch.Tensor, positions: torch.Tensor, vocab: int, max_seq: int, tokens_per_seq: int = 1
              ) -> tuple[int, int, int] | None:
    """(code, row, value) of an out-of-range input (the lowest row; the kernel reports any one). A verify step's
    rows of one sequence must hold consecutive positions: a row that does not follow the row before it."""
    toks, poss = tokens.tolist(), positions.tolist()
    for b, (tok, pos) in enumerate(zip(toks, poss)):
        if not 0 <= tok < vocab:
            return BAD_TOKEN, b, tok
        if not 0 <= pos < max_seq:
            return BAD_POSITION, b, pos
        if b % tokens_per_seq and pos != poss[b - 1] + 1:
            return BAD_VERIFY_POSITION, b, pos
    return None


def input_error_message(code: int, step: int, seq: int, value: int, vocab: int, max_seq: int) -> str:
    if code == BAD_VERIFY_POSITION:
        return (f"step {step}: {ERROR_MESSAGES[code]}: row {seq} has position {value}, not one past the row before "
                "it; the step did nothing")
    limit, n = (("vocabulary", vocab) if code == BAD_TOKEN else ("KV cache", max_seq))
    unit = "tokens" if code == BAD_TOKEN else "positions"
    return (f"step {step}: {ERROR_MESSAGES[code]}: sequence {seq} has {value}, outside the {limit} of {n} {unit} "
            f"(0..{n - 1}); the step did nothing")
