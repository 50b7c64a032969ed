"""Student copies and grading on a throw-away book whose chapter has two graded exercises (one with
hidden tests) and a dropdown solution: `student` leaves no solution text; `grade` on three
submissions (the solution pasted back, the untouched copy, one that raises in an unrelated cell)
gives full points, zero with NotImplementedError named, and the failing cell named."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from landscape_lib import coursework, runner

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(runner.PACKAGE_DIR.parent)}

SOLUTION_1 = "total = sum(range(1, n + 1))"
SOLUTION_2 = "squares = [k * k for k in range(n)]"
HIDDEN = "assert squares[3] == 9  # a hidden test"


def _cell(kind, text, nbgrader=None, tags=None):
    c = nbformat.v4.new_code_cell(text) if kind == "code" else nbformat.v4.new_markdown_cell(text)
    if nbgrader:
        c.metadata["nbgrader"] = {"schema_version": 3, "task": False, "locked": False, **nbgrader}
    if tags:
        c.metadata["tags"] = tags
    return c


def _chapter():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        _cell("md", "# 1. A chapter\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](x)"),
        _cell("code", "import sys\nif 'google.colab' in sys.modules:\n    pass  # git+https://github.com/o/r.git@main",
              tags=["remove-cell"]),
        _cell("code", 'PROFILE = "cpu"\nSEED = 0\nDEVICE = "auto"', tags=["parameters"]),
        _cell("code", "n = 10"),
        _cell("md", "## Exercises\n\n1. Add up 1..n (graded).\n2. List the squares (graded).\n3. Think.\n\n"
                    "```{admonition} Solution 3\n:class: dropdown\nThe secret dropdown answer.\n```\n"),
        _cell("code", f"total = None\n### BEGIN SOLUTION\n{SOLUTION_1}\n### END SOLUTION",
              {"grade": False, "grade_id": "ex1-solution", "solution": True}),
        _cell("code", "assert total == n * (n + 1) // 2", {"grade": True, "grade_id": "ex1-check",
                                                           "solution": False, "points": 2, "locked": True}),
        _cell("code", f"squares = None\n### BEGIN SOLUTION\n{SOLUTION_2}\n### END SOLUTION",
              {"grade": False, "grade_id": "ex2-solution", "solution": True}),
        _cell("code", f"assert len(squares) == n\n### BEGIN HIDDEN TESTS\n{HIDDEN}\n### END HIDDEN TESTS",
              {"grade": True, "grade_id": "ex2-check", "solution": False, "points": 1, "locked": True}),
        _cell("code", "print('done')"),
    ]
    return nb


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    root = tmp_path_factory.mktemp("coursebook")
    (root / "book" / "part").mkdir(parents=True)
    (root / "_config.yml").write_text("title: A course book\nrepository:\n  url: https://github.com/o/r\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n- file: book/part/01-chapter\n")
    (root / "book" / "intro.md").write_text("# intro\n")
    nbformat.write(_chapter(), root / "book" / "part" / "01-chapter.ipynb")
    return root


def _cli(root, *args):
    return subprocess.run([sys.executable, "-m", "landscape_lib", *args], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=900)


def test_student_copies_hold_no_solution_text(book, tmp_path):
    proc = _cli(book, "student", "--out", str(tmp_path / "copies"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = tmp_path / "copies" / "01-chapter.ipynb"
    nbformat.validate(nbformat.read(copy, as_version=4))
    text = copy.read_text()
    for secret in (SOLUTION_1, SOLUTION_2, HIDDEN, "secret dropdown answer", "BEGIN SOLUTION", "HIDDEN TESTS"):
        assert secret not in text, secret
    cells = json.loads(text)["cells"]
    sol = [c for c in cells if c["metadata"].get("nbgrader", {}).get("solution")]
    assert ["".join(c["source"]) for c in sol] == [
        "total = None\n# YOUR CODE HERE\nraise NotImplementedError()\n",
        "squares = None\n# YOUR CODE HERE\nraise NotImplementedError()\n"]
    assert any("git+https://github.com/o/r.git@main" in "".join(c["source"]) for c in cells)  # install cell kept
    assert "# YOUR CODE HERE" in (tmp_path / "copies" / "README.md").read_text()
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")


def _submit(folder, student, nb):
    (folder / student).mkdir(parents=True)
    nbformat.write(nbformat.from_dict(nb), folder / student / "01-chapter.ipynb")


def test_grade_gives_points_names_the_errors_and_exits_zero(book, tmp_path):
    assert _cli(book, "student", "--out", str(tmp_path / "copies")).returncode == 0
    blank = json.loads((tmp_path / "copies" / "01-chapter.ipynb").read_text())
    subs = tmp_path / "submitted"
    _submit(subs, "ada", json.loads((book / "book/part/01-chapter.ipynb").read_text()))  # the solution
    _submit(subs, "bob", blank)                                                       # untouched
    broken = json.loads(json.dumps(json.loads((book / "book/part/01-chapter.ipynb").read_text())))
    broken["cells"][-1]["source"] = ["raise RuntimeError('an unrelated failure')\n"]
    # a student who weakened a check: it is put back from the instructor's copy
    broken["cells"][6]["source"] = ["pass\n"]
    _submit(subs, "cy", broken)
    (subs / "dee").mkdir()
    (subs / "dee" / "notes.ipynb").write_text(json.dumps(nbformat.v4.new_notebook()))
    proc = _cli(book, "grade", str(subs), "--profile", "smoke", "--out", str(tmp_path / "grades.csv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader((tmp_path / "grades.csv").open()))
    got = {(r["student"], r["exercise"]): r for r in rows}
    assert got[("ada", "ex1-check")]["points"] == "2" and got[("ada", "ex2-check")]["points"] == "1"
    assert got[("ada", "TOTAL")]["points"] == "3" and got[("ada", "TOTAL")]["max_points"] == "3"
    assert got[("bob", "TOTAL")]["points"] == "0"
    for ex in ("ex1-check", "ex2-check"):
        assert got[("bob", ex)]["passed"] == "no" and got[("bob", ex)]["points"] == "0"
        assert "NotImplementedError" in got[("bob", ex)]["error"]
        assert "check: " in got[("bob", ex)]["error"]
    assert got[("cy", "TOTAL")]["points"] == "3"
    assert "cell 10 (raise RuntimeError('an unrelated failure'))" in got[("cy", "(other cells)")]["error"]
    assert "not a chapter of this book; valid notebook names: 01-chapter.ipynb" in got[("dee", "(not graded)")]["error"]
    assert "ada: 3 of 3 points" in proc.stdout and "bob: 0 of 3 points" in proc.stdout


def test_grade_input_errors(book, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _cli(book, "grade", str(tmp_path / "empty"))
    assert proc.returncode != 0 and "no notebooks (.ipynb)" in proc.stderr
    proc = _cli(book, "grade", str(tmp_path / "nowhere"))
    assert proc.returncode != 0 and "no such directory" in proc.stderr


def test_unbalanced_solution_markers_are_an_error():
    nb = _chapter()
    nb.cells[5].source = "### BEGIN SOLUTION\nx = 1\n"
    with pytest.raises(ValueError, match="has no '### END SOLUTION'"):
        coursework.student_notebook(nb)


def _solution_lines(nb):
    """The lines of the solution regions that appear nowhere else in the instructor's notebook
    (a generic line such as ``with torch.no_grad():`` that the chapter also uses outside a
    solution is not solution text)."""
    out, outside = [], []
    for c in nb["cells"]:
        src = "".join(c["source"])
        while "### BEGIN SOLUTION" in src:
            before, rest = src.split("### BEGIN SOLUTION", 1)
            inner, _, src = rest.partition("### END SOLUTION")
            outside += before.splitlines()
            out += [ln.strip() for ln in inner.splitlines() if len(ln.strip()) > 12]
        outside += src.splitlines()
    elsewhere = {ln.strip() for ln in outside}
    return [ln for ln in out if ln not in elsewhere]


@pytest.mark.parametrize("ch", runner.chapters(ROOT), ids=lambda c: c.slug)
def test_student_copies_of_the_book_hold_no_instructor_solution(ch):
    nb = json.loads(ch.path.read_text())
    copy = coursework.student_notebook(nb)
    nbformat.validate(nbformat.from_dict(copy))
    text = json.dumps(copy)
    assert "### BEGIN SOLUTION" not in text and "### BEGIN HIDDEN TESTS" not in text
    leaked = [ln for ln in _solution_lines(nb) if json.dumps(ln)[1:-1] in text]
    assert not leaked, leaked
    assert ":class: dropdown" not in text


def test_the_course_page_table_lists_each_chapters_graded_exercises(book, tmp_path):
    from landscape_lib import book as book_mod

    (book / "book" / "course.md").write_text(f"# Course\n\n{coursework.TABLE_MARKER}\n")
    (book / "book" / "scoreboard.md").write_text("# s\n")
    cpu = book / "_build" / "runs" / "cpu-seed0" / ".cache"
    cpu.mkdir(parents=True, exist_ok=True)
    (cpu / "01-chapter.json").write_text(json.dumps({"status": "ok", "seconds": 41.6}))
    book_mod.stage(book, book / "_build" / "runs" / "cpu-seed0", tmp_path / "src", failed=[])
    page = (tmp_path / "src" / "book" / "course.md").read_text()
    assert "| [1. A chapter](part/01-chapter.ipynb) | ex1-check (2), ex2-check (1) | 1 | 42 s |" in page
    assert coursework.TABLE_MARKER not in page


def _nbgrader_release(tmp_path, nb_path):
    """``nbgrader generate_assignment`` on one notebook, in a fresh course directory."""
    course = tmp_path / "course"
    src = course / "source" / "week1"
    src.mkdir(parents=True)
    shutil.copy(nb_path, src / nb_path.name)
    (course / "nbgrader_config.py").write_text("c = get_config()\nc.CourseDirectory.root = %r\n" % str(course))
    proc = subprocess.run(["nbgrader", "generate_assignment", "week1", "--force", "--create"], cwd=course,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((course / "release" / "week1" / nb_path.name).read_text())


def _regions(nb):
    return ["".join(c["source"]).rstrip("\n") for c in nb["cells"]
            if c.get("metadata", {}).get("nbgrader", {}).get("solution")
            or c.get("metadata", {}).get("nbgrader", {}).get("grade")]


@pytest.mark.slow
def test_nbgrader_accepts_a_chapter_and_its_release_matches_student(book, tmp_path):
    if shutil.which("nbgrader") is None:
        pytest.fail("nbgrader is in requirements.txt (the test extra); install it")
    path = book / "book" / "part" / "01-chapter.ipynb"
    release = _nbgrader_release(tmp_path, path)
    mine = coursework.student_notebook(json.loads(path.read_text()))
    assert _regions(release) == _regions(mine)
    assert any("raise NotImplementedError()" in r for r in _regions(release))


@pytest.mark.slow
@pytest.mark.parametrize("number", ["02", "09"])  # 09: solutions indented inside functions
def test_nbgrader_accepts_a_real_chapter_unchanged(tmp_path, number):
    if shutil.which("nbgrader") is None:
        pytest.fail("nbgrader is in requirements.txt (the test extra); install it")
    ch = next(c for c in runner.chapters(ROOT) if c.number == number)
    release = _nbgrader_release(tmp_path, ch.path)
    mine = coursework.student_notebook(json.loads(ch.path.read_text()))
    assert _regions(release) == _regions(mine)
    assert sum("raise NotImplementedError()" in r for r in _regions(release)) >= 2
    assert "### BEGIN SOLUTION" not in json.dumps(release)
