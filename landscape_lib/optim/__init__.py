"""Optimizers the papers introduce that PyTorch does not ship, as ``torch.optim.Optimizer`` s.

One file per method (each opens with its paper and equations):

* :mod:`.padam` — Padam, partially adaptive momentum (Chen & Gu 2020), GadamX's base optimizer.
* :mod:`.sam` — SAM, ASAM and SAM-ON (Foret et al. 2021; Kwon et al. 2021; Mueller et al. 2023),
  a parameter filter by module type.
* :mod:`.sgld` — stochastic-gradient Langevin dynamics (Welling & Teh 2011): the step function.
* :mod:`.entropy_sgd` — Entropy-SGD (Chaudhari et al. 2017), an SGLD inner loop on fresh batches.
* :mod:`.multirate` — multirate SGD (Vlaar & Leimkuhler 2022): fast and slow parameter groups,
  slow gradients every k steps, with its ``train.fit`` step :func:`~.multirate.multirate_step`.
* :mod:`.constrained` — constrained Langevin dynamics with a constraint per param group
  (c-CoLA, o-CoLA, C-SGD, C-SGLD; Leimkuhler et al. 2020, 2021).

They train through ``train.fit`` like any PyTorch optimizer (closure-based ones through its
default closure step).
"""
from .constrained import ConstrainedLangevin, constrained_groups
from .entropy_sgd import EntropySGD
from .multirate import MultirateSGD, multirate_step
from .padam import Padam
from .sam import SAM, norm_parameters, sam_param_counts
from .sgld import SGLD, sgld_step_

__all__ = ["ConstrainedLangevin", "EntropySGD", "MultirateSGD", "Padam", "SAM", "SGLD", "constrained_groups",
           "multirate_step", "norm_parameters", "sam_param_counts", "sgld_step_"]
