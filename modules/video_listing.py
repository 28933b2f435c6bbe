"""Listing stage: the videos of a folder, their unique output names, one shard's share.

``list_videos(video_dir)`` -> sorted :class:`VideoEntry` list (path as opened, path relative
to the folder, unique output name, a problem found while listing or None);
``shard_entries(entries, rank, world)`` -> one rank's round-robin share.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from modules.cli_support import DEFAULT_EXTENSIONS, UsageError

__all__ = ["VideoEntry", "parse_extensions", "check_video_file", "list_videos", "unique_names", "shard_entries"]

logger = logging.getLogger(__name__)


@dataclass
class VideoEntry:
    """One listed video.

    path: the file as opened (``video_dir`` joined with ``rel``, as the user spelled the
    directory). rel: path relative to video_dir (``/``-separated). name: the unique output
    name (rel without extension, or with it when two files would share a name).
    problem: a reason found while listing (broken link, FIFO, directory...), else None.
    """

    path: str
    rel: str
    name: str = ""
    problem: Optional[str] = None
    size: Optional[int] = None  # bytes, when listed
    mtime_ns: Optional[int] = None  # modification time when listed

    def source(self) -> Dict[str, Any]:
        """What identifies the file an output came from: relative path, size, mtime."""
        return {"rel": self.rel, "size": self.size, "mtime_ns": self.mtime_ns}


def parse_extensions(value: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    """``"mp4,.MOV webm"`` or a list -> ``(".mp4", ".mov", ".webm")``; None -> defaults."""
    if value is None:
        return DEFAULT_EXTENSIONS
    parts = value.replace(",", " ").split() if isinstance(value, str) else [str(v) for v in value]
    exts = []
    for part in parts:
        part = part.strip().lower()
        if not part:
            continue
        ext = part if part.startswith(".") else "." + part
        if ext not in exts:
            exts.append(ext)
    if not exts:
        raise UsageError(f"--extensions: no extension given in {value!r}")
    return tuple(exts)


def check_video_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a readable video file, or None if it looks fine.

    Catches what would make a decoder hang or give a vague error: broken symbolic links,
    directories, FIFOs (opening one blocks until a writer appears), sockets, devices,
    unreadable files. Empty and non-video files are left to the decoder.
    """
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (target {os.readlink(path)!r} does not exist)"
        return "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as err:
        return f"cannot stat file ({err.strerror or err})"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, not a video file"
    if not stat.S_ISREG(mode):
        kind = ("named pipe (FIFO)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        return f"not a regular file: {kind}"
    if not os.access(path, os.R_OK):
        return "permission denied (file is not readable)"
    return None


def _has_extension(name: str, extensions: Sequence[str]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext) and len(lower) > len(ext) for ext in extensions)


def list_videos(
    video_dir: Union[str, os.PathLike],
    extensions: Optional[Sequence[str]] = None,
    recursive: bool = False,
    exclude: Sequence[Union[str, os.PathLike]] = (),
) -> List[VideoEntry]:
    """Video files in ``video_dir`` sorted by relative path, with unique output names.

    Entries whose name ends with one of ``extensions`` (case-insensitive) are listed even
    when they are not usable files (broken links, FIFOs, directories when not recursive):
    those carry a ``problem`` and are reported as failures rather than silently dropped.
    Hidden entries (name starting with ".") are skipped. ``recursive`` descends into
    subfolders (symbolic links to folders are not followed); folders in ``exclude`` (e.g.
    an output folder inside ``video_dir``) are never entered.

    Raises:
        UsageError: ``video_dir`` missing or not a directory.
    """
    video_dir = os.fspath(video_dir)
    if not os.path.exists(video_dir):
        raise UsageError(f"video directory not found: {video_dir}")
    if not os.path.isdir(video_dir):
        raise UsageError(f"not a directory: {video_dir}")
    exts = tuple(extensions) if extensions is not None else DEFAULT_EXTENSIONS
    excluded = {os.path.realpath(os.fspath(p)) for p in exclude}
    found: List[Tuple[str, str]] = []  # (rel, full path)

    def walk(folder: str, rel_prefix: str) -> None:
        try:
            items = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            logger.warning("%s: cannot list folder (%s); skipped", folder, err.strerror or err)
            return
        for item in items:
            if item.name.startswith("."):
                continue
            rel = f"{rel_prefix}{item.name}"
            full = os.path.join(folder, item.name)
            try:
                is_dir = item.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir and recursive:
                if os.path.realpath(full) not in excluded:
                    walk(full, rel + "/")
                continue
            if _has_extension(item.name, exts):
                found.append((rel, full))

    walk(video_dir, "")
    found.sort(key=lambda pair: pair[0])
    entries = [VideoEntry(path=full, rel=rel, problem=check_video_file(full), **_stat(full)) for rel, full in found]
    for entry, name in zip(entries, unique_names([e.rel for e in entries])):
        entry.name = name
    return entries


def _stem(rel: str) -> str:
    folder, base = rel.rsplit("/", 1) if "/" in rel else ("", rel)
    root = os.path.splitext(base)[0] or base
    return f"{folder}/{root}" if folder else root


def _rel_digest(rel: str, length: int) -> str:
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:length]


#: the name candidates of a file, tried in order while names clash: stem, relative path,
#: stem + short hash, stem + longer hash, stem + full hash of the relative path
_CANDIDATES = (
    _stem,
    lambda rel: rel,
    lambda rel: f"{_stem(rel)}-{_rel_digest(rel, 8)}",
    lambda rel: f"{_stem(rel)}-{_rel_digest(rel, 16)}",
    lambda rel: f"{_stem(rel)}-{_rel_digest(rel, 40)}",
)


def _stat(path: str) -> Dict[str, Optional[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def unique_names(rels: Sequence[str]) -> List[str]:
    """Output names for relative video paths: unique, deterministic, filesystem-safe.

    ``sub/clip.mp4`` -> ``sub/clip``. Names are compared case-insensitively (for
    case-insensitive file systems). In each round, every name that clashes with another
    moves to its file's next candidate: the relative path with its extension
    (``clip.mp4``, ``clip.webm``), then the stem with a short hash of the relative path,
    then longer hashes. The last candidate (full hash of the distinct relative path) never
    clashes with another file's last candidate, and the names still on earlier candidates
    keep moving while they clash, so the names end unique whatever the inputs (also a file
    named like another one's hashed name).
    """
    level = [0] * len(rels)
    names = [_stem(r) for r in rels]
    # every round moves at least one clashing name on, so n + len(_CANDIDATES) rounds suffice
    for round_ in range(len(rels) + len(_CANDIDATES) + 1):
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name.casefold(), []).append(i)
        clashes = [i for members in groups.values() if len(members) > 1 for i in members]
        if not clashes:
            return names
        for i in clashes:
            level[i] = min(max(level[i], round_) + 1, len(_CANDIDATES) - 1)
            names[i] = _CANDIDATES[level[i]](rels[i])
    raise AssertionError(f"output names still clash after every candidate: {sorted(set(names))[:3]}")


def shard_entries(entries: Sequence[VideoEntry], rank: int, world: int) -> List[VideoEntry]:
    """Round-robin share of the sorted list: entries[rank], entries[rank + world], ...

    Deterministic (depends only on the sorted listing) and balanced to within one video.
    """
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard {rank} is not in [0, {world})")
    return list(entries[rank::world])
