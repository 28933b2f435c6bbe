"""A small real library for the server, page and moment tests: painted clips -> extraction -> index.

Three clips whose frames carry their frame numbers (tests/video_factory.py), extracted with
the small random-weight model of tests/cli_utils.py with group features, then indexed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

from tests.cli_utils import small_model
from tests.video_factory import write_video

#: name -> (frames, fps)
CLIPS: Dict[str, Tuple[int, int]] = {"alpha": (40, 10), "beta": (50, 10), "gamma": (36, 12)}


def build_library(root: Path):
    """(library folder's parent = extraction output dir, VideoLibrary with the small model's encoder)."""
    from modules.extraction import extract_directory_embeddings
    from modules.library import VideoLibrary
    from modules.library_builder import index_extraction_folder
    from modules.library_query import ModelQueryEncoder

    videos, out = root / "videos", root / "out"
    videos.mkdir(parents=True)
    for name, (frames, fps) in CLIPS.items():
        write_video(videos / f"{name}.mp4", frames, fps=fps, size=(128, 72), gop=6)
    model = small_model()
    done = extract_directory_embeddings(videos, out, save_format="both", save_frame_features=True, summary=True,
                                        model=model, num_workers=0, progress=False)
    assert done["processed"] == len(CLIPS), done
    index_extraction_folder(str(out))
    calls = []

    def factory(fingerprint):
        calls.append(fingerprint)
        return ModelQueryEncoder(model)

    library = VideoLibrary.open(out, encoder_factory=factory)
    library.encoder_calls = calls
    return out, library
