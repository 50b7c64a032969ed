"""Optimizers the papers introduce that PyTorch does not ship, as ``torch.optim.Optimizer`` s.

One file per method (each opens with its paper and equations):

* :mod:`.padam` — Padam, partially adaptive momentum (Chen & Gu 2020), GadamX's base optimizer.
* :mod:`.constrained` — constrained Langevin dynamics with a constraint per param group
  (c-CoLA, o-CoLA, C-SGD, C-SGLD; Leimkuhler et al. 2020, 2021).

They train through ``train.fit`` like any PyTorch optimizer (closure-based ones through its
default closure step).
"""
from .constrained import ConstrainedLangevin, constrained_groups
from .padam import Padam

__all__ = ["ConstrainedLangevin", "Padam", "constrained_groups"]
