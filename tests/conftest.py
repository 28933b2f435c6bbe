"""Test-suite options: the ``cuda`` marker (tests that need a CUDA GPU skip without one).

``benchmarks/gpu_check.py`` runs the marked tests on a lent GPU (``pytest -m cuda``).
"""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (benchmarks/gpu_check.py runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
