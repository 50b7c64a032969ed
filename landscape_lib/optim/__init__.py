"""Optimizers the papers introduce that PyTorch does not ship, as ``torch.optim.Optimizer`` s.

One file per method (each opens with its paper and equations):

* :mod:`.padam` — Padam, partially adaptive momentum (Chen & Gu 2020), GadamX's base optimizer.

They train through ``train.fit`` like any PyTorch optimizer (closure-based ones through its
default closure step).
"""
from .padam import Padam

__all__ = ["Padam"]
