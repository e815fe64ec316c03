"""Byte tokenizer: round trips, surrogates, the incremental decoder and id validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import tokenizer
from model.textstream import TextStream
from model.tokenizer import IncrementalDecoder, decode, encode, token_text

FAST = settings(max_examples=150, deadline=None)
# Every code point, lone surrogates (category Cs) included.
any_char = st.characters(categories=None, exclude_categories=())


def _is_surrogate(c: str) -> bool:
    return 0xD800 <= ord(c) <= 0xDFFF


@FAST
@given(st.text())
def test_round_trip_valid_unicode(text: str) -> None:
    ids = encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tokenizer.VOCAB_SIZE for i in ids)
    assert decode(ids) == text


@FAST
@given(st.text(alphabet=any_char))
def test_surrogates_encode_and_decode_as_replacement(text: str) -> None:
    ids = encode(text)  # never raises: lone surrogates are escaped (surrogatepass)
    assert bytes(ids) == text.encode("utf-8", errors="surrogatepass")
    # Each surrogate is 3 bytes ED xx xx that are invalid UTF-8: the decoder replaces each byte with U+FFFD.
    expected = "".join("\ufffd" * 3 if _is_surrogate(c) else c for c in text)
    assert decode(ids) == expected


def test_surrogate_pair_code_points_are_not_joined() -> None:
    assert encode("\ud83d\ude00") == [0xED, 0xA0, 0xBD, 0xED, 0xB8, 0x80]
    assert decode(encode("a\ud800b")) == "a\ufffd\ufffd\ufffdb"


def _stream(ids: list[int]) -> list[str]:
    dec = IncrementalDecoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


@FAST
@given(st.text())
def test_incremental_decoder_never_splits_a_character(text: str) -> None:
    pieces = _stream(encode(text))
    assert "".join(pieces) == text == decode(encode(text))
    emitted = ""
    for piece in pieces:
        assert "\ufffd" not in piece or "\ufffd" in text
        emitted += piece
        assert text.startswith(emitted)  # only whole characters, in order


def test_incremental_decoder_holds_multibyte_chars_until_complete() -> None:
    ids = encode("é€😀")  # 2, 3 and 4 bytes
    assert _stream(ids) == ["", "é", "", "", "€", "", "", "", "😀", ""]


@FAST
@given(st.binary())
def test_incremental_decoder_matches_decode_on_arbitrary_bytes(data: bytes) -> None:
    assert "".join(_stream(list(data))) == decode(list(data))


def test_flush_replaces_an_incomplete_character() -> None:
    dec = IncrementalDecoder()
    assert dec.push(0xE2) == "" and dec.push(0x82) == ""
    assert dec.flush() == "\ufffd"


def test_token_text() -> None:
    for i in range(0x80):
        assert token_text(i) == chr(i)
    for i in range(0x80, 0x100):  # a lone byte >= 0x80 is never valid UTF-8
        assert token_text(i) == f"<0x{i:02X}>"
    assert token_text(0xC3) == "<0xC3>"


@pytest.mark.parametrize("bad", [-1, 256, 1000])
def test_out_of_range_ids_raise(bad: int) -> None:
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        decode([65, bad])
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        token_text(bad)
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        IncrementalDecoder().push(bad)


def test_pending_while_a_character_is_incomplete() -> None:
    dec = IncrementalDecoder()
    assert not dec.pending
    dec.push(0xE2)
    assert dec.pending
    dec.push(0x82)
    assert dec.pending
    assert dec.push(0xAC) == "€" and not dec.pending
    dec.push(0xFF)  # invalid on its own: replaced at once, nothing held
    assert not dec.pending


def _pushes(stream: TextStream, ids: list[int], general: bool) -> list[tuple[str, bool]]:
    out = []
    for i, t in enumerate(ids):
        if general:
            stream._plain = False  # force the general path on every token
        out.append(stream.push(t, last=i == len(ids) - 1))
        if out[-1][1]:
            break
    return out


@FAST
@given(
    st.lists(st.one_of(st.integers(0x00, 0x7F), st.integers(0x80, 0xFF), st.sampled_from(encode("é€😀"))), max_size=40),
    st.sampled_from([(), ("ab",), ("\n\n", "é"), ("€x",)]),
)
def test_text_stream_ascii_fast_path_equals_the_general_path(ids: list[int], stop: tuple[str, ...]) -> None:
    """ASCII bytes with nothing held skip the decoder and the stop-string search: the same releases, text and stop."""
    fast, general = TextStream(stop), TextStream(stop)
    got, want = _pushes(fast, ids, False), _pushes(general, ids, True)
    assert got == want
    assert fast.text == general.text and fast.released == general.released
    if ids and not any(s for _, s in got):  # ended by `last`: everything was released
        assert "".join(t for t, _ in got) == fast.text == decode(ids)


def test_text_stream_holds_a_partial_character_across_ascii() -> None:
    s = TextStream()
    assert s.push(ord("a")) == ("a", False)
    assert s.push(0xC3) == ("", False)  # start of é: held
    assert s.push(ord("b")) == ("\ufffdb", False)  # an ASCII byte after it: the partial char is replaced first
    assert s.push(0xC3) == ("", False)
    assert s.push(0xA9, last=True) == ("é", False)
    assert s.text == "a\ufffdbé"
