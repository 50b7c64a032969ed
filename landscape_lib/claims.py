"""Claims: a paper's statement in testable form, checked against what the chapter measured.

Each chapter calls :func:`start` once, :func:`check` (one measured number) or
:func:`check_seeds` (one value per seed, summarised by a statistic) for every claim, and
:func:`report` at the end. A check records

``chapter, claim, measured, comparison, threshold, holds, gated, paper, note, reason, profile,
seed, stand_in, statistic, seeds, values, interval``

(the keys of the run directory's ``claims.json``; the last four are set by :func:`check_seeds`).
Records are written to disk as soon as they are made (when the runner sets
``LANDSCAPE_CLAIMS_DIR``), so a chapter that fails later still shows what it measured on the
scoreboard. In the ``cpu`` and ``gpu`` profiles :func:`report` ends the chapter with
:class:`ClaimsFailed` if any gated claim does not hold; in ``smoke`` (tiny settings, for CI) and
on stand-in data (:func:`stand_in`) claims are recorded but not enforced.

Comparisons: ``>``, ``>=``, ``<``, ``<=`` against a number, and ``in`` against a closed
interval ``(low, high)``. A claim the chapter does not expect to show at its scale is checked
with ``gate=False`` and a one-sentence ``reason``: recorded with its true verdict and
``gated: false``, never enforced.

**Claims over seeds.** A gated claim must hold for any seed base, so a method comparison rests
on several seeds, summarised by a statistic that is robust for their number
(:func:`check_seeds`):

* ``"mean"`` — the mean over seeds is compared with the threshold;
* ``"bound"`` — the end of the two-sided ``level`` Student-t interval of the mean on the
  threshold's side (the lower end for ``>``/``>=``, the upper end for ``<``/``<=``; both ends
  for ``in``) is compared: the effect clears the threshold with its seed-to-seed spread;
* ``"fraction"`` — the fraction of seeds whose value passes the comparison must be at least
  ``fraction``;
* ``"sign"`` — a one-sided sign test: the p-value of seeing at least as many seeds pass the
  comparison if each passed with probability ½ must be at most ``alpha`` (with 5 seeds all
  passing, p = 1/32).

The record keeps the per-seed values and the interval, and the tables show the spread.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import check_profile

COMPARISONS = (">", ">=", "<", "<=", "in")
STATISTICS = ("mean", "bound", "fraction", "sign")
KEYS = ("chapter", "claim", "measured", "comparison", "threshold", "holds", "gated", "paper",
        "note", "reason", "profile", "seed", "stand_in", "statistic", "seeds", "values", "interval")


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
    gated: bool
    paper: str | None
    note: str
    reason: str
    profile: str
    seed: int
    stand_in: bool = False
    statistic: str | None = None
    seeds: list | None = None
    values: list | None = None
    interval: list | None = None

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
    stand_in: bool = False


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
    _current.stand_in = stand_in()
    _current.records = []
    path = _path()
    if path is not None and path.exists():
        path.unlink()


def stand_in() -> bool:
    """Whether the chapters run on stand-in data (``run --stand-in-data``, ``LANDSCAPE_STAND_IN=1``):
    their claims are recorded, marked, and never enforced."""
    return os.environ.get("LANDSCAPE_STAND_IN", "0") not in ("", "0", "false", "False")


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


def _threshold(comparison: str, threshold) -> Any:
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}; valid comparisons: "
                         f"{', '.join(COMPARISONS)}")
    if comparison == "in":
        if not (isinstance(threshold, Sequence) and len(threshold) == 2):
            raise ValueError("comparison 'in' needs threshold=(low, high)")
        thr: Any = [_number(threshold[0], "threshold"), _number(threshold[1], "threshold")]
        if thr[0] > thr[1]:
            raise ValueError(f"interval threshold has low > high: {thr}")
        return thr
    return _number(threshold, "threshold")


def _record(claim, value, comparison, thr, holds, gate, paper, note, reason, **extra) -> Record:
    if _current.chapter is None:
        raise RuntimeError("call claims.start(chapter, profile, seed) before claims.check")
    if not claim:
        raise ValueError("a claim needs a name")
    rec = Record(_current.chapter, claim, value, comparison, thr, holds, bool(gate), paper, note,
                 reason or "", _current.profile, _current.seed, _current.stand_in, **extra)
    _current.records = [r for r in _current.records if r.claim != claim] + [rec]
    _write()
    return rec


def check(claim: str, measured: float, comparison: str, threshold, *,
          paper: str | None = None, note: str = "", gate: bool = True,
          reason: str = "") -> Record:
    """Record ``claim``: does ``measured <comparison> threshold`` hold?

    ``paper`` is the paper's own number or finding, for the table; ``note`` says what was
    measured and how (seeds, scale). ``gate=False`` records a claim that is *not expected* to
    show at this scale, with ``reason`` saying why in one sentence: it is measured and shown on
    the scoreboard with its true verdict, but :func:`report` does not fail the chapter on it.
    """
    if _current.chapter is None:
        raise RuntimeError("call claims.start(chapter, profile, seed) before claims.check")
    value = _number(measured, "measured")
    thr = _threshold(comparison, threshold)
    return _record(claim, value, comparison, thr, compare(value, comparison, thr), gate, paper,
                   note, reason)


def t_interval(values: Sequence[float], level: float = 0.9) -> tuple[float, float, float]:
    """Mean and two-sided ``level`` Student-t interval of the mean: ``(mean, low, high)``.

    With one value the interval is ``(−inf, inf)``: one seed says nothing about the spread.
    """
    from scipy import stats

    x = [float(v) for v in values]
    if not x:
        raise ValueError("no values")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = len(x)
    mean = sum(x) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def sign_test(passes: int, n: int) -> float:
    """One-sided sign test: ``P(X ≥ passes)`` for ``X ~ Binomial(n, ½)``."""
    if not 0 <= passes <= n:
        raise ValueError(f"need 0 <= passes <= n, got passes={passes}, n={n}")
    return sum(math.comb(n, k) for k in range(passes, n + 1)) / 2 ** n


def check_seeds(claim: str, values, comparison: str, threshold, *, seeds=None,
                statistic: str = "mean", level: float = 0.9, fraction: float = 1.0,
                alpha: float = 0.05, paper: str | None = None, note: str = "",
                gate: bool = True, reason: str = "") -> Record:
    """Record a claim measured once per seed (see the module docstring for ``statistic``).

    ``values`` is a dict ``{seed: value}`` or a sequence (then ``seeds`` names the seeds, or
    they are numbered from the chapter's seed). The record's ``measured`` is the statistic: the
    mean, the interval bound, the fraction of passing seeds (gated ``>= fraction``) or the sign
    test's p-value (gated ``<= alpha``); ``values``, ``seeds`` and ``interval`` (the ``level``
    t-interval of the mean) are kept in the record.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid statistics: {', '.join(STATISTICS)}")
    if isinstance(values, Mapping):
        seeds, vals = list(values), list(values.values())
    else:
        vals = list(values)
        seeds = list(seeds) if seeds is not None else [_current.seed + i for i in range(len(vals))]
    if not vals:
        raise ValueError(f"claim {claim!r}: no per-seed values")
    if len(seeds) != len(vals):
        raise ValueError(f"{len(seeds)} seeds but {len(vals)} values")
    vals = [_number(v, "per-seed value") for v in vals]
    thr = _threshold(comparison, threshold)
    mean, lo, hi = t_interval(vals, level)
    extra = dict(statistic=statistic, seeds=[int(s) for s in seeds], values=vals, interval=[lo, hi])
    per_seed = f"per-seed test {comparison} {_fmt(thr)}"
    if statistic == "mean":
        return _record(claim, mean, comparison, thr, compare(mean, comparison, thr), gate, paper,
                       note, reason, **extra)
    if statistic == "bound":
        if comparison in (">", ">="):
            value, holds = lo, compare(lo, comparison, thr)
        elif comparison in ("<", "<="):
            value, holds = hi, compare(hi, comparison, thr)
        else:
            value, holds = mean, compare(lo, "in", thr) and compare(hi, "in", thr)
        return _record(claim, value, comparison, thr, holds, gate, paper, note, reason, **extra)
    passes = sum(compare(v, comparison, thr) for v in vals)
    note = f"{per_seed}; {note}" if note else per_seed
    if statistic == "fraction":
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        share = passes / len(vals)
        return _record(claim, share, ">=", float(fraction), share >= fraction, gate, paper, note,
                       reason, **extra)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    p = sign_test(passes, len(vals))
    return _record(claim, p, "<=", float(alpha), p <= alpha, gate, paper, note, reason, **extra)


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


def spread(r: Record) -> str:
    """The per-seed values and interval of a :func:`check_seeds` record, as one line."""
    if r.values is None:
        return ""
    lo, hi = r.interval
    per = ", ".join(f"{s}: {_fmt(v)}" for s, v in zip(r.seeds, r.values))
    ci = "" if not (math.isfinite(lo) and math.isfinite(hi)) else f" interval [{_fmt(lo)}, {_fmt(hi)}];"
    return f"{r.statistic};{ci} seeds {per}"


def verdict(r: Record) -> str:
    """"✓ holds" or "✗ fails", with "(not gated)" for a claim recorded but not enforced."""
    return ("✓ holds" if r.holds else "✗ fails") + ("" if r.gated else " (not gated)")


NUM_CELL = ' class="num"'


def table_html(recs: Sequence[Record] | None = None) -> str:
    """The claims as an HTML table (measured, test, margin, verdict, seeds, paper, note), in the
    same scrolling container and style as ``viz.table``; the verdict is coloured."""
    recs = records() if recs is None else recs
    num = {1, 3}  # measured, margin: right-aligned
    rows = []
    for r in recs:
        note = r.note if r.gated or not r.reason else f"not gated: {r.reason} {r.note}".strip()
        cells = [html.escape(str(c)) for c in (
            r.claim, _fmt(r.measured), f"{r.comparison} {_fmt(r.threshold)}", _fmt(r.margin))]
        cells.append(_verdict_html(r))
        cells += [html.escape(str(c)) for c in (spread(r), r.paper or "", note)]
        rows.append("<tr>" + "".join(f"<td{NUM_CELL if i in num else ''}>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("claim", "measured", "test", "margin", "verdict",
                                              "seeds", "paper", "note"))
    return (f'<div class="table-scroll"><table class="claims-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def report() -> list[Record]:
    """Show this chapter's claims; in ``cpu``/``gpu`` raise :class:`ClaimsFailed` if any fail."""
    recs = records()
    try:
        from IPython.display import HTML, display

        display(HTML(table_html(recs)))
    except ImportError:  # pragma: no cover
        for r in recs:
            print(r)
    failed = [r for r in recs if not r.holds and r.gated]
    if failed and _current.profile != "smoke" and not _current.stand_in:
        lines = "; ".join(f"{r.claim}: measured {_fmt(r.measured)}, needed {r.comparison} "
                          f"{_fmt(r.threshold)}" for r in failed)
        raise ClaimsFailed(f"{len(failed)} of {len(recs)} claims of chapter {_current.chapter} "
                           f"do not hold in profile {_current.profile!r}: {lines}")
    return recs


# --- the book's scoreboard -------------------------------------------------------------------

def load(path: str | Path) -> list[Record]:
    """Read a ``claims.json`` (or one chapter's file); files written before the ``gated``,
    ``reason`` and per-seed keys existed read as gated unless their note says otherwise."""
    data = json.loads(Path(path).read_text())
    out = []
    for d in data:
        d = dict(d)
        if "gated" not in d:
            d["gated"] = not str(d.get("note", "")).startswith(NOT_GATED)
        d.setdefault("reason", "")
        d.setdefault("stand_in", False)
        out.append(Record(**{k: d.get(k) for k in KEYS}))
    return out


def save(recs: Sequence[Record], path: str | Path) -> None:
    """Write records as a ``claims.json`` list with the keys of :data:`KEYS`."""
    Path(path).write_text(json.dumps([asdict(r) for r in recs], indent=1))


def _cell(c: str) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _verdict_html(r: Record) -> str:
    cls = "claim-holds" if r.holds else "claim-fails"
    return f'<span class="{cls}">{verdict(r)}</span>'


def _result(r: Record | None) -> str:
    """One run's result of a claim for the scoreboard: verdict and measured value."""
    if r is None:
        return "–"
    return f"{_verdict_html(r)} {_fmt(r.measured)}"


def seeds_summary(by_seed: dict[int, Sequence[Record]]) -> list[dict]:
    """Per claim over the runs of several seed bases: on how many it held, the mean and range of
    the measured value, and whether it holds on the first seed base but not on every one."""
    base = next(iter(by_seed))
    order: dict[tuple[str, str], dict] = {}
    for seed, recs in by_seed.items():
        for r in recs:
            row = order.setdefault((r.chapter, r.claim), {"chapter": r.chapter, "claim": r.claim,
                                                          "gated": r.gated, "results": {}})
            row["results"][seed] = r
    out = []
    for row in order.values():
        res = row["results"]
        vals = [r.measured for r in res.values() if not math.isnan(r.measured)]
        held = sum(r.holds for r in res.values())
        out.append({**row, "seeds": list(res), "held": held, "n": len(res),
                    "mean": sum(vals) / len(vals) if vals else math.nan,
                    "low": min(vals) if vals else math.nan, "high": max(vals) if vals else math.nan,
                    "flag": bool(base in res and res[base].holds and held < len(by_seed)),
                    "missing": [s for s in by_seed if s not in res]})
    return out


def _seeds_cell(row: dict, n_seeds: int) -> str:
    mark = " ⚠" if row["flag"] else ""
    failing = [s for s, r in row["results"].items() if not r.holds]
    where = f"; fails on seed {', '.join(map(str, failing))}" if failing else ""
    missing = f"; not run on seed {', '.join(map(str, row['missing']))}" if row["missing"] else ""
    return (f"{row['held']}/{n_seeds}{mark} (mean {_fmt(row['mean'])}, range {_fmt(row['low'])}"
            f" to {_fmt(row['high'])}{where}{missing})")


def seeds_markdown(by_seed: dict[int, Sequence[Record]], titles: dict[str, str] | None = None) -> str:
    """A table of every claim over several seed bases (``python -m landscape_lib claims --seeds``)."""
    titles = titles or {}
    rows = seeds_summary(by_seed)
    seeds = list(by_seed)
    flagged = sum(r["flag"] for r in rows)
    out = [f"\n**Over seed bases {', '.join(map(str, seeds))}:** "
           f"{sum(r['held'] == len(seeds) for r in rows)} of {len(rows)} claims hold on every seed "
           f"base; {flagged} hold on seed {seeds[0]} but not on every one (marked ⚠).\n",
           "| chapter | claim | gated | held | mean | range |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(c) for c in (
            titles.get(r["chapter"], r["chapter"]), r["claim"], "yes" if r["gated"] else "no",
            f"{r['held']}/{len(seeds)}" + (" ⚠" if r["flag"] else ""), _fmt(r["mean"]),
            f"{_fmt(r['low'])} to {_fmt(r['high'])}")) + " |")
    return "\n".join(out) + "\n"


def scoreboard_markdown(recs: Sequence[Record], titles: dict[str, str] | None = None,
                        failed_chapters: Sequence[str] = (), *,
                        others: dict[str, Sequence[Record]] | None = None,
                        seeds: dict[int, Sequence[Record]] | None = None,
                        links: dict[str, str] | None = None) -> str:
    """The scoreboard page: a summary, then one table per chapter.

    ``recs`` is the run the book was built from; ``others`` maps a label (e.g. ``"gpu, seed 0"``,
    ``"gpu stand-in, seed 0"``) to another run's records, shown as a column beside it; ``seeds``
    maps seed bases to runs of the same profile, summarised per claim (held on how many, mean and
    range; ⚠ where a claim holds on the first base but not on all). ``links`` maps a chapter number
    to its page, so that chapter titles link to the chapter and claims to its Reproduction section.
    """
    titles, others, links = titles or {}, dict(others or {}), links or {}
    seeds = dict(seeds or {})
    if len(seeds) < 2:
        seeds = {}
    if not recs and not failed_chapters and not others:
        return "No claims recorded yet: run `python -m landscape_lib run` first.\n"
    profiles = sorted({r.profile for r in recs})
    base_seeds = sorted({r.seed for r in recs})
    main = f"{', '.join(profiles) or '-'}, seed {', '.join(map(str, base_seeds)) or '-'}"
    held = sum(r.holds for r in recs)
    gated = [r for r in recs if r.gated]
    out = [f"**{held} of {len(recs)} claims hold** in this build ({main}); "
           f"{sum(r.holds for r in gated)} of {len(gated)} gated claims hold, and "
           f"{len(recs) - len(gated)} claim(s) are measured but not gated. A gated claim "
           f"measures the paper's quantity and is enforced: its chapter fails if it does not hold. "
           f"A claim marked *not gated* is measured and shown with its true verdict but not "
           f"enforced, because its chapter explains (in one sentence, in the note) why it is not "
           f"expected to show at this scale. In `smoke` nothing is enforced: the tiny settings "
           f"test the code, not the papers."]
    if others:
        out.append(f"Beside it: {'; '.join(others)}. Runs on *stand-in* data (random images of "
                   f"CIFAR's shapes) exercise the `gpu` code paths only; their claims mean "
                   f"nothing about the papers and are never enforced.")
    if seeds:
        flagged = sum(r["flag"] for r in seeds_summary(seeds))
        out.append(f"The **seeds** column counts on how many of the seed bases "
                   f"{', '.join(map(str, seeds))} each claim held ({flagged} claim(s) hold on "
                   f"seed {next(iter(seeds))} but not on every base: ⚠).")
    out.append("")
    for ch in failed_chapters:
        out.append(f"- chapter {ch} failed to run; its table may be incomplete.")
    by_ch: dict[str, list[Record]] = {}
    for r in recs:
        by_ch.setdefault(r.chapter, []).append(r)
    for rs in others.values():
        for r in rs:
            by_ch.setdefault(r.chapter, [])

    def title(ch: str) -> str:
        t = titles.get(ch, "Chapter " + ch)
        return f"[{t}]({links[ch]})" if ch in links else t

    out.append("\n| chapter | claims | hold | gated claims that fail |\n|---|---|---|---|")
    for ch, rs in by_ch.items():
        bad = sum(1 for r in rs if r.gated and not r.holds)
        out.append(f"| {title(ch)} | {len(rs)} | {sum(r.holds for r in rs)} | "
                   + (f'<span class="claim-fails">{bad}</span>' if bad else "0") + " |")
    seed_rows = {(r["chapter"], r["claim"]): r for r in seeds_summary(seeds)} if seeds else {}
    for ch, rs in by_ch.items():
        out.append(f"\n## {title(ch)}\n")
        head = ["claim", "test", main] + list(others) + (["seeds"] if seeds else []) + ["paper", "note"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        other_idx = {label: {r.claim: r for r in orecs if r.chapter == ch}
                     for label, orecs in others.items()}
        claims_here = [r.claim for r in rs] + [c for idx in other_idx.values() for c in idx
                                                if c not in {r.claim for r in rs}]
        mine = {r.claim: r for r in rs}
        for claim in dict.fromkeys(claims_here):
            r = mine.get(claim) or next(idx[claim] for idx in other_idx.values() if claim in idx)
            name = f"[{claim}]({links[ch]}#reproduction)" if ch in links else claim
            note = r.note if r.gated or not r.reason else f"not gated: {r.reason} {r.note}".strip()
            extra = spread(r) if r.values is not None else ""
            cells = [name, f"{r.comparison} {_fmt(r.threshold)}", _result(mine.get(claim))]
            cells += [_result(idx.get(claim)) for idx in other_idx.values()]
            if seeds:
                row = seed_rows.get((ch, claim))
                cells.append(_seeds_cell(row, len(seeds)) if row else "–")
            cells += [r.paper or "", "; ".join(x for x in (note, extra) if x)]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"
