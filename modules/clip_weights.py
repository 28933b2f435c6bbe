"""Where CLIP weights come from: names, URLs, sha256, download, cache, file formats.

Apart from the CLIP architecture (modules/module_clip.py), as OpenAI CLIP (clip.py vs
model.py) and open_clip (pretrained.py vs model.py) keep them apart. Accepted settings of
``clip_weights`` / ``--clip_weights``:

* ``null`` / an OpenAI name ("ViT-B/32", "ViT-B/16", "ViT-L/14"; open_clip spellings
  "ViT-B-32" too): OpenAI's official file, downloaded once into the cache and verified by
  sha256 (or the file in env ``UNIFIED_CLIP_WEIGHTS``);
* ``"random"``: random weights with the base encoder's shapes (offline smoke runs);
* ``"open_clip:NAME/TAG"``: any open_clip pretrained tag, through open_clip's own download
  and cache (open_clip is an optional extra);
* a local file: an OpenAI TorchScript archive (read as data, never ``torch.jit.load``), a
  torch.save'd state dict (open_clip, mmaction2 CLIP4Clip, TempMe training checkpoints, ...)
  or a ``.safetensors`` file; a folder: a Hugging Face ``CLIPModel`` (config.json + weights);
  ``tempme:PATH``: the CLIP weights inside a TempMe training checkpoint.

Every file is read once into memory; the bytes that are hashed are the bytes that are
parsed. Every failure raises :class:`WeightsError` with a one-line message.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from modules.clip_archs import ACTIVATIONS, canonical_arch_name
from modules.atomic_io import temp_path
from modules.errors import error_line, one_line
from modules.json_input import read_regular_file
from modules.module_clip import NON_PARAMETER_KEYS, random_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "WeightsError",
    "ClipWeights",
    "OPENAI_URL_BASE",
    "OPENAI_MODELS",
    "OPENAI_MAX_BYTES",
    "load_clip_weights",
    "load_clip_state_dict",
    "resolve_clip_weights",
    "choose_activation",
    "checkpoint_clip_weights",
    "is_official_name",
    "first_non_finite",
    "read_user_file",
    "local_weights_files",
]


class WeightsError(RuntimeError):
    """CLIP weights could not be found, downloaded, verified or read."""


@dataclass
class ClipWeights:
    """CLIP weights in OpenAI's layout plus what the source says about them.

    activation: "quick_gelu" / "gelu" when the file or name says which MLP activation the
    model was trained with, None when it does not (then the config's clip_activation must).
    untrained: random weights, which fit either activation (QuickGELU unless configured).
    """

    state_dict: Dict[str, Tensor]
    activation: Optional[str]
    source: str
    untrained: bool = False


#: Where OpenAI publishes its CLIP checkpoints (overridable with UNIFIED_CLIP_URL_BASE).
OPENAI_URL_BASE = "https://openaipublic.azureedge.net/clip/models"

#: Model name -> "<sha256>/<file name>" under the URL base (from OpenAI's clip/clip.py).
#: The directory component is the file's sha256, which the download is verified against.
OPENAI_MODELS: Dict[str, str] = {
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}

#: Upper bound on each official file's size (fp16 parameters plus TorchScript code, with
#: margin): a server that sends no Content-Length is cut off here, not read without end.
OPENAI_MAX_BYTES: Dict[str, int] = {"ViT-B/32": 512 << 20, "ViT-B/16": 512 << 20, "ViT-L/14": 1280 << 20}

#: Largest local weights file read (fp32 ViT-L/14 is 1.7 GB).
MAX_FILE_BYTES = 8 << 30
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60
OPEN_CLIP_PREFIX = "open_clip:"
TEMPME_PREFIX = "tempme:"


# ---------------------------------------------------------------------------------------
# Messages and small checks
# ---------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return one_line(f"HTTP {error.code} {error.reason}")
    if isinstance(error, urllib.error.URLError):
        return one_line(error.reason)
    return error_line(error, with_type=True)


def first_non_finite(tensors: Mapping[str, Tensor]) -> Optional[str]:
    """Name of the first floating-point tensor holding NaN or +-inf, or None."""
    for name, tensor in tensors.items():
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.numel():
            # min and max in one pass, no mask allocated (10x faster than isfinite().all());
            # NaN propagates into both, an infinity into one
            low, high = torch.aminmax(tensor.detach())
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return name
    return None


def is_official_name(name: Optional[str]) -> bool:
    """True for settings that name weights rather than a file: null, "random", OpenAI's names
    and open_clip pretrained tags (``open_clip:NAME/TAG``, resolved by open_clip)."""
    if name is None or name == "random":
        return True
    if name.startswith(OPEN_CLIP_PREFIX):
        return not name[len(OPEN_CLIP_PREFIX):].startswith(("hf-hub:", "local-dir:", "/", "."))
    return canonical_arch_name(name) in OPENAI_MODELS


def checkpoint_clip_weights(saved: Optional[str], checkpoint: str, user_choice: Optional[str]) -> Optional[str]:
    """The clip_weights to use with a checkpoint whose own config names ``saved``.

    The user's choice (``--clip_weights``, a config file the user passed) always wins. A
    checkpoint is a file like any other: it may name official weights (followed), but a
    file path inside it is never opened on the checkpoint's word (it could be a crafted
    archive); the message says which weights to pass.
    """
    if user_choice is not None:
        return user_choice
    if is_official_name(saved):
        return saved
    raise WeightsError(
        f"checkpoint {checkpoint} was trained with clip_weights {saved!r}, a local file that is not opened on a "
        f"checkpoint's say-so; pass the weights yourself: --clip_weights {saved} (or clip_weights in your config)"
    )


def choose_activation(weights: ClipWeights, configured: Optional[str], key: str = "clip_activation") -> str:
    """The MLP activation to build: the config's ``clip_activation`` or what the weights say."""
    if configured is not None:
        if configured not in ACTIVATIONS:
            raise WeightsError(f"{key}: must be one of {', '.join(ACTIVATIONS)}, got {configured!r}")
        if weights.activation is not None and weights.activation != configured:
            raise WeightsError(
                f"{key} is {configured!r} but {weights.source} says its model uses {weights.activation!r}; "
                f"remove {key} or set it to {weights.activation!r}"
            )
        return configured
    if weights.untrained:
        return "quick_gelu"
    if weights.activation is None:
        raise WeightsError(
            f"{weights.source} does not say which activation its CLIP uses; set {key} to 'quick_gelu' "
            "(OpenAI CLIP and models fine-tuned from it: CLIP4Clip, TempMe) or 'gelu' (open_clip models "
            "without -quickgelu, e.g. LAION/DataComp)"
        )
    return weights.activation


# ---------------------------------------------------------------------------------------
# Reading files as bytes
# ---------------------------------------------------------------------------------------


def read_user_file(path: str, what: str = "weights file", limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, read once (no FIFO, device or directory; size-capped)."""
    return read_regular_file(path, what, limit, WeightsError)


# ---------------------------------------------------------------------------------------
# Official weights: URLs, cache, download
# ---------------------------------------------------------------------------------------


def _model_url(name: str) -> Tuple[str, str, str]:
    """-> (url, expected sha256, file name) for a known model name."""
    relative = OPENAI_MODELS[name]
    sha256, filename = relative.split("/")[-2:]
    base = os.environ.get("UNIFIED_CLIP_URL_BASE") or OPENAI_URL_BASE
    return f"{base.rstrip('/')}/{relative}", sha256, filename


def _default_cache_dir() -> str:
    return os.environ.get("UNIFIED_CLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clip")


def _download_error(name: str, url: str, reason: str) -> WeightsError:
    return WeightsError(
        f"could not download {name} from {url} ({reason}); pass a local file with "
        "--clip_weights PATH or set UNIFIED_CLIP_WEIGHTS"
    )


def _cached_bytes(target: str, sha256: str) -> Optional[bytes]:
    if not os.path.isfile(target):
        return None
    try:
        data = read_user_file(target, "cached weights")
    except WeightsError as err:
        logger.warning("%s; downloading it again", err)
        return None
    if hashlib.sha256(data).hexdigest() == sha256:
        return data
    logger.warning("cached %s does not match its sha256; downloading it again", target)
    return None


def _fetch_official(name: str, cache_dir: str, download: bool) -> Tuple[bytes, str]:
    """-> (verified bytes of the official file for ``name``, where they are cached)."""
    url, sha256, filename = _model_url(name)
    target = os.path.join(cache_dir, filename)
    data = _cached_bytes(target, sha256)
    if data is not None:
        return data, target
    if not download:
        raise WeightsError(
            f"{name} weights are not cached at {target} (or fail their sha256 check) and "
            "download=False; pass a local file with --clip_weights PATH or set UNIFIED_CLIP_WEIGHTS"
        )
    cap = OPENAI_MAX_BYTES.get(name, MAX_FILE_BYTES)
    # Written under a temporary name next to the target (the project's one temp-name pattern,
    # modules.atomic_io.temp_path) and renamed into place, so an interrupted download never
    # leaves a file under the final name. The name is unique (several ranks may download at
    # once) and, unlike mkstemp's, the file gets the umask's permissions, since the cache may be shared.
    tmp_path = temp_path(target)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        out = open(tmp_path, "xb")
    except OSError as e:
        raise WeightsError(
            f"cannot write to the CLIP cache directory {cache_dir} ({_one_line(e)}); set "
            "UNIFIED_CLIP_CACHE, or pass a local file with --clip_weights PATH"
        ) from None
    chunks: List[bytes] = []
    received, total = 0, None
    try:
        with out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as source:
                    length = source.headers.get("Content-Length")
                    total = int(length) if length else None  # ValueError if malformed
                    if total is not None and total > cap:
                        raise _download_error(name, url, f"the server announces {total} bytes, more than the "
                                                         f"{cap} expected")
                    logger.info("downloading %s from %s", name, url)
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=filename, disable=None) as bar:
                        while True:
                            # Never more than the expected size, whatever the server sends.
                            chunk = source.read(min(_CHUNK, cap + 1 - received))
                            if not chunk:
                                break
                            received += len(chunk)
                            if received > cap:
                                raise _download_error(name, url, f"more than the {cap} bytes expected; stopped")
                            out.write(chunk)
                            chunks.append(chunk)
                            bar.update(len(chunk))
            except WeightsError:
                raise
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                raise _download_error(name, url, _one_line(e)) from None
        if total is not None and received != total:
            # http.client hands back a short body without complaint when the server hangs
            # up early; say so rather than report a hash mismatch.
            raise _download_error(name, url, f"connection closed after {received} of {total} bytes")
        data = b"".join(chunks)
        del chunks
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise WeightsError(f"sha256 mismatch for {url}: expected {sha256} got {actual}")
        os.replace(tmp_path, target)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    logger.info("saved %s to %s", name, target)
    return data, target


# ---------------------------------------------------------------------------------------
# Resolving a setting
# ---------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith(("~", ".")) or os.path.splitext(name)[1] != ""


def _looks_like_model_name(name: str) -> bool:
    # "ViT-H/14", "RN50x4", ... : report an unknown name rather than a missing file.
    return re.fullmatch(r"(ViT|RN)[\w\-/@]*", name) is not None


def _parse(data: bytes, source: str, folder_config: Optional[dict] = None) -> ClipWeights:
    from modules.checkpoint_formats import parse_clip_weights  # the formats need this module's errors

    state_dict, activation = parse_clip_weights(data, source, folder_config)
    bad = first_non_finite({k: v for k, v in state_dict.items() if k not in NON_PARAMETER_KEYS})
    if bad is not None:
        raise WeightsError(f"{source}: tensor {bad} holds NaN or infinite values; the file is corrupt")
    return ClipWeights(state_dict, activation, source)


def _load_open_clip(spec: str, cache_dir: Optional[str]) -> ClipWeights:
    from modules.checkpoint_formats import open_clip_activation

    name_tag = spec[len(OPEN_CLIP_PREFIX):]
    if "/" not in name_tag:
        raise WeightsError(f"{spec!r}: expected open_clip:NAME/TAG, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k")
    name, tag = name_tag.rsplit("/", 1)
    try:
        import open_clip
    except ImportError:
        raise WeightsError(f"{spec!r} needs open_clip: pip install 'unified-tempme-stop[open_clip]' "
                           "(or pass the downloaded file with --clip_weights PATH)") from None
    config = open_clip.get_pretrained_cfg(name, tag)
    if not config:
        raise WeightsError(f"open_clip has no pretrained tag {tag!r} for model {name!r} "
                           "(see open_clip.list_pretrained())")
    try:
        path = open_clip.download_pretrained(config, cache_dir=cache_dir)
    except Exception as err:  # network, hub, disk: open_clip raises many kinds
        raise WeightsError(f"open_clip could not download {name}/{tag} ({_one_line(err)})") from None
    if not path:
        raise WeightsError(f"open_clip has no file for {name}/{tag}")
    weights = _parse(read_user_file(path), f"{spec} ({path})")
    said = open_clip_activation(name, tag)
    return ClipWeights(weights.state_dict, said or weights.activation, weights.source)


def _load_folder(path: str) -> ClipWeights:
    """A Hugging Face model folder: config.json and model.safetensors or pytorch_model.bin."""
    import json

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"weights folder {path} has no config.json (expected a Hugging Face CLIPModel folder)")
    try:
        config = json.loads(read_user_file(config_path, "config", limit=1 << 20).decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise WeightsError(f"{config_path}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: expected a JSON object")
    weights = _folder_weights_file(path)
    if weights is None:
        raise WeightsError(f"weights folder {path} has neither model.safetensors nor pytorch_model.bin")
    return _parse(read_user_file(weights), weights, config)


def _folder_weights_file(path: str) -> Optional[str]:
    """The weights file a Hugging Face folder's model loads from (safetensors first)."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        weights = os.path.join(path, filename)
        if os.path.isfile(weights):
            return weights
    return None


def local_weights_files(setting: Optional[str]) -> List[str]:
    """The local files a ``clip_weights`` setting reads: a file, the file of ``tempme:PATH``, or
    a Hugging Face folder's config.json and weights file; [] for names and missing paths."""
    if not setting or setting == "random" or setting.startswith(OPEN_CLIP_PREFIX):
        return []
    path = os.path.expanduser(setting[len(TEMPME_PREFIX):] if setting.startswith(TEMPME_PREFIX) else setting)
    if os.path.isdir(path):  # only what exists: a folder missing a file is refused where it loads
        config = os.path.join(path, "config.json")
        return [f for f in (config, _folder_weights_file(path)) if f is not None and os.path.isfile(f)]
    return [path] if os.path.isfile(path) else []


def load_clip_weights(name_or_path: str, cache_dir: Optional[str] = None, download: bool = True) -> ClipWeights:
    """CLIP weights from an OpenAI name, ``open_clip:NAME/TAG``, a local file or a folder.

    An OpenAI name uses the file in env ``UNIFIED_CLIP_WEIGHTS`` when set (``random``: random
    weights of that architecture, as ``clip_weights: random``), otherwise the
    official checkpoint, downloaded once into ``cache_dir`` (default env
    ``UNIFIED_CLIP_CACHE`` or ``~/.cache/clip``) and verified by sha256.
    """
    if name_or_path.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(name_or_path, cache_dir)
    if name_or_path.startswith(TEMPME_PREFIX):  # the CLIP weights inside a TempMe checkpoint
        name_or_path = name_or_path[len(TEMPME_PREFIX):]
    name = canonical_arch_name(name_or_path)
    if name in OPENAI_MODELS:
        override = os.environ.get("UNIFIED_CLIP_WEIGHTS")
        if override == "random":  # what --clip_weights random means, for the named architecture
            logger.warning("random %s weights (UNIFIED_CLIP_WEIGHTS=random): embeddings are not semantic", name)
            return ClipWeights(random_state_dict(name), None, f"random {name} weights", untrained=True)
        if override:
            path = os.path.expanduser(override)
            if not os.path.isfile(path):
                raise WeightsError(f"weights file not found: {path} (from UNIFIED_CLIP_WEIGHTS)")
            logger.info("using %s for %s (UNIFIED_CLIP_WEIGHTS)", path, name)
            weights = _parse(read_user_file(path), path)
        else:
            data, path = _fetch_official(name, os.path.expanduser(cache_dir or _default_cache_dir()), download)
            weights = _parse(data, path)
        # OpenAI's CLIPs use QuickGELU; a file that says otherwise is not the named model.
        if weights.activation not in (None, "quick_gelu"):
            raise WeightsError(f"{path} says its model uses {weights.activation!r}, but {name} is OpenAI's "
                               "QuickGELU model; pass the file with --clip_weights instead")
        return ClipWeights(weights.state_dict, "quick_gelu", weights.source)

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return _load_folder(path)
    if os.path.exists(path):
        return _parse(read_user_file(path), path)
    known = ", ".join(OPENAI_MODELS)
    if _looks_like_model_name(name_or_path):
        if name_or_path.startswith("RN"):
            raise WeightsError(f"{name_or_path!r}: only ViT CLIP checkpoints are supported; known names: {known}")
        raise WeightsError(
            f"unknown CLIP model {name_or_path!r}; known names: {known} (or pass a local weights file)"
        )
    if _looks_like_path(name_or_path):
        raise WeightsError(f"weights file not found: {path}")
    raise WeightsError(f"weights file not found: {path} (nor is it a known model name: {known})")


def load_clip_state_dict(name_or_path: str, cache_dir: Optional[str] = None, download: bool = True) -> Dict[str, Tensor]:
    """The state dict (OpenAI layout) of :func:`load_clip_weights`."""
    return load_clip_weights(name_or_path, cache_dir=cache_dir, download=download).state_dict


def resolve_clip_weights(
    setting: Optional[str],
    base_name: str = "ViT-B/32",
    cache_dir: Optional[str] = None,
    download: bool = True,
    seed: int = 0,
) -> ClipWeights:
    """Resolve a ``clip_weights`` setting: None = official ``base_name`` weights,
    "random" = random weights with ``base_name``'s shapes, else a name, file or folder."""
    if setting == "random":
        logger.warning("random CLIP weights: embeddings are not semantic (offline smoke/test mode)")
        return ClipWeights(random_state_dict(base_name, seed=seed), None, f"random {base_name} weights", untrained=True)
    return load_clip_weights(base_name if setting is None else setting, cache_dir=cache_dir, download=download)

