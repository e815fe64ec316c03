"""Byte-level UTF-8 tokenizer: token id == byte value (0-255)."""

from __future__ import annotations

import codecs
from collections.abc import Iterable

VOCAB_SIZE = 256
KIND = "bytes-utf8"


def encode(text: str) -> list[int]:
    """Encode any Unicode string as its UTF-8 bytes (lone surrogates escaped)."""
    return list(text.encode("utf-8", errors="surrogatepass"))


def decode(ids: Iterable[int]) -> str:
    """Decode ids to text; invalid UTF-8 becomes U+FFFD."""
    return bytes(_check(i) for i in ids).decode("utf-8", errors="replace")


def token_text(token_id: int) -> str:
    """Readable form of one token: the character, or a `<0xNN>` escape if it is not valid UTF-8 alone."""
    b = bytes([_check(token_id)])
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return f"<0x{token_id:02X}>"


def _check(token_id: int) -> int:
    if not 0 <= token_id < VOCAB_SIZE:
        raise ValueError(f"token id {token_id} is outside the byte vocabulary 0..255")
    return token_id


class IncrementalDecoder:
    """Turns a stream of byte tokens into text without ever splitting a multi-byte character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly '')."""
        return self._decoder.decode(bytes([_check(token_id)]))

    @property
    def pending(self) -> bool:
        """Whether bytes of a character not yet complete are held."""
        return bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        """Return what is left at the end of the stream (U+FFFD for an incomplete character)."""
        return self._decoder.decode(b"", final=True)
