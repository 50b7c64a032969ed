import json
import math

import pytest

from landscape_lib import claims


@pytest.fixture
def chapter(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_CLAIMS_DIR", str(tmp_path))
    claims.start("99", "cpu", 4)
    return tmp_path


@pytest.mark.parametrize("m,op,t,holds", [
    (1.0, ">", 0.5, True), (0.5, ">", 0.5, False), (0.5, ">=", 0.5, True),
    (0.1, "<", 0.2, True), (0.2, "<=", 0.2, True), (0.3, "<=", 0.2, False),
    (0.5, "in", (0.0, 1.0), True), (1.5, "in", (0.0, 1.0), False), (math.nan, "<", 1.0, False),
])
def test_compare(m, op, t, holds):
    assert claims.compare(m, op, t) is holds


def test_records_are_written_at_once_with_the_documented_keys(chapter):
    rec = claims.check("C1 something", 0.3, "<", 0.5, paper="0.1", note="2 seeds")
    assert rec.holds and rec.margin == pytest.approx(0.2)
    data = json.loads((chapter / "99.json").read_text())
    assert list(data[0]) == list(claims.KEYS)
    assert data[0]["chapter"] == "99" and data[0]["profile"] == "cpu" and data[0]["seed"] == 4
    claims.check("C2 interval", 2.0, "in", (1, 3))
    claims.check("C1 something", 0.7, "<", 0.5)  # re-checking a claim replaces it
    data = json.loads((chapter / "99.json").read_text())
    assert [d["claim"] for d in data] == ["C2 interval", "C1 something"] and not data[1]["holds"]


def test_report_enforces_in_cpu_and_gpu_only(chapter, monkeypatch):
    claims.check("holds", 1.0, ">", 0.0)
    claims.check("fails", 1.0, "<", 0.0)
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    with pytest.raises(claims.ClaimsFailed, match="1 of 2 claims of chapter 99 do not hold"):
        claims.report()
    # the failing record was still written
    assert len(json.loads((chapter / "99.json").read_text())) == 2
    claims.start("99", "smoke", 0)
    claims.check("fails", 1.0, "<", 0.0)
    assert len(claims.report()) == 1  # recorded, not enforced


def test_start_clears_the_chapter(chapter):
    claims.check("a", 1, ">", 0)
    claims.start("99", "cpu", 4)
    assert claims.records() == [] and not (chapter / "99.json").exists()


@pytest.mark.parametrize("call,match", [
    (lambda: claims.check("x", 1.0, "~", 1.0), "valid comparisons: >, >=, <, <=, in"),
    (lambda: claims.check("x", 1.0, "in", 1.0), r"threshold=\(low, high\)"),
    (lambda: claims.check("x", 1.0, "in", (2, 1)), "low > high"),
    (lambda: claims.check("x", "big", ">", 1.0), "must be a number"),
    (lambda: claims.check("", 1.0, ">", 1.0), "needs a name"),
    (lambda: claims.start("01", "laptop", 0), "valid profiles"),
])
def test_bad_checks(chapter, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_table_and_scoreboard(chapter):
    a = claims.check("good | one", 1.0, ">", 0.0, paper="p")
    b = claims.check("bad", 1.0, "<", 0.0)
    html = claims.table_html([a, b])
    assert "✓ holds" in html and "✗ does not hold" in html and "good | one" in html
    md = claims.scoreboard_markdown([a, b], {"99": "99. A chapter"}, failed_chapters=["98-x"])
    assert "**1 of 2 claims hold**" in md and "## 99. A chapter" in md and "good \\| one" in md
    assert "98-x failed" in md and "| 99. A chapter | 2 | 1 |" in md
    path = chapter / "claims.json"
    claims.save([a, b], path)
    assert claims.load(path) == [a, b]


def test_ungated_claims_are_recorded_with_their_verdict_but_not_enforced(chapter, monkeypatch):
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    rec = claims.check("C9 only at paper scale", 0.1, ">", 0.5, note="needs CIFAR", gate=False)
    assert not rec.holds and rec.note == "not gated at this scale; needs CIFAR"
    claims.check("C1 holds", 1.0, ">", 0.0)
    assert len(claims.report()) == 2  # cpu profile, yet no ClaimsFailed
    data = json.loads((chapter / "99.json").read_text())
    assert data[0]["holds"] is False and data[0]["note"].startswith("not gated")
    claims.check("C2 gated and failing", 0.1, ">", 0.5)
    with pytest.raises(claims.ClaimsFailed, match="C2 gated and failing"):
        claims.report()
    md = claims.scoreboard_markdown(claims.records())
    assert "1 claim(s) are measured but not gated" in md
