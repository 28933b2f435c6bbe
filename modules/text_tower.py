"""CLIP's text tower in NumPy: text queries without importing torch.

A cold search spends most of its time before the first query: ``import torch`` alone takes
about 2.3 s on a 2-core machine, then the whole CLIP file is read to encode one sentence.
A library therefore keeps its model's text tower (LoRA folded in, float32) beside its
shards, written by the first process that has the model (:func:`save_text_tower`), and a
text query runs this forward: token and position embeddings, the pre-LN residual blocks
with a causal mask, ``ln_final``, the EOT token times ``text_projection``, unit norm. It is
the computation of :meth:`modules.module_clip.CLIP.encode_text` (the torch model stays the
definition; ``tests/test_text_tower.py`` holds the two together to 1e-5).

The file is data, not code: a ``.safetensors`` file whose header names the model's
fingerprint, the sizes and the activation; :func:`load_text_tower` checks every tensor's
name, dtype, shape and extent against those sizes before it computes anything, and maps
the tensors instead of copying them.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from modules.cli_support import UsageError

__all__ = ["TextTower", "TextTowerError", "text_tower_of", "save_text_tower", "load_text_tower", "text_tower_path",
           "token_ids"]

FORMAT = "unified-text-tower"
VERSION = 1
#: a ViT-L/14 text tower is 0.5 GB in float32; anything past this is not a CLIP text tower
MAX_FILE_BYTES = 2 << 30
PathLike = Union[str, os.PathLike]


class TextTowerError(UsageError):
    """A text tower file that is missing, malformed or of another model (exit 2 in the scripts)."""


def text_tower_path(folder: PathLike, fingerprint_id: str) -> str:
    """Where a library folder keeps the text tower of the model ``fingerprint_id``."""
    return os.path.join(os.fspath(folder), f"text-tower-{fingerprint_id}.safetensors")


def _expected_shapes(sizes: Mapping[str, int]) -> Dict[str, tuple]:
    width, layers = sizes["width"], sizes["layers"]
    shapes = {
        "token_embedding": (sizes["vocab_size"], width),
        "positional_embedding": (sizes["context_length"], width),
        "ln_final.weight": (width,), "ln_final.bias": (width,),
        "text_projection": (width, sizes["embed_dim"]),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "in_proj_weight": (3 * width, width), p + "in_proj_bias": (3 * width,),
            p + "out_proj.weight": (width, width), p + "out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "c_fc.weight": (4 * width, width), p + "c_fc.bias": (4 * width,),
            p + "c_proj.weight": (width, 4 * width), p + "c_proj.bias": (width,),
        })
    return shapes


# ------------------------------------------------------------------ the forward, pure functions
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis (torch's biased variance, eps 1e-5)."""
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7, about float32's resolution near 1.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def activation(x: np.ndarray, name: str) -> np.ndarray:
    """CLIP's MLP activation: ``quick_gelu`` (OpenAI's weights) or exact ``gelu``."""
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x * np.float32(1 / np.sqrt(2))))
    raise TextTowerError(f"unknown activation {name!r}")


def causal_attention(x: np.ndarray, in_w: np.ndarray, in_b: np.ndarray, out_w: np.ndarray, out_b: np.ndarray,
                     heads: int) -> np.ndarray:
    """(B, L, d) -> (B, L, d): multi-head self-attention where position i sees 0..i."""
    batch, length, width = x.shape
    head_dim = width // heads
    qkv = (x @ in_w.T + in_b).reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, L, hd)
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(head_dim ** -0.5)
    scores = scores + np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = scores / scores.sum(axis=-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
    return out @ out_w.T + out_b


@dataclass
class TextTower:
    """A CLIP text tower's float32 arrays and sizes; :meth:`encode` is its forward."""

    fingerprint_id: str
    sizes: Dict[str, int]  # width, layers, heads, vocab_size, context_length, embed_dim, max_words
    activation: str
    arrays: Dict[str, np.ndarray]

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (T, L) (SOT ... EOT, zero-padded; EOT is the largest id) -> (T, D) unit vectors.

        Positions after a row's EOT cannot change its EOT token (the mask is causal), so the
        forward stops at the last EOT of the batch.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] > self.sizes["context_length"]:
            raise TextTowerError(f"token ids must be (T, L<={self.sizes['context_length']}), got {ids.shape}")
        if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < self.sizes["vocab_size"]:
            raise TextTowerError(f"token ids outside the vocabulary of {self.sizes['vocab_size']}")
        from threadpoolctl import threadpool_limits

        # one text is too little work to share: a second BLAS thread only waits at barriers
        # (a 45-54 ms forward took 114-639 ms on two threads with the machine at load 2-4)
        with threadpool_limits(limits=1, user_api="blas"), np.errstate(over="ignore", invalid="ignore"):
            features = self._forward(ids)  # an overflow is caught on the result below
        norms = np.linalg.norm(features, axis=-1, keepdims=True)
        if not (np.isfinite(features).all() and (norms > 0).all()):
            raise TextTowerError(f"the text tower of model {self.fingerprint_id!r} gives a non-finite or zero vector: "
                                 "its file is corrupt (delete it: the next search rebuilds it from the model)")
        return features / norms

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """(T, L) valid token ids -> (T, D) float32 projected EOT features, not normalised."""
        eot = ids.argmax(axis=1)
        length = int(eot.max()) + 1 if ids.shape[0] else 1
        a = self.arrays
        x = a["token_embedding"][ids[:, :length]] + a["positional_embedding"][:length]
        if not np.isfinite(x).all():  # the token table is checked row by row, as rows are read
            raise TextTowerError("the text tower's token embedding holds non-finite values")
        for i in range(self.sizes["layers"]):
            p = f"blocks.{i}."
            h = layer_norm(x, a[p + "ln_1.weight"], a[p + "ln_1.bias"])
            x = x + causal_attention(h, a[p + "in_proj_weight"], a[p + "in_proj_bias"], a[p + "out_proj.weight"],
                                     a[p + "out_proj.bias"], self.sizes["heads"])
            h = layer_norm(x, a[p + "ln_2.weight"], a[p + "ln_2.bias"])
            h = activation(h @ a[p + "c_fc.weight"].T + a[p + "c_fc.bias"], self.activation)
            x = x + h @ a[p + "c_proj.weight"].T + a[p + "c_proj.bias"]
        x = layer_norm(x[np.arange(ids.shape[0]), eot], a["ln_final.weight"], a["ln_final.bias"])
        return (x @ a["text_projection"]).astype(np.float32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(T,) texts -> (T, D) float32 unit vectors, tokenized as the model does (max_words)."""
        return self.encode(token_ids(list(texts), self.sizes["max_words"]))


def token_ids(texts: Sequence[str], max_words: int) -> np.ndarray:
    """Texts -> (T, max_words) int64 as the model feeds its text tower (tokenize_for_model)."""
    from modules.tokenization_clip import token_id_matrix

    return token_id_matrix(texts, max_words)


# ------------------------------------------------------------------ from a model, to and from a file
def text_tower_of(model: Any, fingerprint_id: str) -> TextTower:
    """The text tower of a built :class:`~unified_model.UnifiedTempMeSTOPModel` (LoRA merged)."""
    if getattr(model, "text_lora", None) is not None:
        raise TextTowerError("fold the text LoRA first (create_unified_model(..., merge_lora=True))")
    clip = model.clip

    def arr(tensor) -> np.ndarray:
        return np.ascontiguousarray(tensor.detach().float().cpu().numpy())

    arrays = {"token_embedding": arr(clip.token_embedding.weight), "positional_embedding": arr(clip.positional_embedding),
              "ln_final.weight": arr(clip.ln_final.weight), "ln_final.bias": arr(clip.ln_final.bias),
              "text_projection": arr(clip.text_projection)}
    for i, block in enumerate(clip.transformer.resblocks):
        p = f"blocks.{i}."
        arrays.update({
            p + "ln_1.weight": arr(block.ln_1.weight), p + "ln_1.bias": arr(block.ln_1.bias),
            p + "in_proj_weight": arr(block.attn.in_proj_weight), p + "in_proj_bias": arr(block.attn.in_proj_bias),
            p + "out_proj.weight": arr(block.attn.out_proj.weight), p + "out_proj.bias": arr(block.attn.out_proj.bias),
            p + "ln_2.weight": arr(block.ln_2.weight), p + "ln_2.bias": arr(block.ln_2.bias),
            p + "c_fc.weight": arr(block.mlp.c_fc.weight), p + "c_fc.bias": arr(block.mlp.c_fc.bias),
            p + "c_proj.weight": arr(block.mlp.c_proj.weight), p + "c_proj.bias": arr(block.mlp.c_proj.bias),
        })
    sizes = {"width": clip.transformer.width, "layers": clip.transformer.layers, "heads": clip.transformer.heads,
             "vocab_size": clip.vocab_size, "context_length": clip.context_length,
             "embed_dim": int(clip.text_projection.shape[1]), "max_words": int(model.config.max_words)}
    return TextTower(fingerprint_id, sizes, clip.activation, arrays)


def save_text_tower(tower: TextTower, path: PathLike) -> None:
    """Write ``tower`` as one .safetensors file, atomically (temp file + rename); the temp
    files of writers killed before their rename (a quarter GB each) are removed first."""
    from safetensors.numpy import save

    from modules.atomic_io import atomic_write, cleanup_stale_temp_files

    folder = os.path.dirname(os.fspath(path)) or "."
    cleanup_stale_temp_files(folder, final_suffixes=(".safetensors",), folders=[folder])
    header = {"format": FORMAT, "version": str(VERSION), "fingerprint_id": tower.fingerprint_id,
              "activation": tower.activation, "sizes": json.dumps(tower.sizes, sort_keys=True)}
    data = save(tower.arrays, metadata=header)
    atomic_write(path, lambda fh: fh.write(data))


#: upper bounds of a tower's sizes (ViT-L/14's text tower: width 768, 12 layers, context 77)
_SIZE_LIMITS = {"width": 8192, "layers": 128, "heads": 8192, "context_length": 4096, "embed_dim": 8192,
                "max_words": 4096, "vocab_size": 1 << 20}


def _int_sizes(raw: Any, path: str) -> Dict[str, int]:
    if not isinstance(raw, str):
        raise TextTowerError(f"{path}: header 'sizes' is not JSON text")
    try:
        sizes = json.loads(raw)
    except (ValueError, RecursionError):
        raise TextTowerError(f"{path}: header 'sizes' is not JSON") from None
    keys = sorted(_SIZE_LIMITS)
    if not isinstance(sizes, dict) or sorted(sizes) != keys or not all(
            isinstance(sizes[k], int) and not isinstance(sizes[k], bool) and 0 < sizes[k] <= _SIZE_LIMITS[k] for k in keys):
        raise TextTowerError(f"{path}: header 'sizes' must give {', '.join(keys)} as positive integers "
                             f"within {_SIZE_LIMITS}")
    from modules.tokenization_clip import VOCAB_SIZE

    if sizes["vocab_size"] != VOCAB_SIZE:
        raise TextTowerError(f"{path}: a vocabulary of {sizes['vocab_size']} tokens, not CLIP's tokenizer's {VOCAB_SIZE}")
    if sizes["width"] % sizes["heads"] or not 2 <= sizes["max_words"] <= sizes["context_length"]:
        raise TextTowerError(f"{path}: inconsistent sizes {sizes}")
    return sizes


#: a tower's header lists about 200 tensors (a few KiB); a larger one is not a tower's
MAX_HEADER_BYTES = 1 << 20


def _read_header(fh, path: str, size: int) -> Dict[str, Any]:
    """The safetensors header: 8 bytes little-endian length, then that many bytes of JSON."""
    raw = fh.read(8)
    if len(raw) < 8:
        raise TextTowerError(f"{path}: not a readable safetensors file (shorter than its header length)")
    length = struct.unpack("<Q", raw)[0]
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise TextTowerError(f"{path}: not a readable safetensors file (header of {length} bytes)")
    try:
        header = json.loads(fh.read(length))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TextTowerError(f"{path}: not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise TextTowerError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    header["__data_start__"] = 8 + length
    return header


def load_text_tower(path: PathLike, fingerprint_id: Optional[str] = None) -> TextTower:
    """Read and check a text tower file; ``fingerprint_id``, if given, must be the file's.

    The arrays are read-only memory maps of the file (the safetensors layout: a JSON header,
    then raw little-endian tensors), so a query touches the pages of the blocks and of its
    own token rows, not the whole 100 MB token table; safetensors' own NumPy reader copies
    every tensor. Raises TextTowerError (one line naming the file) on anything unexpected:
    not a regular file, too large, not safetensors, another model, missing or extra tensors,
    wrong dtype, shape or extent, non-finite values in the blocks.
    """
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open: opening a FIFO would block
            raise TextTowerError(f"{path}: not a regular file")
        fh = open(path, "rb")
    except OSError as err:
        raise TextTowerError(f"{path}: {err.strerror}") from None
    with fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TextTowerError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise TextTowerError(f"{path}: {st.st_size} bytes, more than a text tower's {MAX_FILE_BYTES}")
        header = _read_header(fh, path, st.st_size)
    meta = header.pop("__metadata__", {})
    data_start = header.pop("__data_start__")
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise TextTowerError(f"{path}: not a {FORMAT} file of version {VERSION}")
    if fingerprint_id is not None and meta.get("fingerprint_id") != fingerprint_id:
        raise TextTowerError(f"{path}: the text tower of model {meta.get('fingerprint_id')!r}, not of {fingerprint_id!r}")
    sizes = _int_sizes(meta.get("sizes", ""), path)
    name = meta.get("activation", "")
    if name not in ("quick_gelu", "gelu"):
        raise TextTowerError(f"{path}: unknown activation {name!r}")
    if len(header) != 5 + 12 * sizes["layers"]:
        raise TextTowerError(f"{path}: {len(header)} tensors, a {sizes['layers']}-layer text tower has "
                             f"{5 + 12 * sizes['layers']}")
    expected = _expected_shapes(sizes)
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise TextTowerError(f"{path}: tensors do not match the sizes (missing {missing[:3]}, extra {extra[:3]})")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    arrays: Dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        entry = header[key]
        try:
            dtype, got, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TextTowerError(f"{path}: tensor {key} has a malformed header entry") from None
        if dtype != "F32" or got != shape:
            raise TextTowerError(f"{path}: tensor {key} is {dtype} {got}, expected F32 {shape}")
        nbytes = 4 * int(np.prod(shape))
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == nbytes
                and data_start + end <= st.st_size):
            raise TextTowerError(f"{path}: tensor {key} lies outside the file or has the wrong length")
        arrays[key] = data[data_start + begin:data_start + end].view("<f4").reshape(shape)
        if key != "token_embedding" and not np.isfinite(arrays[key]).all():  # every query reads these
            raise TextTowerError(f"{path}: tensor {key} holds non-finite values")
    return TextTower(str(meta["fingerprint_id"]), sizes, name, arrays)
