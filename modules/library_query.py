"""Query encoders of a video library: text and pictures -> unit vectors in the library's space.

:class:`ModelQueryEncoder` wraps a built model: texts through its text tower (with LoRA),
pictures through CLIP's image tower (short side resized, centre crop, CLIP normalisation,
as frames are prepared for extraction). :func:`model_for` builds the model a library's
fingerprint names (config, CLIP weights, checkpoint) and checks that it is that model.

:class:`LibraryQueryEncoder` is what a library uses: texts through the text tower file the
library keeps (:mod:`modules.text_tower`, NumPy: a cold text search imports no torch),
pictures through the model, built on first need. Without a tower file yet, the first
process that builds the model writes it. Either way the library keeps the encoder.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from modules.cli_support import UsageError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_BYTES", "LibraryQueryEncoder", "ModelQueryEncoder", "encoder_for", "model_for",
           "is_image_path", "read_image_rgb"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: pictures larger than this are refused (a query image is a picture, not a video)
MAX_IMAGE_BYTES = 64 * 1024 * 1024


def is_image_path(text: str) -> bool:
    """True for an existing regular file whose name ends like a picture."""
    return text.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(text)


def read_image_rgb(path: Union[str, os.PathLike]) -> np.ndarray:
    """A picture file -> uint8 (H, W, 3) RGB, decoded with PyAV (first frame of an animation)."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"image not found (or not a regular file): {path}")
    if os.path.getsize(path) > MAX_IMAGE_BYTES:
        raise UsageError(f"{path}: image larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError, IndexError) as err:
        raise UsageError(f"{path}: cannot decode the image ({err})") from None
    raise UsageError(f"{path}: the file holds no picture")


class ModelQueryEncoder:
    """Texts and pictures -> (D,) float32 unit vectors with one model, kept for the process.

    On a CPU a query runs on one torch thread: one text (32 tokens) or one picture is too
    little work to share, and on a busy machine the second thread's barrier waits made a
    text forward 25x slower (1.15 s against 0.047 s for random ViT-B/32 weights).
    """

    def __init__(self, model):
        self.model = model

    def load(self, text: bool = True, image: bool = False) -> None:
        """Nothing to load: the model is built."""

    def _threads(self):
        from modules.forward_lanes import torch_threads

        return torch_threads(1) if self.model.device.type == "cpu" else contextlib.nullcontext()

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(T,) texts -> (T, D) float32."""
        import torch

        with torch.inference_mode(), self._threads():
            return self.model.encode_text(list(texts)).float().cpu().numpy()

    def encode_image(self, path: Union[str, os.PathLike]) -> np.ndarray:
        """A picture -> (D,) float32: CLIP's image embedding of it, unit norm."""
        import torch

        from modules.video_sampler import preprocess_frames

        pixels = preprocess_frames(read_image_rgb(path), size=self.model.config.video_size)
        clip = self.model.clip
        with torch.inference_mode(), self._threads():
            features = clip.encode_image(pixels.to(self.model.device, dtype=clip.visual.conv1.weight.dtype))
        vector = features[0].float().cpu().numpy()
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


def model_for(fingerprint: Mapping[str, Any], device: str = "auto"):
    """Build the model a library fingerprint describes (its config, CLIP weights, checkpoint).

    Raises UsageError when the result is not the library's model (a file it names changed
    since the library was made): its queries would land in another space.
    """
    from config import from_dict
    from modules.retrieval import check_same_model
    from unified_model import create_unified_model

    config_dict: Dict[str, Any] = dict(fingerprint.get("config") or {})
    if not config_dict:
        raise UsageError("the library records no model config; pass --config_path / --checkpoint / --clip_weights")
    model = create_unified_model(config=from_dict(config_dict), checkpoint=fingerprint.get("checkpoint"),
                                 clip_weights=fingerprint.get("clip_weights"), device=device, merge_lora=True)
    check_same_model(fingerprint, model, "the library")  # a file it names may have changed since
    return model


class LibraryQueryEncoder:
    """Texts through the library's text tower file, pictures through the model (built once).

    ``folder`` is the library folder; the tower file is ``text_tower_path(folder, id)``.
    A missing or unreadable tower makes the first text query build the model, whose tower
    is then written (atomically; a read-only library just logs why not) and used, so every
    process encodes a text the same way.
    """

    def __init__(self, fingerprint: Mapping[str, Any], folder: str, device: str = "auto") -> None:
        from modules.library import fingerprint_id

        self.fingerprint = dict(fingerprint)
        self.fingerprint_id = fingerprint_id(fingerprint)
        self.folder = folder
        self.device = device
        self._tower = None
        self._model_encoder: Optional[ModelQueryEncoder] = None
        self._lock = threading.RLock()  # the server's first concurrent requests build once

    def model_encoder(self) -> ModelQueryEncoder:
        with self._lock:
            if self._model_encoder is None:
                self._model_encoder = ModelQueryEncoder(model_for(self.fingerprint, self.device))
            return self._model_encoder

    def text_tower(self):
        """The library's text tower: read from its file, else taken from the model and written."""
        with self._lock:
            return self._text_tower()

    def _text_tower(self):
        if self._tower is None:
            from modules.text_tower import TextTowerError, load_text_tower, save_text_tower, text_tower_of, text_tower_path

            path = text_tower_path(self.folder, self.fingerprint_id)
            if os.path.lexists(path):
                try:
                    self._tower = load_text_tower(path, self.fingerprint_id)
                except TextTowerError as err:
                    logger.warning("%s; rebuilding it from the model", err)
            if self._tower is None:
                self._tower = text_tower_of(self.model_encoder().model, self.fingerprint_id)
                try:
                    save_text_tower(self._tower, path)
                except OSError as err:
                    logger.info("cannot keep the text tower in %s (%s): each process builds the model", path, err)
        return self._tower

    def load(self, text: bool = True, image: bool = False) -> None:
        """Load now what text (the tower) and image queries (the model) will need."""
        if text:
            self.text_tower()
        if image:
            self.model_encoder()

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(T,) texts -> (T, D) float32 unit vectors."""
        return self.text_tower().encode_text(texts)

    def encode_image(self, path: Union[str, os.PathLike]) -> np.ndarray:
        """A picture -> (D,) float32 unit vector (the model's image tower)."""
        return self.model_encoder().encode_image(path)


def encoder_for(fingerprint: Mapping[str, Any], device: str = "auto", folder: Optional[str] = None):
    """The query encoder of a library: :class:`LibraryQueryEncoder` on ``folder``, or without
    a folder a :class:`ModelQueryEncoder` of the model the fingerprint names."""
    if folder is not None:
        return LibraryQueryEncoder(fingerprint, folder, device=device)
    return ModelQueryEncoder(model_for(fingerprint, device))
