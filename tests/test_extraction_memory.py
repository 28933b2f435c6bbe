"""Directory extraction keeps memory flat as the number of videos grows."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.cli_utils import ROOT, write_small_config
from tests.video_factory import write_video

# Runs in a fresh process so ru_maxrss (the process's peak RSS) reflects only this work:
# a directory of 4 videos twice (warm-up), then one of 24; the peak may not grow with the count.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    from modules.extraction import extract_directory_embeddings
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    small, large, out, config = sys.argv[1:5]
    for run in ("warm1", "warm2"):  # first runs allocate caches, worker buffers, ...
        extract_directory_embeddings(small, out + "/" + run, config_path=config, device="cpu",
                                     batch_size=2, num_workers=1, progress=False)
    after_small = peak_mb()
    result = extract_directory_embeddings(large, out + "/large", config_path=config, device="cpu",
                                          batch_size=2, num_workers=1, progress=False)
    print(json.dumps({"small": after_small, "large": peak_mb(), "processed": result["processed"]}))
""")


def test_peak_memory_does_not_grow_with_video_count(tmp_path):
    for folder, count in (("small", 4), ("large", 24)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            write_video(tmp_path / folder / f"v{i:02d}.mp4", num_frames=20, fps=10, size=(96, 72))
    config = write_small_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "small"), str(tmp_path / "large"), str(tmp_path / "out"), str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["processed"] == 24
    print(f"\npeak RSS after warm-up {peaks['small']:.0f} MB, after 24 more {peaks['large']:.0f} MB")
    # Six times the videos: measured +4-5 MB (allocator noise); a per-video leak of the
    # sampled frames alone (~2 MB each at 4 frames) would add ~50 MB.
    assert peaks["large"] - peaks["small"] < 25, peaks
