"""From decoded tokens to the text a client sees: whole characters only, cut at the first stop sequence.

    first_stop(text, stops)     where the earliest stop sequence begins (None: none does)
    partial_stop(text, stops)   how much of the end of `text` could be the start of a stop sequence
    StopText                    a growing text cut at its first stop sequence; streaming never sends a
                                character past one (what could still become one is held back)
    TextDeltas                  a growing list of tokens as text deltas, never half a character
    CompletionText              both: a decode's tokens as the client's text, and the tokens through the
                                one that completed the stop sequence

Stop sequences are matched on the decoded text (OpenAI's rule), not on tokens: a stop sequence may
span tokens, and a speculative step may emit several tokens past it. The text is cut where the
stop sequence begins (it is not included), and the tokens kept are those up to the one that
completed it, so a speculative configuration reports the same text and token count as AR would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop sequence in `text[start:]` begins (None: none does)."""
    found = [at for stop in stops if (at := text.find(stop, start)) >= 0]
    return min(found, default=None)


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the start (not the whole) of a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopText:
    """A text arriving in pieces, cut at its first stop sequence.

    `add` answers the part that is safe to send now: never anything past a stop sequence, and
    not the end of the text while it could still be the start of one (it comes with a later
    piece, or with `flush` at the end). Once a stop sequence is found, `stopped` is set and
    nothing more is taken.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self._longest = max(map(len, self.stops), default=0)
        self.text = ""
        self._sent = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        # an occurrence not found before ends in the new piece, so it starts at most longest-1 earlier
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        at = first_stop(self.text, self.stops, start)
        if at is not None:
            self.stopped = True
            self.text = self.text[:at]
            return self._release(at)
        return self._release(len(self.text) - partial_stop(self.text, self.stops))

    def flush(self) -> str:
        """The held-back end, once no more text comes."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece, self._sent = self.text[self._sent:end], max(self._sent, end)
        return piece


class TextDeltas:
    """Turns a growing list of tokens into text deltas for streaming.

    Byte-level BPE can split one character over several tokens; while the decoded text ends
    in a replacement character the delta is held back, so no client sees half a character.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._sent = ""

    def add(self, tokens: list[int]) -> str:
        self._tokens.extend(tokens)
        text = self._decode(self._tokens)
        if text.endswith("\ufffd") or not text.startswith(self._sent):
            return ""
        return self._take(text)

    def flush(self) -> str:
        text = self._decode(self._tokens)
        return self._take(text) if text.startswith(self._sent) else ""

    def _take(self, text: str) -> str:
        delta, self._sent = text[len(self._sent):], text
        return delta


class CompletionText:
    """A decode's tokens, step by step, as the text the client gets (whole characters, cut at the first
    stop sequence); `tokens` holds the tokens through the one that completed the stop sequence."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._deltas = TextDeltas(decode)
        self._stop = StopText(stops)
        self.tokens: list[int] = []

    @property
    def stopped(self) -> bool:
        """A stop sequence was found: decoding should stop."""
        return self._stop.stopped

    @property
    def text(self) -> str:
        """The text so far (cut at the stop sequence once found; held-back characters included)."""
        return self._stop.text

    def add(self, tokens: list[int]) -> str:
        """One step's tokens; answers the text safe to send now."""
        if self.stopped:
            return ""
        self.tokens.extend(tokens)
        piece = self._stop.add(self._deltas.add(tokens))
        if self.stopped:
            self.tokens = self.tokens[:self._completing()]
        return piece

    def flush(self) -> str:
        """The rest once decoding ended: held-back characters, unless they turn out to start a stop sequence."""
        piece = self._stop.add(self._deltas.flush())
        if self.stopped:
            return piece
        return piece + self._stop.flush()

    def _completing(self) -> int:
        """The fewest tokens whose text holds a stop sequence (more tokens only add text: a binary search)."""
        low, high = 1, len(self.tokens)  # high's text holds one
        while low < high:
            middle = (low + high) // 2
            if first_stop(self._decode(self.tokens[:middle]), self._stop.stops) is None:
                low = middle + 1
            else:
                high = middle
        return high
