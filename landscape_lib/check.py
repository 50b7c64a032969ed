"""Lint the chapters against the book's template and the library against its rules.

``python -m landscape_lib check [CHAPTER ...]`` reports every broken rule as
``<chapter>: <rule>: <what is wrong>`` and exits non-zero if there is any. The chapter rules are
DESIGN.md's "A chapter":

==================  =========================================================================
rule                a chapter must have
==================  =========================================================================
``title``           a first Markdown cell starting ``# N. `` with the chapter's number
``colab``           the "Open in Colab" badge and the install cell that ``_config.yml`` derives
``parameters``      one cell tagged ``parameters`` holding exactly ``PROFILE``, ``SEED``, ``DEVICE``
``config``          a code cell choosing knobs per profile (``ch(``/``choose(`` with ``smoke=``)
``slider``          at least one static slider figure (``viz.slider_figure(``)
``live-widgets``    live widgets (``viz.interact``, ``ipywidgets``) only in ``remove-cell`` cells
``claims``          at least one ``claims.check(``/``claims.check_seeds(`` and ``claims.report()``
``reproduction``    a ``## Reproduction`` section
``summary``         a ``## Summary`` section
``exercises``       an ``## Exercises`` section with at least two graded exercises (nbgrader
                    solution and grade cells) and a solution in a dropdown
``provenance``      a last code cell calling ``viz.provenance(``
``outputs``         no stored outputs or execution counts
==================  =========================================================================

The library rule (``torch-load``): every ``torch.load`` call under ``landscape_lib/`` passes
``weights_only=True``, so a checkpoint or cache can never run code when it is loaded.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .runner import Chapter, chapters, find_root, select

CHAPTER_RULES = ("title", "colab", "parameters", "config", "slider", "live-widgets", "claims",
                 "reproduction", "summary", "exercises", "provenance", "outputs")
LIBRARY_RULES = ("torch-load",)
LIVE_RE = re.compile(r"\bviz\.interact\(|\bipywidgets\b|\bwidgets\.\w+\(|\binteract\(")
MIN_GRADED = 2


@dataclass(frozen=True)
class Problem:
    where: str  # a chapter slug or a library file
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.rule}: {self.message}"


def _src(cell) -> str:
    s = cell.get("source", "")
    return s if isinstance(s, str) else "".join(s)


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def graded(cells) -> tuple[int, int]:
    """How many nbgrader solution cells and grade (self-check) cells the notebook has."""
    nbg = [c.get("metadata", {}).get("nbgrader", {}) for c in cells]
    return (sum(bool(m.get("solution")) for m in nbg),
            sum(bool(m.get("grade")) for m in nbg))


def check_chapter(root: Path, ch: Chapter) -> list[Problem]:
    """The template rules broken by one chapter."""
    from .colab import colab_links

    nb = json.loads(ch.path.read_text())
    cells = nb.get("cells", [])
    code = [c for c in cells if c.get("cell_type") == "code"]
    md = "\n".join(_src(c) for c in cells if c.get("cell_type") == "markdown")
    text = "\n".join(_src(c) for c in code)
    out: list[Problem] = []

    def bad(rule, message):
        out.append(Problem(ch.slug, rule, message))

    first = cells[0] if cells else {}
    if first.get("cell_type") != "markdown" or not _src(first).startswith(f"# {int(ch.number)}. "):
        bad("title", f"the first cell must be Markdown starting '# {int(ch.number)}. <paper title>'")
    badge, req = colab_links(root, ch)
    if badge not in md:
        bad("colab", "no Colab badge matching _config.yml (run `python -m landscape_lib sync`)")
    if not any(req in _src(c) and "remove-cell" in _tags(c) for c in code):
        bad("colab", f"no remove-cell install cell with {req} (run `python -m landscape_lib sync`)")
    params = [c for c in cells if "parameters" in _tags(c)]
    names = None
    if len(params) == 1:
        names = [ln.split("=")[0].strip() for ln in _src(params[0]).splitlines()
                 if ln.strip() and not ln.strip().startswith("#")]
    if names != ["PROFILE", "SEED", "DEVICE"]:
        bad("parameters", f"need exactly one cell tagged 'parameters' with PROFILE, SEED, DEVICE "
                          f"(found {len(params)} such cell(s){'' if names is None else ': ' + ', '.join(names)})")
    if not re.search(r"\b(ch|choose)\(\s*smoke\s*=", text):
        bad("config", "no knob chosen per profile (ch(smoke=..., cpu=..., gpu=...))")
    if "viz.slider_figure(" not in text:
        bad("slider", "no static slider figure (viz.slider_figure)")
    live = [i + 1 for i, c in enumerate(cells) if c.get("cell_type") == "code"
            and LIVE_RE.search(_src(c)) and "remove-cell" not in _tags(c)]
    if live:
        bad("live-widgets", f"live widgets outside remove-cell cells: cell(s) {', '.join(map(str, live))}")
    if not re.search(r"\bclaims\.check(_seeds)?\(", text) or "claims.report()" not in text:
        bad("claims", "needs claims.check(...)/claims.check_seeds(...) and claims.report()")
    for rule, heading in (("reproduction", "## Reproduction"), ("summary", "## Summary"),
                          ("exercises", "## Exercises")):
        if not re.search(rf"^{heading}\b", md, re.M):
            bad(rule, f"no '{heading}' section")
    solutions, checks = graded(cells)
    if solutions < MIN_GRADED or checks < MIN_GRADED:
        bad("exercises", f"needs at least {MIN_GRADED} graded exercises (nbgrader solution and grade "
                         f"cells); found {solutions} solution and {checks} grade cell(s)")
    if ":class: dropdown" not in md:
        bad("exercises", "no exercise with its solution in a dropdown")
    if not code or "viz.provenance(" not in _src(code[-1]):
        bad("provenance", "the last code cell must call viz.provenance(T0, setup.device)")
    stored = [i + 1 for i, c in enumerate(cells) if c.get("cell_type") == "code"
              and (c.get("outputs") or c.get("execution_count") is not None)]
    if stored:
        bad("outputs", f"stored outputs in cell(s) {', '.join(map(str, stored))} (strip them: nbstripout)")
    return out


def check_library(package: Path) -> list[Problem]:
    """``torch.load`` without ``weights_only=True`` anywhere under ``package``."""
    out = []
    for f in sorted(package.rglob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    out.append(Problem(f"{f.relative_to(package.parent)}:{node.lineno}", "torch-load",
                                       "torch.load must pass weights_only=True"))
    return out


def run_checks(wanted: Sequence[str] = (), root: Path | None = None,
               package: Path | None = None) -> list[Problem]:
    """Every problem of the chapters ``wanted`` (all if empty) and of the library."""
    root = root or find_root()
    package = package or Path(__file__).resolve().parent
    problems = []
    for ch in select(chapters(root), wanted):
        problems += check_chapter(root, ch)
    return problems + check_library(package)


def main(wanted: Sequence[str] = (), root: Path | None = None) -> int:
    """``python -m landscape_lib check``: print the problems; non-zero if there is any."""
    root = root or find_root()
    problems = run_checks(wanted, root)
    for p in problems:
        print(p)
    n = len(select(chapters(root), wanted))
    print(f"{n} chapter(s) and the library checked: "
          + (f"{len(problems)} problem(s)" if problems else "no problems"))
    return 1 if problems else 0
