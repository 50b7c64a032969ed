"""Coursework: student copies of the chapters and grading of submissions, the nbgrader way.

Every chapter ends with graded exercises in nbgrader's format: a **solution cell** (cell metadata
``nbgrader.solution = true``) whose solution lies between ``### BEGIN SOLUTION`` and
``### END SOLUTION``, then a **grade cell** (``nbgrader.grade = true``, ``points``) whose asserts
check the result against an independent criterion; a grade cell may hold hidden tests between
``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``. The instructor's copy is the chapter as it
is (the book shows it, the runner executes it, so the solutions are tested in every profile).
Teachers who use nbgrader run ``nbgrader generate_assignment`` on a chapter unchanged; everyone
else uses the two commands here.

* :func:`student` (``python -m landscape_lib student [CHAPTER ...] --out DIR``) writes student
  copies: solution regions replaced by ``# YOUR CODE HERE`` / ``raise NotImplementedError()``
  (``YOUR ANSWER HERE`` in Markdown), hidden tests and solution dropdowns removed, outputs
  stripped, the Colab install cell kept, plus a ``README.md`` for students — what nbgrader's
  release copy has in its solution regions.
* :func:`grade` (``python -m landscape_lib grade SUBMISSIONS --profile smoke --out grades.csv``)
  runs every submitted chapter through the runner (papermill in its own process, the profile's time
  limit, every cell run even after one fails, one failing submission never stopping the others),
  with each grade cell put back from the instructor's copy (hidden tests included, so a student
  cannot edit the checks), and writes one CSV row per student and exercise (points, passed,
  error) and a total per student. Cells outside the exercises that raised are listed too.
"""
from __future__ import annotations

import csv
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import check_profile
from .runner import (DEFAULT_TIMEOUT, Chapter, chapter_env, chapters, execute_file, find_root,
                     select)

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"
# a solution dropdown: ```{admonition} Solution …, :class: dropdown, up to its closing fence (the
# same number of backticks alone on a line)
DROPDOWN_RE = re.compile(r"^(`{3,})\{admonition\}[ \t]*Solution\b[^\n]*\n(?::[^\n]*\n)*?"
                         r"(?=(?::[^\n]*\n)*)[\s\S]*?^\1[ \t]*(?:\n|\Z)", re.M)
README = """# {title}: student copies

These notebooks are the chapters of the Loss Landscape Book with the solutions of the graded
exercises taken out. In each graded exercise, replace

    # YOUR CODE HERE
    raise NotImplementedError()

with your code, then run the self-check cell below it: its asserts test your answer against an
independent criterion (they pass only if the answer has the property asked for). Do not edit the
self-check cells: they are put back from the instructor's copy, with hidden tests, when your work
is graded. Run a chapter top to bottom (in Jupyter, or on Colab: the first cell installs the
library there); the `PROFILE` parameter at the top sets its scale (`smoke` is seconds, `cpu` about
a minute).

Chapters: {chapters}
"""


def _src(cell) -> str:
    s = cell.get("source", "")
    return s if isinstance(s, str) else "".join(s)


def _set(cell, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _replace_regions(text: str, begin: str, end: str, stub: str | None) -> str:
    """Replace every ``begin … end`` region (marker lines included) by ``stub`` (indented like the
    marker), or drop it when ``stub`` is None."""
    lines, out, inside = text.splitlines(keepends=True), [], False
    for line in lines:
        stripped = line.strip()
        if not inside and stripped == begin:
            inside = True
            if stub is not None:
                indent = line[:len(line) - len(line.lstrip())]
                out += [indent + s + "\n" for s in stub.splitlines()]
            continue
        if inside and stripped == end:
            inside = False
            continue
        if not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a '{begin}' region has no '{end}'")
    return "".join(out)


def student_notebook(nb: dict) -> dict:
    """The student copy of an instructor's notebook (a new dict)."""
    nb = json.loads(json.dumps(nb))
    cells = []
    for cell in nb["cells"]:
        text, meta = _src(cell), _nbgrader(cell)
        if meta.get("solution"):
            stub = CODE_STUB if cell["cell_type"] == "code" else TEXT_STUB
            if BEGIN_SOLUTION in text:
                text = _replace_regions(text, BEGIN_SOLUTION, END_SOLUTION, stub)
            else:  # nbgrader replaces a solution cell without markers whole
                text = stub + "\n"
        if BEGIN_HIDDEN in text:
            text = _replace_regions(text, BEGIN_HIDDEN, END_HIDDEN, None)
        if cell["cell_type"] == "markdown" and "{admonition}" in text:
            text = DROPDOWN_RE.sub("", text)
            if not text.strip():
                continue
        _set(cell, text)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    nb["cells"] = cells
    return nb


def student(wanted: Sequence[str] = (), out: str | Path = "student", root: Path | None = None) -> int:
    """Write student copies of the chapters ``wanted`` (all if empty) under ``out``."""
    import nbformat

    root = root or find_root()
    out = Path(out)
    todo = select(chapters(root), wanted)
    out.mkdir(parents=True, exist_ok=True)
    for ch in todo:
        nb = student_notebook(json.loads(ch.path.read_text()))
        nbformat.validate(nbformat.from_dict(nb))
        (out / ch.path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"  {ch.path.name}")
    import yaml

    title = yaml.safe_load((root / "_config.yml").read_text()).get("title", "The book")
    (out / "README.md").write_text(README.format(title=title,
                                                 chapters=", ".join(c.path.name for c in todo)))
    print(f"{len(todo)} student cop{'y' if len(todo) == 1 else 'ies'} and README.md in {out}")
    return 0


# --- the course page's table -------------------------------------------------------------------

TABLE_MARKER = "<!-- GRADED EXERCISES TABLE -->"


def exercise_table(root: Path, cpu_run: Path | None = None) -> str:
    """A Markdown table of every chapter's graded exercises (their self-check ids and points), its
    other exercises and its wall time in the ``cpu`` run ``cpu_run`` (when that run has it)."""
    from .runner import chapter_title

    rows = ["| chapter | graded exercises (points) | other exercises | cpu time |",
            "|---|---|---|---|"]
    for ch in chapters(root):
        nb = json.loads(ch.path.read_text())
        checks = [(_nbgrader(c).get("grade_id", "?"), _nbgrader(c).get("points", 0)) for c in nb["cells"]
                  if _nbgrader(c).get("grade")]
        dropdowns = sum(len(DROPDOWN_RE.findall(_src(c))) for c in nb["cells"] if c["cell_type"] == "markdown")
        seconds = "–"
        status = cpu_run / ".cache" / f"{ch.slug}.json" if cpu_run else None
        if status is not None and status.exists():
            st = json.loads(status.read_text())
            if st.get("status") == "ok":
                seconds = f"{st['seconds']:.0f} s"
        graded = ", ".join(f"{gid} ({pts:g})" for gid, pts in checks) or "none yet"
        link = ch.rel.relative_to("book").as_posix() if ch.rel.parts[0] == "book" else ch.rel.as_posix()
        rows.append(f"| [{chapter_title(ch.path)}]({link}) | {graded} | {dropdowns} | {seconds} |")
    return "\n".join(rows) + "\n"


# --- grading -----------------------------------------------------------------------------------

@dataclass
class Row:
    student: str
    notebook: str
    exercise: str
    points: float
    max_points: float
    passed: bool
    error: str


def _submissions(folder: Path, known: list[Chapter]) -> list[tuple[str, Path, Chapter | None]]:
    """``(student, notebook, chapter)`` for every ``.ipynb`` under ``folder``: the student is the
    first folder below ``folder`` (nbgrader's ``submitted/<student>/...``), or the notebook's
    name when it lies directly in ``folder``; the chapter is found by the notebook's name."""
    out = []
    for nb in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb.parts:
            continue
        rel = nb.relative_to(folder)
        who = rel.parts[0] if len(rel.parts) > 1 else nb.stem
        ch = next((c for c in known if c.path.name == nb.name), None)
        out.append((who, nb, ch))
    return out


def _error_of(cell) -> str | None:
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error":
            return f"{o.get('ename', 'Error')}: {o.get('evalue', '')}".strip()
    return None


def grade_notebook(executed: dict, student_name: str, notebook: str, max_points: dict) -> list[Row]:
    """Rows for one executed submission: one per grade cell (its error names the exercise's own
    solution cell when that raised, e.g. the stub's NotImplementedError), then one row for the
    other cells that raised."""
    rows, others, solution_errors = [], [], []
    added = ("injected-parameters", "papermill-error-cell-tag")  # papermill's, not the student's
    cells = [c for c in executed["cells"]
             if not any(t in c.get("metadata", {}).get("tags", []) for t in added)]
    for i, cell in enumerate(cells):
        meta = _nbgrader(cell)
        err = _error_of(cell) if cell.get("cell_type") == "code" else None
        if meta.get("grade"):
            gid = meta.get("grade_id", f"cell {i + 1}")
            pts = float(max_points.get(gid, meta.get("points", 0)))
            why = "; ".join(solution_errors + ([f"check: {err}"] if err else []))
            rows.append(Row(student_name, notebook, gid, 0.0 if err else pts, pts, err is None,
                            why if err else ""))
            solution_errors = []
        elif meta.get("solution") and err:
            solution_errors.append(f"solution cell {i + 1}: {err}")
        elif err:
            first = next((ln.strip() for ln in _src(cell).splitlines() if ln.strip()), "")
            others.append(f"cell {i + 1} ({first[:60]}): {err}")
    if others:
        rows.append(Row(student_name, notebook, "(other cells)", 0.0, 0.0, False, "; ".join(others)))
    return rows


def _instructor_checks(nb: dict, instructor: dict) -> tuple[dict, dict]:
    """The submission with every grade cell's source taken from the instructor's notebook (matched
    by ``grade_id``), and the points per grade cell."""
    theirs = {_nbgrader(c)["grade_id"]: c for c in instructor["cells"]
              if _nbgrader(c).get("grade") and "grade_id" in _nbgrader(c)}
    points = {gid: float(_nbgrader(c).get("points", 0)) for gid, c in theirs.items()}
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        gid = _nbgrader(cell).get("grade_id")
        if gid in theirs and _nbgrader(theirs[gid]).get("grade"):
            cell["source"] = list(theirs[gid]["source"])
            cell["metadata"]["nbgrader"] = dict(_nbgrader(theirs[gid]))
    return nb, points


def grade(submissions: str | Path, profile: str = "smoke", out: str | Path = "grades.csv",
          root: Path | None = None, timeout: float | None = None, progress: bool | None = None) -> int:
    """Grade every submitted chapter under ``submissions`` and write ``out`` (CSV); 0 unless the
    input is unusable (grading failures are results, not errors)."""
    from tqdm.auto import tqdm

    from .train import quiet

    check_profile(profile)
    root = root or find_root()
    folder = Path(submissions)
    if not folder.is_dir():
        raise SystemExit(f"no such directory: {folder}")
    known = chapters(root)
    subs = _submissions(folder, known)
    if not subs:
        raise SystemExit(f"no notebooks (.ipynb) under {folder}: put each student's submitted "
                         f"chapters in {folder}/<student>/")
    rows: list[Row] = []
    show = (not quiet()) if progress is None else progress
    for who, path, ch in tqdm(subs, desc="grading", disable=not show):
        if ch is None:
            valid = ", ".join(c.path.name for c in known)
            rows.append(Row(who, path.name, "(not graded)", 0.0, 0.0, False,
                            f"not a chapter of this book; valid notebook names: {valid}"))
            continue
        try:
            nb = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            rows.append(Row(who, path.name, "(not graded)", 0.0, 0.0, False, f"unreadable notebook: {exc}"))
            continue
        nb, points = _instructor_checks(nb, json.loads(ch.path.read_text()))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            src = work / ch.rel
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_text(json.dumps(nb))
            target = work / "executed" / ch.path.name
            target.parent.mkdir(parents=True)
            status = execute_file(src, target, profile, 0, "auto", work / "status.json",
                                  chapter_env(profile, work), timeout or DEFAULT_TIMEOUT[profile],
                                  allow_errors=True)
            if target.exists():
                got = grade_notebook(json.loads(target.read_text()), who, path.name, points)
                missing = [gid for gid in points if gid not in {r.exercise for r in got}]
                got += [Row(who, path.name, gid, 0.0, points[gid], False, "grade cell missing from the submission")
                        for gid in missing]
                if status["status"] != "ok" and status.get("cell") is None:
                    got.append(Row(who, path.name, "(run)", 0.0, 0.0, False, status.get("error", "")))
                rows += got
            else:
                rows += [Row(who, path.name, gid, 0.0, pts, False, f"did not run: {status.get('error', '')}")
                         for gid, pts in points.items()]
    totals: dict[str, list[float]] = {}
    for r in rows:
        t = totals.setdefault(r.student, [0.0, 0.0])
        t[0] += r.points
        t[1] += r.max_points
    out = Path(out)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "notebook", "exercise", "points", "max_points", "passed", "error"])
        for r in rows:
            w.writerow([r.student, r.notebook, r.exercise, f"{r.points:g}", f"{r.max_points:g}",
                        "yes" if r.passed else "no", r.error])
        for who, (got, total) in totals.items():
            w.writerow([who, "", "TOTAL", f"{got:g}", f"{total:g}", "", ""])
    print(f"graded {len(subs)} notebook(s) of {len(totals)} student(s) -> {out}")
    for who, (got, total) in totals.items():
        print(f"  {who}: {got:g} of {total:g} points")
    return 0

