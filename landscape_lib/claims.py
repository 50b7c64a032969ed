"""Claims: a paper's statement in testable form, checked against what the chapter measured.

Each chapter calls :func:`start` once, :func:`check` for every claim, and :func:`report` at the
end. A check records

``chapter, claim, measured, comparison, threshold, holds, paper, note, profile, seed``

(the keys of the run directory's ``claims.json``). Records are written to disk as soon as they
are made (when the runner sets ``LANDSCAPE_CLAIMS_DIR``), so a chapter that fails later still
shows what it measured on the scoreboard. In the ``cpu`` and ``gpu`` profiles :func:`report`
ends the chapter with :class:`ClaimsFailed` if any claim does not hold; in ``smoke`` (tiny
settings, for CI) claims are recorded but not enforced.

Comparisons: ``>``, ``>=``, ``<``, ``<=`` against a number, and ``in`` against a closed
interval ``(low, high)``. A claim the chapter does not expect to show at its scale is checked
with ``gate=False``: recorded with its true verdict (and "not gated at this scale" in its note),
never enforced.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import check_profile

COMPARISONS = (">", ">=", "<", "<=", "in")
KEYS = ("chapter", "claim", "measured", "comparison", "threshold", "holds", "paper", "note",
        "profile", "seed")


class ClaimsFailed(AssertionError):
    """A chapter's enforced claims did not all hold."""


@dataclass
class Record:
    chapter: str
    claim: str
    measured: float
    comparison: str
    threshold: Any
    holds: bool
    paper: str | None
    note: str
    profile: str
    seed: int

    @property
    def margin(self) -> float:
        """How far the measurement is on the right side of the threshold (negative: wrong side)."""
        m, t = self.measured, self.threshold
        if self.comparison in (">", ">="):
            return m - t
        if self.comparison in ("<", "<="):
            return t - m
        lo, hi = t
        return min(m - lo, hi - m)


@dataclass
class _Chapter:
    chapter: str | None = None
    profile: str = "cpu"
    seed: int = 0
    records: list | None = None


_current = _Chapter(records=[])


def compare(measured: float, comparison: str, threshold) -> bool:
    """Whether ``measured <comparison> threshold`` holds (NaN never holds)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}; valid comparisons: "
                         f"{', '.join(COMPARISONS)}")
    if math.isnan(measured):
        return False
    if comparison == "in":
        lo, hi = threshold
        return lo <= measured <= hi
    return {">": measured > threshold, ">=": measured >= threshold,
            "<": measured < threshold, "<=": measured <= threshold}[comparison]


def start(chapter: str, profile: str, seed: int) -> None:
    """Begin a chapter's claims (clears earlier records of this chapter and its file)."""
    check_profile(profile)
    _current.chapter, _current.profile, _current.seed = str(chapter), profile, int(seed)
    _current.records = []
    path = _path()
    if path is not None and path.exists():
        path.unlink()


def _path() -> Path | None:
    root = os.environ.get("LANDSCAPE_CLAIMS_DIR")
    if not root or _current.chapter is None:
        return None
    return Path(root) / f"{_current.chapter}.json"


def _number(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None


NOT_GATED = "not gated at this scale"


def check(claim: str, measured: float, comparison: str, threshold, *,
          paper: str | None = None, note: str = "", gate: bool = True) -> Record:
    """Record ``claim``: does ``measured <comparison> threshold`` hold?

    ``paper`` is the paper's own number or finding, for the table; ``note`` says what was
    measured and how (seeds, scale). ``gate=False`` records a claim that is *not expected* to
    show at this scale (the chapter must say why): it is measured and shown on the scoreboard
    with its true verdict, but :func:`report` does not fail the chapter on it.
    """
    if _current.chapter is None:
        raise RuntimeError("call claims.start(chapter, profile, seed) before claims.check")
    if not claim:
        raise ValueError("a claim needs a name")
    value = _number(measured, "measured")
    if comparison == "in":
        if not (isinstance(threshold, Sequence) and len(threshold) == 2):
            raise ValueError("comparison 'in' needs threshold=(low, high)")
        thr: Any = [_number(threshold[0], "threshold"), _number(threshold[1], "threshold")]
        if thr[0] > thr[1]:
            raise ValueError(f"interval threshold has low > high: {thr}")
    else:
        thr = _number(threshold, "threshold")
    holds = compare(value, comparison, thr)
    if not gate:
        note = f"{NOT_GATED}; {note}" if note else NOT_GATED
    rec = Record(_current.chapter, claim, value, comparison, thr, holds, paper, note,
                 _current.profile, _current.seed)
    _current.records = [r for r in _current.records if r.claim != claim] + [rec]
    _write()
    return rec


def _write() -> None:
    path = _path()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in _current.records], indent=1))
    os.replace(tmp, path)


def records() -> list[Record]:
    """This chapter's records so far."""
    return list(_current.records)


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(t) for t in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_html(recs: Sequence[Record] | None = None) -> str:
    """The claims as an HTML table (measured, test, margin, verdict, paper, note)."""
    recs = records() if recs is None else recs
    rows = []
    for r in recs:
        verdict = ("✓ holds" if r.holds else "✗ does not hold") + (
            " (not gated)" if r.note.startswith(NOT_GATED) else "")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.claim, _fmt(r.measured), f"{r.comparison} {_fmt(r.threshold)}", _fmt(r.margin),
            verdict, r.paper or "", r.note)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("claim", "measured", "test", "margin", "verdict",
                                              "paper", "note"))
    return (f'<table class="claims-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def report() -> list[Record]:
    """Show this chapter's claims; in ``cpu``/``gpu`` raise :class:`ClaimsFailed` if any fail."""
    recs = records()
    try:
        from IPython.display import HTML, display

        display(HTML(table_html(recs)))
    except ImportError:  # pragma: no cover
        for r in recs:
            print(r)
    failed = [r for r in recs if not r.holds and not r.note.startswith(NOT_GATED)]
    if failed and _current.profile != "smoke":
        lines = "; ".join(f"{r.claim}: measured {_fmt(r.measured)}, needed {r.comparison} "
                          f"{_fmt(r.threshold)}" for r in failed)
        raise ClaimsFailed(f"{len(failed)} of {len(recs)} claims of chapter {_current.chapter} "
                           f"do not hold in profile {_current.profile!r}: {lines}")
    return recs


# --- the book's scoreboard -------------------------------------------------------------------

def load(path: str | Path) -> list[Record]:
    """Read a ``claims.json`` (or one chapter's file)."""
    data = json.loads(Path(path).read_text())
    return [Record(**{k: d[k] for k in KEYS}) for d in data]


def save(recs: Sequence[Record], path: str | Path) -> None:
    """Write records as a ``claims.json`` list with the keys of :data:`KEYS`."""
    Path(path).write_text(json.dumps([asdict(r) for r in recs], indent=1))


def scoreboard_markdown(recs: Sequence[Record], titles: dict[str, str] | None = None,
                        failed_chapters: Sequence[str] = ()) -> str:
    """The scoreboard page: one table per chapter, with totals."""
    titles = titles or {}
    if not recs and not failed_chapters:
        return "No claims recorded yet: run `python -m landscape_lib run` first.\n"
    profiles = sorted({r.profile for r in recs})
    seeds = sorted({r.seed for r in recs})
    held = sum(r.holds for r in recs)
    ungated = sum(r.note.startswith(NOT_GATED) for r in recs)
    out = [f"**{held} of {len(recs)} claims hold** (profile {', '.join(profiles) or '-'}, "
           f"seed {', '.join(map(str, seeds)) or '-'}). In `smoke` claims are recorded, not "
           f"enforced: the tiny settings are for testing the code, not the papers. "
           f"{ungated} claim(s) are measured but not gated, because their chapter explains why "
           f"they are not expected to show at this scale.\n"]
    for ch in failed_chapters:
        out.append(f"- chapter {ch} failed to run; its table may be incomplete.")
    chapters: dict[str, list[Record]] = {}
    for r in recs:
        chapters.setdefault(r.chapter, []).append(r)
    out.append("\n| chapter | claims | hold |\n|---|---|---|")
    for ch, rs in chapters.items():
        out.append(f"| {titles.get(ch, 'Chapter ' + ch)} | {len(rs)} | {sum(r.holds for r in rs)} |")
    for ch, rs in chapters.items():
        out.append(f"\n## {titles.get(ch, 'Chapter ' + ch)}\n")
        out.append("| claim | measured | test | verdict | paper | note |")
        out.append("|---|---|---|---|---|---|")
        for r in rs:
            cells = [r.claim, _fmt(r.measured), f"{r.comparison} {_fmt(r.threshold)}",
                     ("✓ holds" if r.holds else "✗ fails")
                     + (" (not gated)" if r.note.startswith(NOT_GATED) else ""), r.paper or "", r.note]
            out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")
                                         for c in cells) + " |")
    return "\n".join(out) + "\n"
