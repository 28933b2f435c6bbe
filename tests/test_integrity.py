"""Integrity of what extraction leaves on disk and what search trusts (no silent wrong answers)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from modules.cli_support import UsageError
from modules.extraction import extract_directory_embeddings
from modules.retrieval import load_embedding_index, search_embeddings
from modules.video_listing import unique_names
from tests.cli_utils import SMALL_CONFIG, small_model
from tests.video_factory import write_video

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _clip(path, frames=8, size=(48, 32), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, frames + seed, fps=12, size=(size[0] + 16 * seed, size[1]), gop=4)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The same architecture built from a checkpoint with other trained tensors."""
    from config import from_dict
    from unified_model import create_unified_model

    built = create_unified_model(config=from_dict(SMALL_CONFIG), device="cpu")
    with torch.no_grad():
        for _, param in built.named_group_parameters("stop"):
            param.add_(0.5)
    path = tmp_path_factory.mktemp("ckpt") / "other.pth"
    built.save_checkpoint(path)
    return create_unified_model(checkpoint=path, device="cpu", merge_lora=True)


def _run(video_dir, out, model, **kw):
    return extract_directory_embeddings(video_dir, out, model=model, num_workers=0, progress=False, **kw)


# ----------------------------------------------------------------------------- item 5: unique names


def test_crafted_names_cannot_share_an_output_name():
    """a.mp4, A.mp4 and a file named like a.mp4's hashed name: three names, unique by construction."""
    crafted = f"a-{hashlib.sha1(b'a.mp4').hexdigest()[:8]}.mkv"
    for rels in (["a.mp4", "A.mp4", crafted], [crafted, "a.mp4", "A.mp4"],
                 ["x.mp4", "X.mp4", f"x-{hashlib.sha1(b'X.mp4').hexdigest()[:8]}.mp4", "x.webm"]):
        names = unique_names(sorted(rels))
        assert len({n.casefold() for n in names}) == len(rels), names
