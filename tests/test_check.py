"""`python -m landscape_lib check`: a chapter that follows the template passes; breaking any one
rule fails with the chapter and the rule named. The good chapter is a copy of a real one (06) in a
throw-away book, with two graded exercises added."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from landscape_lib import check, runner

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "book" / "part2-averaging" / "06-swa.ipynb"


def _graded(n):
    sol = {"cell_type": "code", "execution_count": None, "outputs": [], "source": [
        "answer = None\n", "### BEGIN SOLUTION\n", "answer = 42\n", "### END SOLUTION\n"],
        "metadata": {"nbgrader": {"grade": False, "grade_id": f"ex{n}-solution", "locked": False,
                                  "schema_version": 3, "solution": True, "task": False}}}
    chk = {"cell_type": "code", "execution_count": None, "outputs": [], "source": ["assert answer == 42\n"],
           "metadata": {"nbgrader": {"grade": True, "grade_id": f"ex{n}-check", "locked": True, "points": 1,
                                     "schema_version": 3, "solution": False, "task": False}}}
    return [sol, chk]


@pytest.fixture
def good(tmp_path):
    (tmp_path / "book" / "part").mkdir(parents=True)
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n- file: book/part/06-swa\n")
    (tmp_path / "book" / "intro.md").write_text("# intro\n")
    nb = json.loads(SOURCE.read_text())
    last = len(nb["cells"]) - 1  # the provenance cell stays last
    nb["cells"][last:last] = _graded(1) + _graded(2)
    path = tmp_path / "book" / "part" / "06-swa.ipynb"
    # the badge and install cell point at the copy's path, as `sync` would write them
    text = json.dumps(nb).replace("book/part2-averaging/06-swa.ipynb", "book/part/06-swa.ipynb")
    path.write_text(text)
    return tmp_path, path


def _problems(root):
    return [(p.where, p.rule) for p in check.run_checks(root=root)]


def test_the_good_chapter_passes(good):
    root, _ = good
    assert _problems(root) == []


def _edit(path, fn):
    nb = json.loads(path.read_text())
    fn(nb["cells"])
    path.write_text(json.dumps(nb))


def _src(c):
    return "".join(c["source"])


def _set(c, text):
    c["source"] = text.splitlines(keepends=True)


def _where(cells, needle):
    return next(c for c in cells if needle in _src(c))


BREAKS = {
    "title": lambda cells: _set(cells[0], _src(cells[0]).replace("# 6. ", "# Six. ", 1)),
    "colab": lambda cells: _set(cells[0], _src(cells[0]).replace("Open In Colab", "Open in Kaggle")),
    "parameters": lambda cells: _set(_where(cells, 'PROFILE = "cpu"'), 'PROFILE = "cpu"\nSEED = 0\n'),
    "config": lambda cells: [_set(c, _src(c).replace("ch(smoke=", "dict(smoke=")) for c in cells],
    "slider": lambda cells: [_set(c, _src(c).replace("viz.slider_figure(", "viz.line_figure(")) for c in cells],
    "live-widgets": lambda cells: cells.insert(5, {"cell_type": "code", "execution_count": None, "metadata": {},
                                                   "outputs": [], "source": ["viz.interact(print, x=1)\n"]}),
    "claims": lambda cells: [_set(c, re.sub(r"claims\.check(_seeds)?\(", "print(", _src(c))) for c in cells],
    "reproduction": lambda cells: [_set(c, _src(c).replace("## Reproduction", "## Results")) for c in cells],
    "summary": lambda cells: [_set(c, _src(c).replace("## Summary", "## Recap")) for c in cells],
    "exercises": lambda cells: [c["metadata"].pop("nbgrader", None) for c in cells],
    "provenance": lambda cells: cells.pop(),
    "outputs": lambda cells: _where(cells, "claims.report()").update(
        outputs=[{"output_type": "stream", "name": "stdout", "text": ["x\n"]}], execution_count=3),
}


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_each_broken_rule_is_named(good, rule):
    root, path = good
    _edit(path, BREAKS[rule])
    assert (("06-swa", rule) in _problems(root)), _problems(root)
    assert set(BREAKS) == set(check.CHAPTER_RULES)


def test_one_graded_exercise_is_not_enough(good):
    root, path = good

    def keep_one(cells):
        graded = [c for c in cells if c["metadata"].get("nbgrader", {}).get("grade")]
        for c in graded[1:]:
            c["metadata"].pop("nbgrader")
    _edit(path, keep_one)
    assert ("06-swa", "exercises") in _problems(root)


@pytest.mark.parametrize("chapter", [c.slug for c in runner.chapters(ROOT)])
def test_every_chapter_of_the_book_passes_the_template_check(chapter):
    problems = [(p.where, p.rule, p.message) for p in check.run_checks([chapter[:2]], root=ROOT)]
    assert problems == [], problems


def test_every_chapter_of_the_book_has_two_graded_exercises_with_checks_after_solutions():
    for ch in runner.chapters(ROOT):
        cells = json.loads(ch.path.read_text())["cells"]
        meta = [c.get("metadata", {}).get("nbgrader", {}) for c in cells]
        solutions = [i for i, m in enumerate(meta) if m.get("solution")]
        grades = [i for i, m in enumerate(meta) if m.get("grade")]
        assert len(solutions) >= 2 and len(grades) >= 2, ch.slug
        for i in solutions:  # each solution cell is followed by its self-check
            assert i + 1 in grades, (ch.slug, i)
        for i in grades:
            assert meta[i].get("points", 0) > 0 and meta[i].get("locked") is True, (ch.slug, i)
            assert "assert" in "".join(cells[i]["source"]), (ch.slug, i)
        ids = [m["grade_id"] for m in meta if m]
        assert len(ids) == len(set(ids)), (ch.slug, ids)


def test_the_exercise_dropdown_is_required_too(good):
    root, path = good
    _edit(path, lambda cells: [_set(c, _src(c).replace(":class: dropdown", ":class: tip")) for c in cells])
    assert ("06-swa", "exercises") in _problems(root)


def test_torch_load_without_weights_only_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "ok.py").write_text("import torch\nx = torch.load('f', weights_only=True)\n")
    (pkg / "sub" / "bad.py").write_text("import torch\n\n\ny = torch.load('f')\n"
                                        "z = torch.load('f', weights_only=False)\n")
    found = [(p.where, p.rule) for p in check.check_library(pkg)]
    assert found == [("pkg/sub/bad.py:4", "torch-load"), ("pkg/sub/bad.py:5", "torch-load")]
    assert check.check_library(ROOT / "landscape_lib") == []


def test_the_command_line_reports_and_fails(good):
    root, path = good
    proc = subprocess.run([sys.executable, "-m", "landscape_lib", "check"], cwd=root, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "no problems" in proc.stdout, proc.stdout + proc.stderr
    _edit(path, BREAKS["summary"])
    proc = subprocess.run([sys.executable, "-m", "landscape_lib", "check"], cwd=root, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "06-swa: summary: no '## Summary' section" in proc.stdout
