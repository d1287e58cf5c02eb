"""One sequence's generation state: its tokens, its streamed text and why it stopped.

Text is produced incrementally (a StreamDecoder per sequence) and released in deltas; while the text
ends with the beginning of a stop string the ambiguous tail is held back, so a stop string never leaks
into the stream and the concatenated deltas always equal the final `Generation.text`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.tokenizer import StreamDecoder


@dataclass
class Generation:
    text: str                    # the continuation only, special tokens and any stop string removed
    token_ids: list[int]         # generated ids, including the eos or stop-completing token
    prompt_token_ids: list[int]
    finish_reason: str           # "eos", "stop" (a stop string) or "length" (max_new_tokens)


@dataclass(frozen=True)
class TokenEvent:
    index: int                   # which sequence of the batch
    token_id: int
    text: str                    # text released by this token (may be empty)
    finish_reason: str | None    # set on the sequence's last event


class Sequence:
    def __init__(self, index: int, prompt_ids: list[int], max_new_tokens: int, eos_ids: frozenset[int],
                 stop: tuple[str, ...], detok: StreamDecoder | None):
        self.index, self.prompt_ids, self.max_new_tokens = index, prompt_ids, max_new_tokens
        self.eos_ids, self.stop, self.detok = eos_ids, stop, detok
        # the tails that could still grow into a stop string (s[:k], k < len(s)) by their last character,
        # longest first: each token checks only those ending in the text's last character
        self._stop_tails: dict[str, list[str]] = {}
        for s in stop:
            for k in range(1, len(s)):
                self._stop_tails.setdefault(s[k - 1], []).append(s[:k])
        for tails in self._stop_tails.values():
            tails.sort(key=len, reverse=True)
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0             # characters of self.text already released
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> TokenEvent:
        return TokenEvent(self.index, token_id, *self.add(token_id))

    def add(self, token_id: int) -> tuple[str, str | None]:
        """append() without the event: (the text released, the finish reason or None). For a caller that
        builds its own event (Request.take): a frozen dataclass costs about 1 us to build, per token."""
        self.token_ids.append(token_id)
        before = len(self.text)
        reason = "eos" if token_id in self.eos_ids else ("length" if len(self.token_ids) >= self.max_new_tokens else None)
        if self.detok is not None:
            piece = self.detok.push(token_id)
            if reason is not None:
                piece += self.detok.flush()
            # appended to a local holding the only reference, CPython grows the string in place; `self.text +=`
            # copies the whole text every token (O(n^2) over a long generation)
            text, self.text = self.text, ""
            text += piece
            self.text = text
        # without new characters no new match: an old one would have stopped the sequence already
        cut = self._find_stop(before) if len(self.text) > before else None
        if cut is not None:
            self.text, reason = self.text[:cut], "stop"
        self.finish_reason = reason
        end = len(self.text) if reason else len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return delta, reason

    def _find_stop(self, before: int) -> int | None:
        # earlier text was searched already: a new match must end inside the new characters
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        if not self.text:
            return 0
        return next((len(t) for t in self._stop_tails.get(self.text[-1], ()) if self.text.endswith(t)), 0)

    def result(self) -> Generation:
        return Generation(self.text, list(self.token_ids), list(self.prompt_ids), self.finish_reason or "length")
