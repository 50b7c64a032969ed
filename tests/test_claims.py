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


def _rec(ch, claim, m, holds, gated=True, seed=0, profile="cpu", reason="", note="", paper=None):
    return claims.Record(ch, claim, m, ">", 0.5, holds, gated, paper, note, reason, profile, seed)


def test_table_html_renders_every_cell(chapter):
    """The chapter's claims table, cell by cell: escaped text, 4 significant digits, the margin
    on the right side of each comparison, the coloured verdict, the seeds' spread, the reason."""
    a = claims.check("C1 a<b", 0.123456, ">", 0.1, paper="p & q", note="n1")
    b = claims.check("C2", 2.0, "in", (1, 3), gate=False, reason="needs CIFAR.", note="2 seeds")
    # mean 2, sd √2, se 1, t(0.95, 1) = 6.3138: the upper end 8.314 is compared with 4
    c = claims.check_seeds("C3", [1.0, 3.0], "<", 4.0, statistic="bound", note="x")
    d = claims.check("C4", 0.5, "<=", 0.25)
    head = "".join(f"<th>{h}</th>" for h in
                   ("claim", "measured", "test", "margin", "verdict", "seeds", "paper", "note"))
    rows = [
        '<td>C1 a&lt;b</td><td class="num">0.1235</td><td>&gt; 0.1</td><td class="num">0.02346</td>'
        '<td><span class="claim-holds">✓ holds</span></td><td></td><td>p &amp; q</td><td>n1</td>',
        '<td>C2</td><td class="num">2</td><td>in [1, 3]</td><td class="num">1</td>'
        '<td><span class="claim-holds">✓ holds (not gated)</span></td><td></td><td></td>'
        '<td>not gated: needs CIFAR. 2 seeds</td>',
        '<td>C3</td><td class="num">8.314</td><td>&lt; 4</td><td class="num">-4.314</td>'
        '<td><span class="claim-fails">✗ fails</span></td>'
        '<td>bound; interval [-4.314, 8.314]; seeds 4: 1, 5: 3</td><td></td><td>x</td>',
        '<td>C4</td><td class="num">0.5</td><td>&lt;= 0.25</td><td class="num">-0.25</td>'
        '<td><span class="claim-fails">✗ fails</span></td><td></td><td></td><td></td>',
    ]
    expected = ('<div class="table-scroll"><table class="claims-table"><thead><tr>' + head
                + "</tr></thead><tbody>" + "".join(f"<tr>{r}</tr>" for r in rows)
                + "</tbody></table></div>")
    assert claims.table_html([a, b, c, d]) == expected
    assert claims.table_html() == expected  # defaults to this chapter's records


def test_margin_for_each_comparison():
    r = _rec("01", "m", 0.75, True)
    assert r.margin == 0.25
    for op, thr, m, margin in [(">=", 0.5, 0.75, 0.25), ("<", 0.5, 0.25, 0.25), ("<=", 0.5, 0.75, -0.25),
                               ("in", [0.0, 1.0], 0.75, 0.25), ("in", [0.0, 1.0], 0.125, 0.125),
                               ("in", [0.0, 1.0], 1.5, -0.5)]:
        r.comparison, r.threshold, r.measured = op, thr, m
        assert r.margin == margin, op


def test_scoreboard_with_other_runs_seeds_and_links():
    s0 = [_rec("01", "a", 0.9, True, paper="0.8"),
          _rec("01", "b", 0.1, False, gated=False, reason="too small.", note="n"),
          _rec("02", "c", 0.7, True)]
    s1 = [_rec("01", "a", 0.2, False, seed=1), _rec("01", "b", 0.6, True, gated=False, seed=1)]
    gpu = [_rec("01", "a", 0.95, True, profile="gpu"), _rec("03", "d", 0.6, True, profile="gpu")]
    md = claims.scoreboard_markdown(s0, {"01": "1. One", "02": "2. Two"}, ["04-x"],
                                    others={"gpu, seed 0": gpu}, seeds={0: s0, 1: s1},
                                    links={"01": "ch/one.html"})
    holds, fails = '<span class="claim-holds">✓ holds</span>', '<span class="claim-fails">✗ fails'
    lines = md.split("\n")
    assert lines[0].startswith("**2 of 3 claims hold** in this build (cpu, seed 0); 2 of 2 gated "
                               "claims hold, and 1 claim(s) are measured but not gated. ")
    assert lines[1].startswith("Beside it: gpu, seed 0. Runs on *stand-in* data")
    assert lines[2] == ("The **seeds** column counts on how many of the seed bases 0, 1 each claim "
                        "held (2 claim(s) hold on seed 0 but not on every base: ⚠).")
    head = "| claim | test | cpu, seed 0 | gpu, seed 0 | seeds | paper | note |"
    assert lines[3:] == [
        "", "- chapter 04-x failed to run; its table may be incomplete.", "",
        "| chapter | claims | hold | gated claims that fail |", "|---|---|---|---|",
        "| [1. One](ch/one.html) | 2 | 1 | 0 |", "| 2. Two | 1 | 1 | 0 |", "| Chapter 03 | 0 | 0 | 0 |",
        "", "## [1. One](ch/one.html)", "", head, "|---|---|---|---|---|---|---|",
        f"| [a](ch/one.html#reproduction) | > 0.5 | {holds} 0.9 | {holds} 0.95 | "
        "1/2 ⚠ (mean 0.55, range 0.2 to 0.9; fails on seed 1) | 0.8 |  |",
        f"| [b](ch/one.html#reproduction) | > 0.5 | {fails} (not gated)</span> 0.1 | – | "
        "1/2 (mean 0.35, range 0.1 to 0.6; fails on seed 0) |  | not gated: too small. n |",
        "", "## 2. Two", "", head, "|---|---|---|---|---|---|---|",
        f"| c | > 0.5 | {holds} 0.7 | – | 1/2 ⚠ (mean 0.7, range 0.7 to 0.7; not run on seed 1) |  |  |",
        "", "## Chapter 03", "", head, "|---|---|---|---|---|---|---|",
        f"| d | > 0.5 | – | {holds} 0.6 | – |  |  |", ""]


def test_scoreboard_failing_gated_claims_and_single_seed():
    recs = [_rec("05", "x", 0.1, False), _rec("05", "y", 0.9, True, seed=2)]
    md = claims.scoreboard_markdown(recs, seeds={0: recs})  # one seed base: no seeds column
    assert "**1 of 2 claims hold** in this build (cpu, seed 0, 2); 1 of 2 gated claims hold" in md
    assert "| Chapter 05 | 2 | 1 | <span class=\"claim-fails\">1</span> |" in md
    assert "seeds" not in md.split("## Chapter 05")[1] and "Beside it" not in md
    assert claims.scoreboard_markdown([]) == ("No claims recorded yet: run `python -m landscape_lib "
                                              "run` first.\n")
    assert claims.scoreboard_markdown([], failed_chapters=["07"]).startswith(
        "**0 of 0 claims hold** in this build (-, seed -)")


def test_seeds_summary_and_markdown():
    s0 = [_rec("01", "a", 0.9, True), _rec("01", "b", 0.1, False, gated=False), _rec("02", "c", 0.7, True)]
    s1 = [_rec("01", "a", 0.2, False, seed=1), _rec("01", "b", math.nan, True, gated=False, seed=1)]
    rows = {r["claim"]: r for r in claims.seeds_summary({0: s0, 1: s1})}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["held"], a["n"], a["seeds"], a["flag"], a["missing"]) == (1, 2, [0, 1], True, [])
    assert (a["mean"], a["low"], a["high"]) == (pytest.approx(0.55), 0.2, 0.9)
    assert (b["held"], b["flag"], b["gated"]) == (1, False, False)  # fails on the first base: no flag
    assert (b["mean"], b["low"], b["high"]) == (0.1, 0.1, 0.1)  # NaN left out
    assert (c["n"], c["missing"], c["flag"], c["mean"]) == (1, [1], True, 0.7)
    nan_only = claims.seeds_summary({3: [_rec("09", "z", math.nan, False)]})[0]
    assert all(math.isnan(nan_only[k]) for k in ("mean", "low", "high")) and not nan_only["flag"]
    assert claims.seeds_summary({3: [_rec("09", "z", 1.0, True)]})[0]["flag"] is False
    md = claims.seeds_markdown({0: s0, 1: s1}, {"01": "1. One"})
    assert md == ("\n**Over seed bases 0, 1:** 0 of 3 claims hold on every seed base; 2 hold on "
                  "seed 0 but not on every one (marked ⚠).\n\n"
                  "| chapter | claim | gated | held | mean | range |\n|---|---|---|---|---|---|\n"
                  "| 1. One | a | yes | 1/2 ⚠ | 0.55 | 0.2 to 0.9 |\n"
                  "| 1. One | b | no | 1/2 | 0.1 | 0.1 to 0.1 |\n"
                  "| 02 | c | yes | 1/2 ⚠ | 0.7 | 0.7 to 0.7 |\n")
    assert "1 of 1 claims hold on every seed base; 0 hold" in claims.seeds_markdown(
        {5: [_rec("01", "a", 0.9, True)]})


def test_report_message_and_where_it_is_enforced(chapter, monkeypatch):
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    claims.start("99", "gpu", 0)
    claims.check("ok", 1.0, ">", 0.0)
    claims.check("low", 0.25, ">", 0.5)
    claims.check("wide", 2.0, "in", (0, 1))
    claims.check("not gated", 0.0, ">", 1.0, gate=False, reason="r")
    msg = ("2 of 4 claims of chapter 99 do not hold in profile 'gpu': low: measured 0.25, needed > 0.5; "
           "wide: measured 2, needed in [0, 1]")
    with pytest.raises(claims.ClaimsFailed) as err:
        claims.report()
    assert str(err.value) == msg
    monkeypatch.setenv("LANDSCAPE_STAND_IN", "1")
    claims.start("99", "gpu", 0)
    claims.check("low", 0.25, ">", 0.5)
    assert [r.claim for r in claims.report()] == ["low"] and claims.records()[0].stand_in


@pytest.mark.parametrize("value,expected", [(None, False), ("", False), ("0", False), ("false", False),
                                            ("False", False), ("1", True), ("yes", True)])
def test_stand_in_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("LANDSCAPE_STAND_IN", raising=False)
    else:
        monkeypatch.setenv("LANDSCAPE_STAND_IN", value)
    assert claims.stand_in() is expected


def test_exact_error_messages(chapter, monkeypatch):
    cases = [
        (lambda: claims.compare(1.0, "=", 1.0), "unknown comparison '='; valid comparisons: >, >=, <, <=, in"),
        (lambda: claims.check("x", 1.0, "==", 1.0), "unknown comparison '=='; valid comparisons: >, >=, <, <=, in"),
        (lambda: claims.check("x", 1.0, "in", (1, 2, 3)), "comparison 'in' needs threshold=(low, high)"),
        (lambda: claims.check("x", 1.0, "in", (2, 1)), "interval threshold has low > high: [2.0, 1.0]"),
        (lambda: claims.check("x", 1.0, "in", ("a", 1)), "threshold must be a number, got 'a'"),
        (lambda: claims.check("x", 1.0, "in", (0, None)), "threshold must be a number, got None"),
        (lambda: claims.check("x", [1], ">", 1.0), "measured must be a number, got [1]"),
        (lambda: claims.check_seeds("x", [1, "y"], ">", 0), "per-seed value must be a number, got 'y'"),
        (lambda: claims.check_seeds("x", [], ">", 0), "claim 'x': no per-seed values"),
        (lambda: claims.check_seeds("x", [1, 2], ">", 0, seeds=[3]), "1 seeds but 2 values"),
        (lambda: claims.check_seeds("x", [1], ">", 0, statistic="max"),
         "unknown statistic 'max'; valid statistics: mean, bound, fraction, sign"),
        (lambda: claims.check_seeds("x", [1], ">", 0, statistic="fraction", fraction=1.5),
         "fraction must lie in (0, 1], got 1.5"),
        (lambda: claims.check_seeds("x", [1], ">", 0, statistic="sign", alpha=1.0),
         "alpha must lie in (0, 1), got 1.0"),
        (lambda: claims.check_seeds("x", [1], ">", 0, statistic="sign", alpha=0.0),
         "alpha must lie in (0, 1), got 0.0"),
        (lambda: claims.t_interval([]), "no values"),
        (lambda: claims.t_interval([1, 2], 0.0), "level must lie in (0, 1), got 0.0"),
        (lambda: claims.sign_test(-1, 3), "need 0 <= passes <= n, got passes=-1, n=3"),
        (lambda: claims.check("", 1.0, ">", 0.0), "a claim needs a name"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError)) as err:
            call()
        assert str(err.value) == message
    monkeypatch.setattr(claims._current, "chapter", None)
    for call in (lambda: claims.check("x", 1.0, ">", 0.0), lambda: claims.check_seeds("x", [1], ">", 0)):
        with pytest.raises(RuntimeError) as err:
            call()
        assert str(err.value) == "call claims.start(chapter, profile, seed) before claims.check"


def test_check_seeds_edges(chapter):
    r = claims.check_seeds("seq", [1.0, 2.0, 4.0], ">=", 1.0, seeds=[10, 20, 30], statistic="fraction",
                           fraction=1.0)
    assert r.seeds == [10, 20, 30] and r.measured == 1.0 and r.holds and r.note == "per-seed test >= 1"
    assert r.threshold == 1.0 and r.comparison == ">=" and r.statistic == "fraction"
    # bound with 'in': both ends inside; with level 0.5: t(0.75, 1) = 1
    r = claims.check_seeds("in", {7: 1.0, 8: 3.0}, "in", (0.5, 3.5), statistic="bound", level=0.5)
    assert r.holds and r.measured == 2.0 and r.interval == [pytest.approx(1.0), pytest.approx(3.0)]
    assert r.seeds == [7, 8] and r.values == [1.0, 3.0]
    assert not claims.check_seeds("in2", {7: 1.0, 8: 3.0}, "in", (1.5, 3.5), statistic="bound",
                                  level=0.5).holds  # the lower end 1 leaves it
    r = claims.check_seeds("ge bound", [2.0, 2.0], ">=", 2.0, statistic="bound")
    assert r.measured == 2.0 and r.holds
    r = claims.check_seeds("le bound", [2.0, 2.0], "<=", 2.0, statistic="bound")
    assert r.measured == 2.0 and r.holds
    r = claims.check_seeds("sign", [1, -1, 1], ">", 0, statistic="sign", alpha=0.5, note="n")
    assert r.measured == 0.5 and r.holds and r.threshold == 0.5 and r.note == "per-seed test > 0; n"
    r = claims.check_seeds("frac", [1, -1], ">", 0, statistic="fraction", fraction=0.5)
    assert r.measured == 0.5 and r.holds and r.threshold == 0.5
    one = claims.check_seeds("one", [0.5], ">", 0.0)
    assert one.interval == [-math.inf, math.inf] and claims.spread(one) == "mean; seeds 4: 0.5"
    assert one.gated and one.paper is None
    g = claims.check_seeds("g", [0.5], ">", 0.0, gate=False, reason="why", paper="p")
    assert not g.gated and g.reason == "why" and g.paper == "p"
    assert claims.spread(claims.check("plain", 1.0, ">", 0.0)) == ""


def test_records_file_and_load_defaults(chapter, tmp_path):
    claims.check("a", 1.0, ">", 0.0)
    assert [p.name for p in chapter.iterdir()] == ["99.json"]  # the temporary file was renamed
    assert claims.records() is not claims._current.records  # a copy
    old = [{"chapter": "01", "claim": "c", "measured": 1.0, "comparison": ">", "threshold": 0.0,
            "holds": True, "paper": None, "note": "2 seeds", "profile": "cpu", "seed": 0}]
    (tmp_path / "old.json").write_text(json.dumps(old))
    r = claims.load(tmp_path / "old.json")[0]
    assert r.gated is True and r.stand_in is False and r.reason == "" and r.statistic is None
    assert claims._fmt((1, 2.5, [0.000123456, "s"])) == "[1, 2.5, [0.0001235, s]]"


def test_start_without_a_claims_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LANDSCAPE_CLAIMS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    claims.start(7, "smoke", "3")
    assert (claims._current.chapter, claims._current.seed) == ("7", 3)
    claims.check("a", 1.0, ">", 0.0)
    assert list(tmp_path.iterdir()) == [] and claims._path() is None
    monkeypatch.setenv("LANDSCAPE_CLAIMS_DIR", "")
    assert claims._path() is None
    monkeypatch.setenv("LANDSCAPE_CLAIMS_DIR", str(tmp_path / "sub" / "dir"))
    claims.check("b", 1.0, ">", 0.0)
    assert [r["claim"] for r in json.loads((tmp_path / "sub/dir/7.json").read_text())] == ["a", "b"]


def test_records_keep_every_argument(chapter):
    r = claims.check("plain", 1.0, ">", "0.5")
    assert r.reason == "" and r.note == "" and r.paper is None and r.threshold == 0.5
    with pytest.raises(TypeError) as err:
        claims.check("x", 1.0, ">", "half")
    assert str(err.value) == "threshold must be a number, got 'half'"
    for stat in ("mean", "bound", "fraction", "sign"):
        r = claims.check_seeds(f"s {stat}", [1.0, 2.0, 3.0, 4.0, 5.0], "<", 9.0, statistic=stat,
                               paper="P", note="N", gate=False, reason="R")
        assert (r.paper, r.reason, r.gated, r.statistic) == ("P", "R", False, stat), stat
        assert r.note.endswith("N") and r.values == [1.0, 2.0, 3.0, 4.0, 5.0] and r.seeds == [4, 5, 6, 7, 8]
        d = claims.check_seeds(f"d {stat}", [1.0, 2.0], "<", 9.0, statistic=stat)
        assert (d.reason, d.gated, d.paper) == ("", True, None)
    m = claims.records()[0 + 1]
    assert (m.comparison, m.threshold, m.note) == ("<", 9.0, "N")


def test_report_displays_the_table(chapter, monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    claims.check("a", 1.0, ">", 0.0)
    claims.report()
    assert len(shown) == 1 and shown[0].data == claims.table_html(claims.records())
    b = claims.check("b", 1.0, "<", 0.0)
    assert claims.table_html([b]).count("<tr>") == 2  # header and b only, not this chapter's a


def test_load_keeps_a_gated_key_over_the_note(tmp_path):
    new = [{"chapter": "01", "claim": "c", "measured": 1.0, "comparison": ">", "threshold": 0.0,
            "holds": True, "gated": False, "paper": None, "note": "3 seeds", "reason": "r",
            "profile": "cpu", "seed": 0},
           {"chapter": "01", "claim": "d", "measured": 1.0, "comparison": ">", "threshold": 0.0,
            "holds": True, "paper": None, "note": claims.NOT_GATED + ": small", "profile": "cpu",
            "seed": 0}]
    (tmp_path / "new.json").write_text(json.dumps(new))
    c, d = claims.load(tmp_path / "new.json")
    assert c.gated is False and c.reason == "r" and d.gated is False


def test_scoreboard_cells_with_several_profiles_runs_and_seeds(chapter):
    a = claims.check_seeds("multi\nline", [1.0, 3.0], ">", 0.5, note="n")
    recs = [a, _rec("99", "b", 0.6, True, gated=True, reason="kept", note="gated note", profile="gpu")]
    s1 = [_rec("99", "b", 0.1, False, seed=1)]
    s2 = [_rec("99", "b", 0.2, False, seed=2)]
    md = claims.scoreboard_markdown(recs, others={"x": [], "y": []}, seeds={0: recs, 1: s1, 2: s2})
    assert "in this build (cpu, gpu, seed 0, 4)" in md and "Beside it: x; y. Runs" in md
    assert ("| multi line | > 0.5 | <span class=\"claim-holds\">✓ holds</span> 2 | – | – | "
            "1/3 ⚠ (mean 2, range 2 to 2; not run on seed 1, 2) |  | n; mean; interval [-4.314, 8.314]; "
            "seeds 4: 1, 5: 3 |") in md
    assert "| b | > 0.5 |" in md and "| gated note |" in md  # a gated claim's reason is not shown
    assert "1/3 ⚠ (mean 0.3, range 0.1 to 0.6; fails on seed 1, 2)" in md
    html = claims.table_html([recs[1]])
    assert "<td>gated note</td>" in html and "kept" not in html
