"""The benchmark's prompts: ASCII text cut into prompts of an exact byte length."""

from __future__ import annotations

TEXT = (  # public-domain source of the prompts (ASCII: one byte per character)
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. To die, to sleep; "
    "no more; and by a sleep to say we end the heart-ache and the thousand natural shocks that flesh is heir to: "
    "'tis a consummation devoutly to be wish'd. Now is the winter of our discontent made glorious summer by this "
    "sun of York; and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. Friends, "
    "Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
)


def make_prompts(n: int, n_bytes: int) -> list[str]:
    """`n` ASCII prompts of exactly `n_bytes` bytes, cut from TEXT at offsets 37 bytes apart (cycling)."""
    text = TEXT * (2 + n_bytes // len(TEXT))
    return [text[(i * 37) % len(TEXT) :][:n_bytes] for i in range(n)]
