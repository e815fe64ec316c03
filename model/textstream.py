"""The text side of one request: byte tokens to text, stop strings, and what may be released so far."""

from __future__ import annotations

from model import tokenizer

_ASCII = tuple(chr(i) for i in range(128))  # a byte below 0x80 on its own is this character


class TextStream:
    """Text of a request's generated tokens, released as soon as it can no longer change.

    A multi-byte character is held until it is complete, and a tail that could still grow into a stop
    string is held until it cannot; the output ends before the first stop string.
    """

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.text = ""  # all decoded text so far (cut at a stop string once one is found)
        self.released = 0  # characters of `text` already handed out
        self._decoder = tokenizer.IncrementalDecoder()
        self._longest = max((len(s) for s in stop), default=0)
        self._plain = not stop  # no stop strings and no partial character held: an ASCII byte is released as is

    def push(self, token_id: int, last: bool = False) -> tuple[str, bool]:
        """Add one token (`last`: no more will come); return (newly released text, whether a stop string ended it)."""
        if self._plain and 0 <= token_id < 0x80:  # the common case: all text so far is released, nothing is held
            ch = _ASCII[token_id]
            self.text += ch
            self.released = len(self.text)
            return ch, False
        out = self._push(token_id, last)
        self._plain = not self.stop and not self._decoder.pending
        return out

    def _push(self, token_id: int, last: bool) -> tuple[str, bool]:
        self.text += self._decoder.push(token_id)
        stop_at = self._find_stop()
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self._release(len(self.text)), True
        if last:
            self.text += self._decoder.flush()
            return self._release(len(self.text)), False
        return self._release(self._releasable()), False

    def _release(self, upto: int) -> str:
        out = self.text[self.released : upto]
        self.released = max(self.released, upto)
        return out

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        # only the tail can contain a new match: look back over the longest stop string
        start = max(0, len(self.text) - self._longest - 4)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
        return min(hits) if hits else None

    def _releasable(self) -> int:
        """How much of `text` can be sent: hold back a tail that could still grow into a stop string."""
        text, hold = self.text, 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if s.startswith(text[-k:]):
                    hold = k
                    break
        return len(text) - hold
