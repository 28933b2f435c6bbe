"""Text queries of a library through its text tower file: no torch, same vectors, the model pinned."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from modules.clip_archs import small_arch
from modules.module_clip import random_state_dict
from tests.cli_utils import ROOT, describe, no_traceback, run_script
from tests.video_factory import write_video

SIZE = 32
ARCH = small_arch(SIZE, vision_width=64, vision_layers=2, text_width=64, text_layers=2)

# Run inference.py's main in this interpreter, then say whether torch was imported.
_CLI_PROBE = """
import sys
sys.path.insert(0, {root!r})
import inference
try:
    code = inference.main({argv!r})
except SystemExit as stop:
    code = stop.code
print("TORCH_IMPORTED", "torch" in sys.modules, "EXIT", code)
"""


def _cli_in_probe(argv):
    code = _CLI_PROBE.format(root=str(ROOT), argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """An extraction with --index whose config names a weights file: (root, output dir, config, weights)."""
    from modules.training import small_config_dict

    root = tmp_path_factory.mktemp("tower")
    weights = root / "clip.pt"
    torch.save(random_state_dict(ARCH, seed=0), weights)
    config = root / "config.json"
    config.write_text(json.dumps({**small_config_dict(SIZE, vision_layers=2), "clip_weights": str(weights)}))
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", 10 + 4 * i, fps=10, size=(48, 32), gop=4)
    out = root / "out"
    done = run_script("extract_video_embeddings.py", ["--video_dir", videos, "--output_dir", out, "--config_path", config,
                                                      "--index", "-q", "--num_workers", "0"], timeout=300)
    assert done.returncode == 0, describe(done)
    return root, out, config, weights


def _scores(report):
    return [(h["name"], h["score"]) for h in json.loads(report.read_text())["results"]]


def test_extraction_keeps_the_tower_and_a_search_without_one_writes_it(indexed, tmp_path):
    from modules.library import VideoLibrary
    from modules.library_query import model_for

    _, out, _, _ = indexed
    library = VideoLibrary.open(out)
    towers = lambda: sorted(p.name for p in (out / "library").glob("text-tower-*"))  # noqa: E731
    assert towers() == [f"text-tower-{library.fingerprint_id}.safetensors"]  # written by extract --index
    after_extraction = _cli_in_probe(["--embeddings_dir", out, "--query", "a dog", "--top_k", "3",
                                      "--output", tmp_path / "0.json"])
    assert "TORCH_IMPORTED False EXIT 0" in after_extraction.stdout, describe(after_extraction)
    (out / "library" / towers()[0]).unlink()
    first = _cli_in_probe(["--embeddings_dir", out, "--query", "a dog", "--top_k", "3", "--output", tmp_path / "1.json"])
    assert "TORCH_IMPORTED True EXIT 0" in first.stdout, describe(first)  # no tower yet: the model was built
    assert towers() == [f"text-tower-{library.fingerprint_id}.safetensors"]
    again = _cli_in_probe(["--embeddings_dir", out, "--query", "a dog", "--top_k", "3", "--output", tmp_path / "2.json"])
    assert "TORCH_IMPORTED False EXIT 0" in again.stdout, describe(again)
    assert _scores(tmp_path / "0.json") == _scores(tmp_path / "1.json") == _scores(tmp_path / "2.json")
    # the scores are those of the torch model's own text embedding
    model = model_for(library.fingerprint, device="cpu")
    with torch.inference_mode():
        text = model.encode_text(["a dog"])[0].numpy()
    expected = sorted((library.embeddings() @ text).tolist(), reverse=True)
    assert [s for _, s in _scores(tmp_path / "2.json")] == pytest.approx(expected, abs=1e-5)


def test_a_broken_tower_file_is_rebuilt_from_the_model(indexed, tmp_path):
    from modules.library import VideoLibrary

    _, out, _, _ = indexed
    library = VideoLibrary.open(out)
    tower = out / "library" / f"text-tower-{library.fingerprint_id}.safetensors"
    good = _cli_in_probe(["--embeddings_dir", out, "--query", "a cat", "--output", tmp_path / "good.json"])
    assert "EXIT 0" in good.stdout, describe(good)
    tower.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    rebuilt = _cli_in_probe(["--embeddings_dir", out, "--query", "a cat", "--output", tmp_path / "rebuilt.json"])
    assert "TORCH_IMPORTED True EXIT 0" in rebuilt.stdout, describe(rebuilt)
    assert "not a readable safetensors file" in rebuilt.stderr and "rebuilding it from the model" in rebuilt.stderr
    assert _scores(tmp_path / "rebuilt.json") == _scores(tmp_path / "good.json")
    fast = _cli_in_probe(["--embeddings_dir", out, "--query", "a cat"])
    assert "TORCH_IMPORTED False EXIT 0" in fast.stdout, describe(fast)


def test_weights_changed_since_indexing_are_refused(indexed, tmp_path):
    """The library records its weights file; a search that would build the model from a file
    changed since then answers exit 2 instead of searching in another model's space (it
    searched silently before). A tower file written before the change still pins the model."""
    from modules.library import VideoLibrary

    root, out, _, weights = indexed
    copy = tmp_path / "out"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    library = VideoLibrary.open(copy)
    for tower in (copy / "library").glob("text-tower-*"):
        tower.unlink()
    original = weights.read_bytes()
    try:
        torch.save(random_state_dict(ARCH, seed=1), weights)  # other weights under the recorded name
        proc = run_script("inference.py", ["--embeddings_dir", copy, "--query", "a dog"], timeout=300)
        assert proc.returncode == 2, describe(proc)
        no_traceback(proc)
        error = proc.stderr.strip().splitlines()[-1]
        assert "another model" in error and "the weights differ" in error and str(weights) in error, error
        assert not list((copy / "library").glob("text-tower-*"))  # nothing written for the wrong model
    finally:
        weights.write_bytes(original)
    assert library.fingerprint_id in next((out / "library").glob("text-tower-*")).name
