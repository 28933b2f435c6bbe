"""Read PyTorch zip archives (torch.save files and TorchScript archives) as data.

Both formats are a zip holding ``<root>/data.pkl`` (a pickle) and the raw tensor bytes
under ``<root>/data/<key>``. ``torch.jit.load`` runs the archive's TorchScript code
(``__setstate__`` and friends), so a crafted "ViT-B-32.pt" could write any file the user
can; OpenAI's clip.load and open_clip both call it. Here the pickle is read by a
restricted unpickler instead:

* tensors are rebuilt from the raw bytes (``persistent_load`` of storages, then a strided
  view), by this file's own functions, not torch's;
* TorchScript modules (``__torch__.*`` globals) become inert :class:`ScriptObject` records
  of their attributes; nothing is executed, and an archive whose code defines
  ``__setstate__`` is refused outright;
* any other global is refused ("Unsupported global: ..."), except names the caller lists
  as inert (recorded the same way, e.g. mmengine's logging objects in training checkpoints).

``constants.pkl`` and ``code/`` are never unpickled or run.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

__all__ = ["ArchiveError", "ScriptObject", "is_zip", "read_archive", "script_module_tensors"]

_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
#: caps on what an archive may declare (a zip bomb or a pickle of absurd size is refused)
MAX_PICKLE_BYTES = 256 << 20
MAX_ARCHIVE_BYTES = 16 << 30


class ArchiveError(ValueError):
    """The archive is not readable as data (one-line message, no path: the caller adds it)."""


class ScriptObject:
    """An object the archive describes but which is not built: its class name and state."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: record, never run
        self.state = state

    def __repr__(self) -> str:
        return f"ScriptObject({self.class_name})"


def _record_class(qualified: str) -> type:
    return type("ScriptObject", (ScriptObject,), {"class_name": qualified})


class _Storage:
    """A storage of the archive: a flat tensor over the raw bytes."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


def _rebuild_tensor(storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...],
                    requires_grad: bool = False, hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise ArchiveError("a tensor without a storage")
    try:
        return storage.flat.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as err:
        raise ArchiveError(f"a tensor does not fit its storage ({' '.join(str(err).split())[:120]})") from None


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, hooks: Any = None, state: Any = None) -> torch.Tensor:
    return data


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
    return value


def _build_list(values: Any) -> Any:
    return list(values)


def _encode(text: Any, encoding: str = "latin1") -> bytes:
    # How protocol-2 pickles (numpy arrays in training metadata) spell a bytes object.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ArchiveError("unexpected _codecs.encode call in the pickle")
    return text.encode("latin1")


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, inert: Tuple[str, ...]) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.root = root
        self.inert = inert
        self.storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        qualified = f"{module}.{name}"
        if qualified.startswith(self.inert):
            return _record_class(qualified)
        raise ArchiveError(f"Unsupported global: {qualified}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError("unknown persistent id in the pickle")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int):
            raise ArchiveError("malformed storage record in the pickle")
        if key not in self.storages:
            self.storages[key] = _Storage(self._read_storage(key, dtype, numel))
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self.root}/data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ArchiveError(f"storage {key} is missing from the archive") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.file_size < numel * itemsize:
            raise ArchiveError(f"storage {key} holds {info.file_size} bytes, {numel * itemsize} expected")
        buffer = bytearray(info.file_size)
        with self.archive.open(info) as source:
            if source.readinto(buffer) != info.file_size:
                raise ArchiveError(f"storage {key} is truncated")
        if not buffer:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8)[: numel * itemsize].view(dtype)


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def _root(names: Iterable[str]) -> Tuple[str, bool]:
    """-> (the folder holding data.pkl, whether the archive is TorchScript)."""
    roots = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise ArchiveError("not a PyTorch archive (no single <root>/data.pkl)")
    root = roots[0]
    scripted = any(n.startswith(f"{root}/code/") or n == f"{root}/constants.pkl" for n in names)
    return root, scripted


def read_archive(data: bytes, inert: Tuple[str, ...] = ()) -> Tuple[Any, bool]:
    """The object pickled in a zip archive's data.pkl, and whether the archive is TorchScript.

    ``inert``: qualified-name prefixes of globals recorded as :class:`ScriptObject` rather
    than refused (TorchScript's ``__torch__.`` is always inert in a TorchScript archive).
    Raises :class:`ArchiveError` for anything else.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ArchiveError(f"not a readable zip archive ({err})") from None
    if sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"the archive declares more than {MAX_ARCHIVE_BYTES >> 30} GiB of contents")
    names = [i.filename for i in infos]
    root, scripted = _root(names)
    byteorder = f"{root}/byteorder"
    if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
        raise ArchiveError("big-endian archives are not supported")
    if scripted:
        for name in names:
            if name.startswith(f"{root}/code/") and name.endswith(".py"):
                if b"__setstate__" in archive.read(name):
                    raise ArchiveError(
                        "TorchScript archive with a __setstate__ method (code that would run on load); refused"
                    )
        inert = tuple(inert) + ("__torch__.",)
    pickle_info = archive.getinfo(f"{root}/data.pkl")
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise ArchiveError(f"data.pkl is larger than {MAX_PICKLE_BYTES >> 20} MiB")
    unpickler = _Unpickler(archive.read(pickle_info), archive, root, tuple(inert))
    try:
        obj = unpickler.load()
    except ArchiveError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            RecursionError, MemoryError, zipfile.BadZipFile) as err:
        raise ArchiveError(f"corrupt pickle ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    return obj, scripted


def script_module_tensors(module: Any, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of a recorded TorchScript module tree, by dotted attribute path
    (what ``torch.jit.load(...).state_dict()`` returns for parameters and buffers)."""
    out: Dict[str, torch.Tensor] = {}
    state: Optional[Any] = module.state if isinstance(module, ScriptObject) else None
    if not isinstance(state, dict):
        raise ArchiveError(f"TorchScript module {prefix or '<root>'} has no attribute table")
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            out.update(script_module_tensors(value, f"{prefix}{name}."))
    return out
