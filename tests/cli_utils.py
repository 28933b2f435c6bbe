"""Helpers for tests that run the command-line scripts as subprocesses.

The scripts run with random ViT-B/32 weights (``clip_weights: "random"``) and a small
4-frame schedule: these tests are about the command line, files and exit codes, and the
model's numbers are covered by test_unified_model.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: a valid, cheap configuration: 4 sampled frames -> 4 groups -> merged 2-2 at blocks 9, 10
SMALL_CONFIG: Dict = {
    "tempme": {"merge_frame_num": "2-2", "merge_layer": [9, 10]},
    "max_frames": 4,
    "num_segments": 4,
    "clip_weights": "random",
}


def write_small_config(folder: Path, **overrides) -> Path:
    """Write SMALL_CONFIG (+ overrides) to ``folder/small_config.json``."""
    path = Path(folder) / "small_config.json"
    path.write_text(json.dumps({**SMALL_CONFIG, **overrides}))
    return path


def run_script(script: str, args: Sequence[str], timeout: float = 180, cwd: Optional[Path] = None,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` from the repository root; text output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        return subprocess.run(
            [sys.executable, str(ROOT / script), *map(str, args)], cwd=str(cwd or ROOT), env=full_env,
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:  # a hang is a failure, with whatever it printed
        pytest.fail(f"{script} {' '.join(map(str, args))} hung for {timeout}s:\n{err.stdout}\n{err.stderr}")


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


_MODEL_CACHE: Dict[str, object] = {}


def small_model():
    """The model the scripts build from SMALL_CONFIG (same seed), built once per test process."""
    if "model" not in _MODEL_CACHE:
        import torch

        from config import from_dict
        from unified_model import create_unified_model

        torch.set_num_threads(2)
        _MODEL_CACHE["model"] = create_unified_model(config=from_dict(SMALL_CONFIG), device="cpu", merge_lora=True)
    return _MODEL_CACHE["model"]
