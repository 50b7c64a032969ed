"""Colab: each chapter's "Open in Colab" badge and install cell, derived from ``_config.yml``.

The repository is named once, in ``_config.yml`` (``repository.url``, ``repository.branch``,
``repository.path_to_book``; ``launch_buttons.colab_url``). :func:`colab_links` derives a chapter's
badge (a link to the notebook on GitHub, opened through Colab) and the pip requirement its install
cell uses (``git+<url>.git@<branch>``). :func:`sync` rewrites the badge in Markdown cells and the
requirement in ``remove-cell`` code cells of every chapter (``python -m landscape_lib sync``);
with ``check`` it only reports the notebooks that are out of date.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .runner import Chapter, chapters, find_root

BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
INSTALL_RE = re.compile(r"git\+https?://[^\s\"']+")


def colab_links(root: Path, ch: Chapter) -> tuple[str, str]:
    """The badge Markdown and the pip requirement for ``ch``, from ``repository`` in _config.yml."""
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    repo = cfg.get("repository", {})
    url = repo.get("url", "").rstrip("/")
    if not url.startswith("https://github.com/"):
        raise SystemExit("_config.yml needs repository.url = https://github.com/OWNER/REPO")
    branch = repo.get("branch", "main")
    book = repo.get("path_to_book", "").strip("/")
    path = "/".join(p for p in (book, ch.rel.as_posix()) if p)
    colab = cfg.get("launch_buttons", {}).get("colab_url", "https://colab.research.google.com")
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"({colab.rstrip('/')}/github/{url[len('https://github.com/'):]}/blob/{branch}/{path})")
    return badge, f"git+{url}.git@{branch}"


def sync(check: bool = False, root: Path | None = None) -> int:
    """Rewrite every chapter's badge and install cell from _config.yml (``check``: only report);
    non-zero under ``check`` if a notebook is out of date."""
    root = root or find_root()
    stale = []
    for ch in chapters(root):
        badge, req = colab_links(root, ch)
        nb = json.loads(ch.path.read_text())
        changed = False
        for cell in nb["cells"]:
            src = "".join(cell.get("source", ""))
            new = BADGE_RE.sub(lambda m: badge, src) if cell["cell_type"] == "markdown" else src
            if cell["cell_type"] == "code" and "remove-cell" in cell.get("metadata", {}).get("tags", []):
                new = INSTALL_RE.sub(lambda m: req, new)
            if new != src:
                cell["source"] = new.splitlines(keepends=True)
                changed = True
        text = "".join(c.get("source", "") if isinstance(c.get("source"), str)
                       else "".join(c["source"]) for c in nb["cells"])
        if badge not in text or req not in text:
            print(f"{ch.rel}: no Colab badge or install cell to update")
            stale.append(ch.slug)
            continue
        if changed:
            stale.append(ch.slug)
            if not check:
                ch.path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
                print(f"updated {ch.rel}")
    if check and stale:
        print("out of date with _config.yml: " + ", ".join(stale))
        return 1
    return 0
