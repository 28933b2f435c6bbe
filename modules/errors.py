"""One-line error text: every message a user sees for one bad input fits on one line.

Light on purpose (standard library only): the scripts use it before importing torch.
"""
from __future__ import annotations

__all__ = ["one_line", "error_line", "printable"]


def one_line(text: object, empty: str = "unknown error") -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space.

    A file name holding a newline cannot break a one-line-per-failure report this way.
    """
    return " ".join(str(text).split()) or empty


def error_line(err: BaseException, with_type: bool = False) -> str:
    """One line describing ``err``: its message (prefixed by its type when ``with_type``),
    or the type's name when the message is empty."""
    message = str(err)
    if with_type and message:
        message = f"{type(err).__name__}: {message}"
    return one_line(message, empty=type(err).__name__)


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped (``\\n``, ``\\udcff``),
    so a file name holding a newline stays on its line of a report."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
