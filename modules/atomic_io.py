"""Every file the project writes is written whole or not at all.

:func:`atomic_write` writes to a temporary file in the target's folder and renames it into
place (atomic on POSIX and Windows), so a reader or a resumed run sees the old file, no
file, or the complete new file; :func:`atomic_write_all` does it for files that belong
together (all written before any is replaced). One temp-name pattern for every writer (outputs, configs,
checkpoints, downloads)::

    .<tail of the final name>.<pid>.<8 hex>.tmp

The tail keeps the end of the final name (its suffix) and is cut to fit: a temp name never
exceeds the file system's 255-byte limit when the final name fits. The pid lets
:func:`cleanup_stale_temp_files` tell a killed run's leftovers from a live run's files;
the random part keeps two writers of one file in one process apart.

Light on purpose (standard library; numpy imported only by the numpy savers) so config.py
can use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ["TEMP_SUFFIX", "temp_path", "atomic_write", "atomic_write_all", "save_npy_atomic", "save_npz_atomic", "save_json_atomic", "write_json",
           "save_text_atomic", "is_temp_name", "cleanup_stale_temp_files", "pid_alive"]

TEMP_SUFFIX = ".tmp"
#: bytes of the final name kept in a temp name: "." + tail + ".<pid>.<8 hex>.tmp" <= 255
_TAIL_BYTES = 200
#: temp names of this pattern; the 8-hex part is optional to also match older versions' leftovers
_TEMP_RE = re.compile(r"^\.(?P<tail>.+)\.(?P<pid>\d+)(?:\.[0-9a-f]{8})?\.tmp$", re.DOTALL)


def _name_tail(base: str) -> str:
    raw = os.fsencode(base)
    return base if len(raw) <= _TAIL_BYTES else os.fsdecode(raw[-_TAIL_BYTES:])


def temp_path(path: Union[str, os.PathLike]) -> str:
    """A fresh temp file name next to ``path`` (same folder, so the rename is atomic)."""
    folder, base = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{_name_tail(base)}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_name(name: str, final_suffixes: Optional[Iterable[str]] = None) -> Optional[int]:
    """The pid in a temp name written by :func:`temp_path` (None if ``name`` is not one).

    ``final_suffixes``: also require the final name it stands for to end with one of them.
    """
    match = _TEMP_RE.match(name)
    if match is None:
        return None
    if final_suffixes is not None and not any(match.group("tail").endswith(s) for s in final_suffixes):
        return None
    return int(match.group("pid"))


def _write_temp(path: str, write: Callable[[Any], None], mode: str) -> str:
    """``write(fh)`` into a fresh temp file next to ``path``; its name. On any error the temp
    is removed; an OSError without a file name (a full disk while writing) gets ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path(path)
    try:
        # text: a lone surrogate (a non-UTF-8 file name, decoded with surrogateescape) is
        # written as the six characters \udcXX, which inside a JSON string is exactly its
        # escape: JSON outputs stay valid UTF-8 and read back to the same name
        text = {"encoding": "utf-8", "errors": "backslashreplace"}
        with open(tmp, "x" + mode.replace("w", ""), **({} if "b" in mode else text)) as fh:
            write(fh)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, path) from err
        raise
    return tmp


def atomic_write(path: Union[str, os.PathLike], write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, then rename it to ``path``.

    Parent folders are created. On any error (also KeyboardInterrupt) the temp file is
    removed and the error re-raised; ``path`` is then untouched. An OSError names ``path``.
    """
    atomic_write_all([(path, write, mode)])


def atomic_write_all(files: Sequence[Tuple[Union[str, os.PathLike], Callable[[Any], None], str]]) -> None:
    """:func:`atomic_write` for files that belong together, given as ``(path, write, mode)``:
    every temp file is written first (in order), then all are renamed into place in order.
    A failure while writing (a full disk) leaves every old file as it was; only an
    interruption between the renames can leave some replaced, and then the last one is not.
    """
    written: List[Tuple[str, str]] = []
    try:
        for path, write, mode in files:
            path = os.fspath(path)
            written.append((_write_temp(path, write, mode), path))
        while written:
            tmp, path = written[0]
            os.replace(tmp, path)
            written.pop(0)
    finally:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def save_text_atomic(path: Union[str, os.PathLike], text: str) -> None:
    """UTF-8 text atomically."""
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def save_npy_atomic(path: Union[str, os.PathLike], array: Any) -> None:
    """``np.save`` atomically (no ``.npy`` appended: the name is used as given)."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def save_npz_atomic(path: Union[str, os.PathLike], **arrays: Any) -> None:
    """``np.savez`` atomically (no ``.npz`` appended: the name is used as given)."""
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def write_json(fh, obj: Any, indent: Optional[int] = 2) -> None:
    """``obj`` as this project writes JSON files (UTF-8 text, non-ASCII kept, a final newline)."""
    json.dump(obj, fh, indent=indent, ensure_ascii=False)
    fh.write("\n")


def save_json_atomic(path: Union[str, os.PathLike], obj: Any, indent: Optional[int] = 2) -> None:
    """JSON (UTF-8, non-ASCII kept) atomically."""
    atomic_write(path, lambda fh: write_json(fh, obj, indent), mode="w")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours counts as alive; unknown counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def cleanup_stale_temp_files(output_dir: Union[str, os.PathLike], final_suffixes: Optional[Iterable[str]] = None,
                             folders: Optional[Iterable[str]] = None) -> int:
    """Remove temp files left by killed runs: names made by :func:`temp_path` whose pid is gone.

    ``final_suffixes``: only temps of final names ending so (the files a writer makes).
    ``folders``: only these folders (not recursive); default: every folder below output_dir.
    Returns how many were removed.
    """
    suffixes = tuple(final_suffixes) if final_suffixes is not None else None
    if folders is None:
        where = [(root, files) for root, _, files in os.walk(os.fspath(output_dir))]
    else:
        where = []
        for folder in folders:
            with contextlib.suppress(OSError):
                where.append((folder, [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]))
    removed = 0
    for root, files in where:
        for name in files:
            pid = is_temp_name(name, suffixes)
            if pid is None or pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, name))
                removed += 1
    return removed
