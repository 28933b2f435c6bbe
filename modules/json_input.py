"""Reading a user's JSON file (config, batch file) as hostile data: bounded and one-line errors.

:func:`read_json_file` reads regular files only (a FIFO would block, a link to /dev/zero
would read forever), at most ``max_bytes`` bytes, strict UTF-8, standard JSON only (no
NaN / Infinity), integers of at most ``MAX_INT_DIGITS`` digits and nesting of at most
``MAX_DEPTH`` levels. Every problem is a :class:`JSONInputError` whose text is one line
naming the file. Standard library only: the scripts use it before importing torch.

:func:`read_output_json` is the same reader for the JSON files this project writes into an
output folder (meta and model records, indexes, summaries, manifests): a user may have
tampered with them, so they are hostile too. It accepts the NaN / Infinity that ``json.dump``
writes; every other problem is the same JSONInputError (a ValueError), which each place
handles as it handles any unreadable file (recompute the video, fall back, one-line error).
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, Optional, Tuple, Type, Union

__all__ = ["JSONInputError", "file_kind", "read_json_file", "read_output_json", "read_regular_file", "MAX_JSON_BYTES",
           "MAX_FOLDER_JSON_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS"]

#: the most bytes read from one config or batch file (a batch of 100k pairs fits)
MAX_JSON_BYTES = 64 * 1024 * 1024
#: the most bytes read from a whole-folder output (consolidated index, summary: a row per video)
MAX_FOLDER_JSON_BYTES = 2 * 1024 * 1024 * 1024
#: deepest nesting of lists / objects accepted (configs need 3, batch files 2)
MAX_DEPTH = 64
#: longest integer literal accepted (Python refuses to convert more than 4300 digits anyway)
MAX_INT_DIGITS = 100


class JSONInputError(ValueError):
    """A JSON file that cannot be used; ``str`` is one line naming the file."""


def file_kind(mode: int) -> str:
    """What a file of ``os.stat`` mode ``mode`` is, for messages ("a FIFO (named pipe)", ...)."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


def read_regular_file(path: Union[str, os.PathLike], what: str, max_bytes: int,
                      error: Type[Exception] = JSONInputError) -> bytes:
    """The bytes of a user's regular file, read once and at most ``max_bytes`` of them.

    A FIFO is refused without waiting for a writer (O_NONBLOCK), a device or folder without
    reading it. Every problem raises ``error`` with one line naming the file and ``what``
    it is ("config file", "weights file", ...). Used for JSON inputs and weights files alike.
    """
    return _read_regular(os.fspath(path), what, max_bytes, error)[0]


def _read_regular(path: str, what: str, max_bytes: int, error: Type[Exception]) -> Tuple[bytes, os.stat_result]:
    """:func:`read_regular_file`'s bytes and the ``fstat`` of the file they were read from."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: {what} is not a regular file: this is {file_kind(info.st_mode)}")
        if info.st_size > max_bytes:
            raise error(f"{path}: {what} is larger than {max_bytes} bytes ({info.st_size})")
        try:
            raw = fh.read(max_bytes + 1)
        except OSError as err:
            raise error(f"{path}: cannot read {what} ({err.strerror})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes} bytes")
    return raw, info


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _depth(data: Any) -> int:
    """Deepest nesting of lists / dicts in ``data`` (iterative: no recursion limit)."""
    if not isinstance(data, (list, dict)):
        return 0
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value)
                     if isinstance(v, (list, dict)))
    return deepest


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique (json keeps the last of duplicates silently)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice in one object")
    return data


def read_json_file(path: Union[str, os.PathLike], what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES,
                   allow_constants: bool = False, stat: Optional[list] = None) -> Any:
    """The parsed content of ``path``; JSONInputError (one line, names the file) on any problem.

    ``what`` names the file's role in the messages ("config file", "batch file").
    ``allow_constants``: accept NaN / Infinity (what ``json.dump`` writes for them).
    ``stat``: a list that receives the ``os.stat_result`` of the file read (not of the name later).
    """
    path = os.fspath(path)
    raw, info = _read_regular(path, what, max_bytes, JSONInputError)
    if stat is not None:
        stat.append(info)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise JSONInputError(f"{path}: {what} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                             f"{err.start})") from None
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=None if allow_constants else _refuse_constant,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise JSONInputError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise JSONInputError(f"{path}: invalid JSON: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as err:
        raise JSONInputError(f"{path}: invalid JSON: {err}") from None
    if _depth(data) > MAX_DEPTH:
        raise JSONInputError(f"{path}: invalid JSON: nested more than {MAX_DEPTH} levels deep")
    return data


def read_output_json(path: Union[str, os.PathLike], what: str, max_bytes: int = MAX_JSON_BYTES,
                     stat: Optional[list] = None) -> Any:
    """A JSON file this project wrote into an output folder, read as hostile data.

    :func:`read_json_file` with NaN / Infinity accepted; a missing file is a JSONInputError
    too (a ValueError: ``except (OSError, ValueError)`` covers every problem).
    """
    return read_json_file(path, what, max_bytes, allow_constants=True, stat=stat)
