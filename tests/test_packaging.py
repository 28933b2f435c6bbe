"""`pip install .` gives a library and scripts that work from any folder (issue 11, point 11)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ["unified_model", "inference", "config", "extract_video_embeddings",
             "train_unified_model", "training_example"]
SCRIPTS = {"unified-extract": "extract_video_embeddings:main", "unified-inference": "inference:main",
           "unified-train": "train_unified_model:main", "unified-train-example": "training_example:main"}
_SKIP = {".venv", ".git", "__pycache__", "checkpoints", "embeddings", "runs", "build", "dist"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the project's wheel from a copy of the tree (the checkout stays free of build files)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT, src, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if n in _SKIP or n.endswith(".egg-info")])
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("*.whl")
    return path


def test_wheel_holds_modules_data_and_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in TOP_LEVEL:
        assert f"{module}.py" in names
    for py in (ROOT / "modules").glob("*.py"):
        assert f"modules/{py.name}" in names
    for data in ["modules/bpe_simple_vocab_16e6.txt.gz", "modules/cross-base/cross_config.json",
                 "configs/training_config.json", "configs/unified_model_config.json"]:
        assert data in names
    for recipe in (ROOT / "configs" / "recipes").glob("*.json"):
        assert f"configs/recipes/{recipe.name}" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text


def test_installed_library_runs_from_another_folder(wheel, tmp_path):
    """Installed (not the checkout), the library imports, finds its vocabulary and shipped configs."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import os, config, unified_model, train_unified_model\n"
        "from unified_model import create_unified_model\n"
        "from modules.tokenization_clip import SimpleTokenizer\n"
        "from modules.training import load_training_config\n"
        "from config import read_json_object\n"
        "assert unified_model.__file__.startswith(os.environ['TARGET']), unified_model.__file__\n"
        "cfg = load_training_config(read_json_object(train_unified_model.DEFAULT_CONFIG))\n"
        "print(len(SimpleTokenizer().encode('a dog catches a frisbee')), cfg.training.datatype)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "TARGET": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "5"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_run_from_any_folder(script, tmp_path):
    """setup.sh installs the project, so its console scripts sit beside the interpreter."""
    path = shutil.which(script, path=os.path.dirname(sys.executable))
    assert path, f"{script} not installed beside {sys.executable}: run `bash setup.sh`"
    done = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
