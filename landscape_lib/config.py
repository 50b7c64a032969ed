"""Profiles, devices, threads and seeds: the settings every chapter starts from.

The book runs each chapter at three scales (DESIGN.md, "Profiles"):

========  ==================================================  ====================
profile   data and models                                     budget per chapter
========  ==================================================  ====================
``smoke`` tiniest settings, for CI                            30 s on 2 CPU cores
``cpu``   MNIST-1D, 8x8 digits, spirals; small MLP/CNN/ResNet  90 s on 2 CPU cores
``gpu``   CIFAR-10/100 with paper-like models and schedules   15 min on one GPU
========  ==================================================  ====================

A chapter states its own knobs once per profile with :func:`choose`, and calls :func:`setup`
to seed everything, pick the device and pin the thread count. Tiny models on a CPU are much
faster on one thread than on two when anything else runs (oversubscription, not FLOPs,
dominates), so ``smoke`` and ``cpu`` run single-threaded and the runner runs chapters side by
side instead.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is one of :data:`PROFILES`, else raise naming the choices."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    return profile


def choose(profile: str, *, smoke: Any, cpu: Any, gpu: Any) -> Any:
    """Pick the value of a chapter knob for ``profile``.

    >>> choose("cpu", smoke=2, cpu=20, gpu=200)
    20
    """
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[check_profile(profile)]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` into a usable device.

    ``"auto"`` picks CUDA when present, else the CPU (MPS is opt-in: its float64 support is
    partial). Asking for a device that is not there fails with the list of valid names.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise TypeError(f"device must be a string; valid devices: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"unknown device {name!r}; valid devices: {', '.join(DEVICES)}")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; "
                             f"valid devices here: auto, cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' requested but MPS is not available; "
                             "valid devices here: auto, cpu")
        return torch.device("mps")
    raise ValueError(f"unknown device {name!r}; valid devices: {', '.join(DEVICES)}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded likewise."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op thread count (``None`` leaves it alone); return the count in use."""
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


@dataclass(frozen=True)
class Setup:
    """What :func:`setup` decided: pass ``setup.device`` to data and models."""

    profile: str
    seed: int
    device: torch.device
    threads: int

    def choose(self, *, smoke: Any, cpu: Any, gpu: Any) -> Any:
        """:func:`choose` for this set-up's profile."""
        return choose(self.profile, smoke=smoke, cpu=cpu, gpu=gpu)

    @property
    def enforce_claims(self) -> bool:
        """Claims are enforced in ``cpu`` and ``gpu``, only recorded in ``smoke``."""
        return self.profile != "smoke"


def setup(profile: str = "cpu", seed: int = 0, device: str = "auto",
          threads: int | None = None) -> Setup:
    """Validate the chapter parameters, seed everything and pin threads.

    ``threads=None`` means one thread in ``smoke``/``cpu`` (unless the environment variable
    ``LANDSCAPE_THREADS`` says otherwise) and torch's default in ``gpu``. On the CPU the
    deterministic-algorithms switch is turned on, so a chapter run twice with one seed records
    the same numbers.
    """
    check_profile(profile)
    dev = resolve_device(device)
    if threads is None:
        env = os.environ.get("LANDSCAPE_THREADS")
        threads = int(env) if env else (1 if profile in ("smoke", "cpu") else None)
    n = set_threads(threads)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    seed_everything(seed)
    global _CURRENT
    _CURRENT = Setup(profile=profile, seed=seed, device=dev, threads=n)
    return _CURRENT


_CURRENT: Setup | None = None


def current() -> Setup | None:
    """The set-up of the last :func:`setup` call in this process (the chapter's), if any."""
    return _CURRENT
