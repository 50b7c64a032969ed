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
    assert "✓ holds" in html and "✗ fails" in html and "good | one" in html
    md = claims.scoreboard_markdown([a, b], {"99": "99. A chapter"}, failed_chapters=["98-x"])
    assert "**1 of 2 claims hold**" in md and "## 99. A chapter" in md and "good \\| one" in md
    assert "98-x failed" in md and "| 99. A chapter | 2 | 1 |" in md
    path = chapter / "claims.json"
    claims.save([a, b], path)
    assert claims.load(path) == [a, b]


def test_ungated_claims_are_recorded_with_their_verdict_but_not_enforced(chapter, monkeypatch):
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    rec = claims.check("C9 only at paper scale", 0.1, ">", 0.5, note="2 seeds", gate=False,
                       reason="needs CIFAR")
    assert not rec.holds and not rec.gated and rec.note == "2 seeds" and rec.reason == "needs CIFAR"
    claims.check("C1 holds", 1.0, ">", 0.0)
    assert len(claims.report()) == 2  # cpu profile, yet no ClaimsFailed
    data = json.loads((chapter / "99.json").read_text())
    assert data[0]["holds"] is False and data[0]["gated"] is False
    assert "not gated: needs CIFAR" in claims.table_html(claims.records())
    claims.check("C2 gated and failing", 0.1, ">", 0.5)
    with pytest.raises(claims.ClaimsFailed, match="C2 gated and failing"):
        claims.report()
    md = claims.scoreboard_markdown(claims.records())
    assert "1 claim(s) are measured but not gated" in md


@pytest.mark.parametrize("m,op,t,holds", [
    (0.2, "<", 0.2, False), (0.2, ">", 0.2, False), (0.2, ">=", 0.2, True),
    (0.0, "in", (0.0, 1.0), True), (1.0, "in", (0.0, 1.0), True), (1.0000001, "in", (0.0, 1.0), False),
    (math.nan, ">=", 0.0, False), (math.nan, "in", (-1, 1), False), (math.inf, ">", 1e300, True),
])
def test_compare_boundaries(m, op, t, holds):
    assert claims.compare(m, op, t) is holds


def test_t_interval_against_hand_values():
    # n = 2, level 0.9: t(0.95, 1) = 6.3138; sd of (1, 3) = sqrt(2), se = 1
    mean, lo, hi = claims.t_interval([1.0, 3.0], 0.9)
    assert mean == 2.0 and lo == pytest.approx(2 - 6.313752) and hi == pytest.approx(2 + 6.313752)
    # n = 5, level 0.95: t(0.975, 4) = 2.776445; values 1..5: sd = sqrt(2.5), se = sqrt(0.5)
    mean, lo, hi = claims.t_interval([1, 2, 3, 4, 5], 0.95)
    assert lo == pytest.approx(3 - 2.776445 * math.sqrt(0.5), rel=1e-6)
    assert claims.t_interval([4.0])[1:] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="level"):
        claims.t_interval([1, 2], 1.0)


def test_sign_test_hand_values():
    assert claims.sign_test(5, 5) == 1 / 32
    assert claims.sign_test(4, 5) == pytest.approx(6 / 32)
    assert claims.sign_test(0, 3) == 1.0
    with pytest.raises(ValueError, match="passes"):
        claims.sign_test(4, 3)


def test_check_seeds_statistics(chapter):
    vals = {0: 1.0, 1: 3.0, 2: 2.0}
    r = claims.check_seeds("mean gain", vals, ">", 1.5)
    assert r.measured == 2.0 and r.holds and r.values == [1.0, 3.0, 2.0] and r.seeds == [0, 1, 2]
    # sd 1, se 1/sqrt(3), t(0.95, 2) = 2.919986: lower end 2 − 1.6859 = 0.314
    r = claims.check_seeds("bounded gain", vals, ">", 0.3, statistic="bound")
    assert r.measured == pytest.approx(2 - 2.919986 / math.sqrt(3), rel=1e-6) and r.holds
    assert not claims.check_seeds("bounded gain", vals, ">", 0.32, statistic="bound").holds
    r = claims.check_seeds("bounded loss", vals, "<", 3.7, statistic="bound")
    assert r.measured == pytest.approx(2 + 2.919986 / math.sqrt(3), rel=1e-6) and r.holds
    r = claims.check_seeds("bounded in", vals, "in", (0.0, 3.5), statistic="bound")
    assert not r.holds  # the upper end 3.686 leaves the interval although the mean is inside
    r = claims.check_seeds("most seeds", [0.5, -0.1, 0.2, 0.3], ">", 0.0, statistic="fraction",
                           fraction=0.75)
    assert r.measured == 0.75 and r.holds and r.comparison == ">=" and "per-seed test > 0" in r.note
    assert r.seeds == [4, 5, 6, 7]  # numbered from the chapter's seed
    assert not claims.check_seeds("all seeds", [0.5, 0.0], ">", 0.0, statistic="fraction").holds
    r = claims.check_seeds("sign", [1, 2, 3, 4, 5], ">", 0.0, statistic="sign")
    assert r.measured == 1 / 32 and r.holds and r.comparison == "<="
    assert not claims.check_seeds("sign", [1, 2, 3], ">", 0.0, statistic="sign").holds  # p = 1/8
    assert "seeds 0: 1, 1: 3, 2: 2" in claims.spread(claims.check_seeds("m", vals, ">", 0))
    path = chapter / "c.json"
    claims.save(claims.records(), path)
    assert claims.load(path) == claims.records()


@pytest.mark.parametrize("kwargs,match", [
    (dict(values=[], comparison=">", threshold=0), "no per-seed values"),
    (dict(values=[1, 2], comparison=">", threshold=0, seeds=[1]), "2 values"),
    (dict(values=[1, 2], comparison=">", threshold=0, statistic="median"), "valid statistics"),
    (dict(values=[1, 2], comparison=">", threshold=0, statistic="fraction", fraction=0), "fraction"),
    (dict(values=[1, "x"], comparison=">", threshold=0), "must be a number"),
])
def test_check_seeds_bad_input(chapter, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        claims.check_seeds("x", **kwargs)


def test_old_claims_files_load_with_gated_from_the_note(tmp_path):
    old = [{"chapter": "01", "claim": "c", "measured": 1.0, "comparison": ">", "threshold": 0.0,
            "holds": True, "paper": None, "note": "not gated at this scale; x", "profile": "cpu",
            "seed": 0}]
    (tmp_path / "old.json").write_text(json.dumps(old))
    r = claims.load(tmp_path / "old.json")[0]
    assert r.gated is False and r.values is None and r.reason == ""


def test_check_and_check_seeds_at_equality(chapter):
    """The gating comparisons at their boundary, through check and check_seeds: equality fails
    a strict comparison and passes a non-strict one; both ends of an interval are inside."""
    at = {"<": False, "<=": True, ">": False, ">=": True}
    for op, holds in at.items():
        assert claims.check(f"eq {op}", 0.25, op, 0.25).holds is holds
        # zero spread: the bound statistic is the value itself
        assert claims.check_seeds(f"seeds {op}", [0.25, 0.25, 0.25], op, 0.25,
                                  statistic="bound").holds is holds
        assert claims.check_seeds(f"mean {op}", [0.0, 0.5], op, 0.25).holds is holds
    for v in (0.2, 0.5):
        assert claims.check(f"in {v}", v, "in", (0.2, 0.5)).holds
    for v in (0.2 - 1e-12, 0.5 + 1e-12):
        assert not claims.check(f"out {v}", v, "in", (0.2, 0.5)).holds
    assert claims.check("degenerate", 0.3, "in", (0.3, 0.3)).holds
    # fraction at the required share, sign test p-value at alpha (1/32 for 5 of 5)
    share = claims.check_seeds("share", [0.1, 0.3, 0.2, 0.4], "<", 0.3, statistic="fraction", fraction=0.5)
    assert share.measured == 0.5 and share.holds
    p = claims.check_seeds("sign", [1, 2, 3, 4, 5], ">", 0, statistic="sign", alpha=1 / 32)
    assert p.measured == 1 / 32 and p.holds
    q = claims.check_seeds("sign2", [1, 2, 3, 4, 0], ">", 0, statistic="sign", alpha=1 / 32)
    assert q.measured == pytest.approx(6 / 32) and not q.holds
    # margin is zero at equality, on either side
    assert claims.check("m", 0.25, "<=", 0.25).margin == 0.0
    assert claims.check("m2", 0.2, "in", (0.2, 0.5)).margin == 0.0
