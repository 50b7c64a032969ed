"""The installed package (pip install ., Colab's install from the repository) holds every
subpackage of the library, not only the top-level modules."""
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_packaged():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(ROOT), include=include))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "landscape_lib").rglob("__init__.py")}
    assert on_disk <= found and "landscape_lib.optim" in found
