"""A decode worker that SIGKILLs itself on chosen videos, in process or around a script.

``die_on`` replaces ``modules.decode_pool.decode_video`` (workers are forked on Linux, so
the replacement reaches them). Run as a program, it does that and then runs a script::

    python tests/worker_killer.py <name fragment> extract_video_embeddings.py ARGS...

so a command-line test can kill a worker mid-run: every time a worker takes a video whose
file name contains the fragment, it dies (the video is retried alone, then failed).
"""
from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from typing import Optional

if __name__ == "__main__":  # run as a program: modules and tests import from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.decode_pool import decode_video as _real_decode_video  # noqa: E402


def die_on(victim_fragment: str, marker: Optional[str], path: str, *args):
    """decode_video, except that the worker SIGKILLs itself on the victim (only the first
    time when ``marker`` names a file to create, every time when it is None)."""
    if victim_fragment in os.path.basename(path) and not (marker and os.path.exists(marker)):
        if marker:
            open(marker, "w").close()
        time.sleep(1.0)  # die while the consumer is busy with earlier videos
        os.kill(os.getpid(), 9)
    return _real_decode_video(path, *args)


def main() -> None:
    import modules.decode_pool as decode_pool

    fragment, script, *args = sys.argv[1:]
    decode_pool.decode_video = functools.partial(die_on, fragment, None)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    from tests.worker_killer import main as _main  # the importable copy: workers unpickle die_on from it

    _main()
