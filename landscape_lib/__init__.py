"""landscape_lib: the shared library of the Loss Landscape Book.

One module per concept (see DESIGN.md):

* ``config`` — profiles (smoke/cpu/gpu), ``choose``, devices, threads, seeding;
* ``data`` — MNIST-1D, digits, spirals, moons, CIFAR (and stand-in CIFAR) as device tensors;
* ``models`` — MLP, 1-D CNN, residual MLP, CIFAR ResNet, VGG, WideResNet, a tiny ViT;
* ``params`` — weights as dicts, ``functional_call``, stacking, BatchNorm recomputation;
* ``directions`` — random (filter/layer/global-normalised), between solutions, trajectory PCA;
* ``landscape`` — loss and accuracy along lines and over planes, shape summaries;
* ``curvature`` — Hessian-vector products (three modes), eigenvalues, Lanczos, SLQ spectra,
  Hutchinson trace, sharpness, the largest stable learning rate;
* ``curves`` — Bezier and polygonal chains between solutions;
* ``train`` — ``fit`` (one loop: ``step=`` and ``sampler=`` seams), ``evaluate``, ``fork``;
* ``schedules`` — learning-rate schedules (SWA's, FGE's, cosine, phases, ``per_batch``);
* ``averaging`` — SWA, EMA, periodic/multi-round SWA, iterate averaging, SWAG;
* ``optim`` — optimizers PyTorch lacks (a package, one file per method);
* ``manifolds`` — weight constraints (circle, sphere, Stiefel) with SHAKE/RATTLE solves;
* ``langevin`` — training as sampling: the splitting integrator (LaLa, AdLaLa, LOL, heavy ball),
  the (h, γ, τ) ↔ (lr, momentum) converter, kinetic-temperature monitors;
* ``quadratic`` — the noisy quadratic model;
* ``sparse`` — dynamic sparse training: masks, ERK densities, RigL/SET drop-grow, re-exploration,
  superposition and re-pruning of tickets, sparse training FLOPs;
* ``ensembles`` — metrics (accuracy, NLL, ECE, Brier, disagreement, KL), members, averaging;
* ``film`` — FiLM-Ensemble: member-conditioned norm layers, conversion of any model, the wrapper;
* ``claims`` — a paper's claim against a measurement, per seed; the scoreboard;
* ``viz`` — plotly figures with static sliders and the layout rules;
* ``runner``, ``book``, ``colab``, ``check``, ``coursework`` — executing chapters, building the
  book, Colab badges, linting chapters, student copies and grading; ``__main__`` is the command
  line only (``python -m landscape_lib``).
"""
__version__ = "0.1.0"
