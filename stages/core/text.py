"""Words in messages: a count with its noun in the right number ("1 epoch", "2 epochs")."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` and the noun, singular for exactly 1: plural(1, "file") -> "1 file", plural(3, "process",
    "processes") -> "3 processes"."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"
