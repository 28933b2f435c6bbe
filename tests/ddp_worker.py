"""Worker for tests/test_ddp.py: train a few steps under torchrun, save this rank's tensors.

    torchrun --nproc_per_node 2 tests/ddp_worker.py CONFIG.json OUT_DIR MODE
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from config import from_json  # noqa: E402
from modules.training import Trainer, cleanup_distributed, init_distributed  # noqa: E402


def main() -> None:
    config_path, out_dir, mode = sys.argv[1:4]
    torch.set_num_threads(1)
    config = from_json(config_path)
    env = init_distributed("cpu")
    try:
        trainer = Trainer(config, mode, env=env, progress=False, log_dir=False)
        keep = [n for n, _ in trainer.model.named_parameters() if n.split(".")[0] != "clip"]
        initial = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if n in keep}
        summary = trainer.train()
        metrics = trainer.last_metrics
        state = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if n in keep}
        torch.save({"state": state, "initial": initial, "world_size": env.world_size, "step": summary["step"],
                    "losses": torch.tensor([h["loss"] for h in trainer.history]),
                    "grad_norms": torch.tensor([h["grad_norm"] for h in trainer.history]),
                    "r1": metrics["t2v"]["R1"] if metrics else None},
                   os.path.join(out_dir, f"rank{env.rank}.pt"))
        trainer.close()
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
