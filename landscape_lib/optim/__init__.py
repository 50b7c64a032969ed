"""Optimizers the papers introduce that PyTorch does not ship, as ``torch.optim.Optimizer`` s.

One file per method (each opens with its paper and equations):

* :mod:`.padam` — Padam, partially adaptive momentum (Chen & Gu 2020), GadamX's base optimizer.
* :mod:`.multirate` — multirate SGD (Vlaar & Leimkuhler 2022): fast and slow parameter groups,
  slow gradients every k steps, with its ``train.fit`` step :func:`~.multirate.multirate_step`.

They train through ``train.fit`` like any PyTorch optimizer (closure-based ones through its
default closure step).
"""
from .multirate import MultirateSGD, multirate_step
from .padam import Padam

__all__ = ["MultirateSGD", "Padam", "multirate_step"]
