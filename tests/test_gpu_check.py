"""benchmarks/gpu_check.py keeps working: its --dry-run runs every step on CPU with tiny sizes."""
from __future__ import annotations

from tests.cli_utils import run_script


def test_gpu_check_dry_run(tmp_path):
    proc = run_script("benchmarks/gpu_check.py", ["--dry-run", "--work_dir", tmp_path / "work"], timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("GPU: none (dry run on CPU)"):]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| step") and not line.startswith("| ---")}
    assert rows["CUDA tests (pytest -m cuda)"] == "passed"
    assert rows["batch-size rule"] == "passed"
    assert rows["extraction benchmark"] == "passed"
    assert rows["fp16 training + GradScaler + resume"] == "passed"
    assert rows["2-process nccl extraction"] == "skipped"
    assert "cosine min" in table and "x the baseline" in table


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry_run():
    import torch

    if torch.cuda.is_available():
        return
    proc = run_script("benchmarks/gpu_check.py", [], timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
