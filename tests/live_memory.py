"""Peak bytes of tensors alive during a block of torch code, on any device (tests only).

A dispatch mode sees every tensor an aten op returns; a weak reference to its storage says
when it is freed. The peak is taken after each op (its inputs and outputs alive together),
so workspaces inside one kernel are not seen. Tensors created before the block (weights,
inputs) are not counted.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as meter: ...`` then ``meter.peak`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {key: item for key, item in self.live.items() if not item[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out
