import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from landscape_lib import curvature, ensembles, landscape, viz


def _frames(n=3):
    return [[go.Scatter(x=[0, 1], y=[i, i + 1])] for i in range(n)]


def test_slider_figure_has_one_step_per_frame():
    fig = viz.slider_figure(_frames(), ["a", "b", "c"], slider_title="t", active=1,
                            static=[go.Scatter(x=[0], y=[0])])
    assert len(fig.frames) == 3 and len(fig.data) == 2
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["a", "b", "c"]
    assert [s.args[0][0] for s in steps] == ["0", "1", "2"]
    assert fig.layout.sliders[0].active == 1 and list(fig.data[0].y) == [1, 2]


@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=[], labels=[]), "at least one frame"),
    (dict(frames=_frames(2), labels=["a"]), "2 frames but 1 labels"),
    (dict(frames=[[go.Scatter()], [go.Scatter(), go.Scatter()]], labels=["a", "b"]), "same number of traces"),
    (dict(frames=_frames(2), labels=["a", "b"], active=5), "out of range"),
    (dict(frames=_frames(2), labels=["a", "b"], frame_layouts=[{}]), "2 frames but 1 frame layouts"),
])
def test_slider_figure_rejects_bad_frames(kwargs, match):
    with pytest.raises(ValueError, match=match):
        viz.slider_figure(slider_title="t", **kwargs)


def test_frame_layouts_travel_with_their_frames():
    lays = [{"xaxis": {"range": [-r, r]}} for r in (1, 2, 3)]
    fig = viz.slider_figure(_frames(), ["1", "2", "3"], slider_title="R", active=2, frame_layouts=lays)
    assert [tuple(f.layout.xaxis.range) for f in fig.frames] == [(-1, 1), (-2, 2), (-3, 3)]
    assert tuple(fig.layout.xaxis.range) == (-3, 3)


def test_html_output_does_not_embed_plotly_js():
    html = viz.to_html(go.Figure(go.Scatter(x=[1], y=[1])), div_id="fig-x")
    assert "Plotly.newPlot" in html and 'id="fig-x"' in html
    sliding = viz.to_html(viz.slider_figure(_frames(), ["a", "b", "c"], slider_title="t"))
    assert "Plotly.animate" not in sliding  # no autoplay through the frames on page load
    assert len(html) < 20_000  # plotly.js itself is ~4.8 MB: it ships once as a static asset
    assert viz.plotly_js_path().stat().st_size > 1_000_000


def test_show_emits_html_in_book_mode(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    monkeypatch.setenv("LANDSCAPE_BOOK", "1")
    viz.show(go.Figure(go.Scatter(x=[1], y=[1])))
    assert "Plotly.newPlot" in shown[0].data
    monkeypatch.setenv("LANDSCAPE_BOOK", "0")
    assert not viz.book_mode()


def test_table_html_formats_numbers():
    html = viz.table_html([{"a": 0.123456789, "b": "x<y"}])
    assert "0.1235" in html and "x&lt;y" in html


def test_interact_calls_the_function_once_with_initial_values_in_book_mode(monkeypatch):
    import ipywidgets as widgets
    monkeypatch.setenv("LANDSCAPE_BOOK", "1")
    calls = []
    viz.interact(lambda a, b, c, d: calls.append((a, b, c, d)),
                 a=widgets.FloatSlider(value=0.3, min=0, max=1), b=["x", "y"], c=True, d={"k": 1})
    assert calls == [(0.3, "x", True, "k")]
    with pytest.raises(TypeError, match="pass a widget"):
        viz.interact(lambda a: None, a=(0, 1, 0.1))
    monkeypatch.setenv("LANDSCAPE_BOOK", "0")
    out = viz.interact(lambda a: calls.append(a), a=widgets.IntSlider(value=4, min=0, max=9))
    assert calls[-1] == 4 and out is not None  # ipywidgets.interact ran the function once


# --- figures: contour, reliability diagram, spectral density, colours, layout --------------------



@pytest.fixture(autouse=True)
def _fresh_colors():
    viz.reset_colors()
    yield
    viz.reset_colors()


def _bowl(n=21, lo=1e-3):
    """A slice whose loss spans lo … lo + 4 (decades of range): L = lo + α² + 3β²."""
    a = np.linspace(-1, 1, n)
    b = np.linspace(-0.5, 0.5, n + 4)
    A, B = np.meshgrid(a, b)
    loss = lo + A ** 2 + 3 * B ** 2
    return landscape.Surface(a, b, loss, np.clip(1 - loss / 5, 0, 1))


def _untick(text):
    """A tick label back to a number: '0.02', '10<sup>−5</sup>', '2×10<sup>−5</sup>'."""
    m = re.fullmatch(r"(?:([\d.]+)×)?10<sup>([−\d]+)</sup>", text)
    if m:
        return float(m.group(1) or 1) * 10.0 ** int(m.group(2).replace("−", "-"))
    return float(text)


def test_contour_levels_are_equally_spaced_in_log10_from_the_minimum_to_the_maximum():
    s = _bowl()
    lv = viz.contour_levels(s.loss, 15)
    scaled = lv.scaled()
    assert lv.log and lv.n == 15 and len(scaled) == 15
    assert scaled[0] == pytest.approx(math.log10(s.loss.min()))   # 1e-3 at the centre: -3
    assert scaled[-1] == pytest.approx(math.log10(s.loss.max()))
    assert np.allclose(np.diff(scaled), np.diff(scaled)[0], rtol=1e-12)
    # independent: a geometric sequence from min to max, i.e. constant ratio between levels
    ref = np.geomspace(s.loss.min(), s.loss.max(), 15)
    assert np.allclose(lv.values(), ref, rtol=1e-10)
    ratios = lv.values()[1:] / lv.values()[:-1]
    assert np.allclose(ratios, ratios[0])
    # several slices together: shared levels cover all of them
    other = _bowl(lo=1e-5)
    both = viz.contour_levels(np.concatenate([s.loss.ravel(), other.loss.ravel()]), 10)
    assert both.start == pytest.approx(-5) and both.end == pytest.approx(math.log10(s.loss.max()))


def test_contour_levels_clip_ends_and_linear_levels():
    v = np.concatenate([np.full(99, 1.0), [1e6]]) * np.linspace(1, 2, 100)
    lv = viz.contour_levels(v, 5, clip=0.02)
    assert lv.end == pytest.approx(math.log10(np.quantile(v, 0.98)))
    assert viz.contour_levels(v, 5).end == pytest.approx(6 + math.log10(2))  # no clip: the maximum
    lin = viz.contour_levels([0.1, 0.4, 0.7], 4, log=False)
    assert np.allclose(lin.values(), [0.1, 0.3, 0.5, 0.7])
    flat = viz.contour_levels(np.full((3, 3), 0.5), 3)   # a constant slice still gets levels
    assert flat.start < math.log10(0.5) < flat.end
    assert viz.contour_levels(v, 3, lo=0.1, hi=10).scaled().tolist() == pytest.approx([-1, 0, 1])


def test_contour_trace_draws_log10_loss_with_the_levels_and_a_colorbar_in_loss_units():
    s = _bowl()
    tr = viz.contour_trace(s, n_levels=12)
    assert np.allclose(np.asarray(tr.z), np.log10(s.loss))
    assert np.array_equal(np.asarray(tr.customdata), s.loss)   # hover shows the loss itself
    lv = viz.contour_levels(s.loss, 12)
    c = tr.contours
    assert (c.start, c.end, c.size) == pytest.approx((lv.start, lv.end, lv.size))
    assert tr.autocontour is False and (tr.zmin, tr.zmax) == pytest.approx((lv.start, lv.end))
    vals, texts = tr.colorbar.tickvals, tr.colorbar.ticktext
    assert len(vals) >= 3 and all(lv.start - 1e-9 <= t <= lv.end + 1e-9 for t in vals)
    assert [_untick(t) for t in texts] == pytest.approx([10 ** t for t in vals], rel=1e-9)
    assert tr.colorbar.title.text == "loss" and tr.colorbar.x >= 1.0  # right of the plot area


def test_log_ticks_are_loss_values_at_their_log10_positions():
    for a, b in [(-3, 0.6), (-8, 1), (0, 0.05), (-1, 0.3), (-12, 2)]:
        pos, text = viz.log_ticks(a, b)
        assert 3 <= len(pos) <= 8 and all(a - 1e-9 <= p <= b + 1e-9 for p in pos)
        assert [_untick(t) for t in text] == pytest.approx([10 ** p for p in pos], rel=2e-3)


def test_explicit_and_shared_levels():
    s = _bowl()
    tr = viz.contour_trace(s, levels=np.logspace(-2, 1, 13))
    assert (tr.contours.start, tr.contours.end, tr.contours.size) == pytest.approx((-2, 1, 0.25))
    with pytest.raises(ValueError, match="equally spaced"):
        viz.contour_trace(s, levels=[0.01, 0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="increasing"):
        viz.contour_trace(s, levels=[1.0, 0.1])
    shared = viz.contour_levels(np.stack([s.loss, 10 * s.loss]), 9)
    a = viz.contour_trace(s, levels=shared)
    b = viz.contour_trace((s.alphas, s.betas, 10 * s.loss), levels=shared)
    assert a.contours == b.contours and a.colorbar.tickvals == b.colorbar.tickvals
    with pytest.raises(ValueError, match="contradicts"):
        viz.contour_trace(s, levels=shared, log=False)


def test_error_and_accuracy_fields_use_linear_levels():
    s = _bowl()
    tr = viz.contour_trace(s, field="error", n_levels=6)
    assert np.allclose(np.asarray(tr.z), 1 - s.acc)
    assert tr.contours.start == pytest.approx((1 - s.acc).min()) and tr.colorbar.tickvals is None
    assert tr.colorbar.title.text == "error"
    pct = viz.contour_trace((s.alphas, s.betas, 100 * (1 - s.acc)), log=False,
                            colorbar_title="test error (%)")
    assert np.allclose(np.asarray(pct.z), 100 * (1 - s.acc))


def test_non_positive_losses_with_log_levels_fail_unless_a_floor_is_given():
    s = _bowl()
    loss = s.loss.copy()
    loss[0, 0], loss[1, 1] = 0.0, -1e-3
    bad = (s.alphas, s.betas, loss)
    with pytest.raises(ValueError, match=r"positive .*2 of .* are <= 0.*floor="):
        viz.contour(bad)
    tr = viz.contour_trace(bad, floor=1e-4)
    assert np.allclose(np.asarray(tr.z), np.log10(np.maximum(loss, 1e-4)))
    assert tr.contours.start == pytest.approx(-4)
    assert np.asarray(tr.customdata)[0, 0] == 0.0   # hover still shows the raw value
    viz.contour_trace(bad, log=False)                # linear levels need no floor
    with pytest.raises(ValueError, match="floor must be a positive"):
        viz.contour_trace(bad, floor=0.0)


@pytest.mark.parametrize("data,match", [
    ((np.linspace(-1, 1, 5), np.linspace(-1, 1, 4), np.ones((5, 4))),
     r"shape \(len\(betas\), len\(alphas\)\) = \(4, 5\)"),
    ((np.linspace(-1, 1, 5), np.linspace(-1, 1, 4), np.ones(20)), "shape"),
    ((np.array([]), np.array([]), np.ones((0, 0))), "empty"),
    ((np.linspace(-1, 1, 3), np.linspace(-1, 1, 3), np.array([[1, 2, np.nan]] * 3)), "NaN or infinite"),
    ((np.linspace(-1, 1, 3), np.array([0.0, 0.0, 1.0]), np.ones((3, 3))), "strictly monotonic"),
    ((np.array([1.0]), np.array([1.0]), np.ones((1, 1))), "at least 2 points"),
])
def test_contour_rejects_bad_slices(data, match):
    with pytest.raises(ValueError, match=match):
        viz.contour(data)


def test_contour_rejects_bad_arguments():
    s = _bowl()
    with pytest.raises(TypeError, match="landscape.Surface"):
        viz.contour(np.ones((3, 3)))
    with pytest.raises(ValueError, match="field must be one of"):
        viz.contour(s, field="nll")
    with pytest.raises(ValueError, match="n_levels must be an integer >= 2"):
        viz.contour(s, n_levels=1)
    with pytest.raises(ValueError, match="clip"):
        viz.contour(s, clip=0.7)
    with pytest.raises(ValueError, match=r"point 'SGD' must be \(x, y\)"):
        viz.contour(s, points={"SGD": (1, 2, 3)})


def test_contour_figure_marks_named_points_in_their_colours_and_scales_axes_equally():
    s = _bowl()
    fig = viz.contour(s, points={"minimiser": (0, 0), "SWA": (0.1, 0.2)}, paths={"SGD": [[0, 0], [0.3, 0.1]]},
                      equal_axes=True, xaxis="α", yaxis="β")
    kinds = [type(t).__name__ for t in fig.data]
    assert kinds == ["Contour", "Scatter", "Scatter", "Scatter"]
    swa, sgd = fig.data[2], fig.data[3]
    assert (swa.x[0], swa.y[0]) == (0.1, 0.2) and swa.marker.color == viz.color("SWA")
    assert list(sgd.x) == [0, 0.3] and sgd.line.color == viz.color("SGD") and sgd.mode == "lines+markers"
    assert len({t.marker.color for t in fig.data[1:3]} | {sgd.line.color}) == 3
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1
    assert fig.layout.template.layout.paper_bgcolor == "rgba(0,0,0,0)"
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.yref == "container"
    assert fig.layout.xaxis.title.text == "α" and fig.layout.height == 480 and fig.layout.autosize
    fig.to_json()  # plotly accepts every property


def test_contour_with_surface_draws_the_same_values_and_levels_in_3d():
    s = _bowl()
    fig = viz.contour(s, surface3d=True, n_levels=10)
    con, sur = fig.data
    assert type(sur).__name__ == "Surface" and sur.scene == "scene"
    assert np.array_equal(np.asarray(sur.z), np.asarray(con.z))
    assert (sur.cmin, sur.cmax) == (con.zmin, con.zmax) and sur.contours.z.size == con.contours.size
    ticks = fig.layout.scene.zaxis
    assert [_untick(t) for t in ticks.ticktext] == pytest.approx([10 ** t for t in ticks.tickvals], rel=1e-9)


# reliability: 6 points, 4 classes, 10 bins; bins 3, 3, 5, 6, 9, 8 (confidences kept off the edges)
REL_PROBS = torch.tensor([[0.35, 0.25, 0.20, 0.20],   # conf .35, correct
                          [0.25, 0.35, 0.20, 0.20],   # conf .35, wrong
                          [0.55, 0.15, 0.15, 0.15],   # conf .55, correct
                          [0.15, 0.65, 0.10, 0.10],   # conf .65, wrong: a real accuracy of 0
                          [0.95, 0.02, 0.02, 0.01],   # conf .95, correct
                          [0.05, 0.05, 0.05, 0.85]],  # conf .85, correct
                         dtype=torch.float64)
REL_Y = torch.tensor([0, 0, 0, 2, 0, 3])
HAND_BINS = [3, 5, 6, 8, 9]
HAND_ACC = [0.5, 1.0, 0.0, 1.0, 1.0]
HAND_CONF = [0.35, 0.55, 0.65, 0.85, 0.95]


def test_reliability_bars_are_the_binned_accuracies_and_empty_bins_draw_nothing():
    rel = ensembles.reliability(REL_PROBS, REL_Y, 10)
    fig = viz.reliability_diagram(rel)
    acc_bars, gap_bars = [t for t in fig.data if type(t).__name__ == "Bar"]
    # the bars: one per non-empty bin, at its accuracy (hand values, and ensembles' values)
    assert list(acc_bars.y) == pytest.approx(HAND_ACC)
    assert list(acc_bars.y) == pytest.approx([rel["accuracy"][j] for j in HAND_BINS])
    assert not np.isnan(np.asarray(acc_bars.y, dtype=float)).any()
    assert [int(x * 10) for x in acc_bars.x] == HAND_BINS        # each bar inside its own bin
    assert all(w <= 0.1 for w in acc_bars.width)
    # the gap: from the accuracy to the bin's mean confidence
    assert list(gap_bars.base) == pytest.approx(HAND_ACC)
    assert list(np.asarray(gap_bars.base) + np.asarray(gap_bars.y)) == pytest.approx(HAND_CONF)
    # the diagonal, and the ECE in the legend (the same number as ensembles.ece)
    diag = next(t for t in fig.data if t.name == "perfect calibration")
    assert list(diag.x) == [0, 1] and list(diag.y) == [0, 1]
    assert ensembles.ece(REL_PROBS, REL_Y, 10) == pytest.approx(1.6 / 6)
    assert acc_bars.name == f"model · ECE {1.6 / 6:.3f}"
    assert fig.layout.yaxis.range == (0, 1) and fig.layout.xaxis.range == (0, 1)
    fig.to_json()


def test_reliability_min_count_drops_thin_bins_and_gap_style_plots_acc_minus_conf():
    rel = ensembles.reliability(REL_PROBS, REL_Y, 10)
    fig = viz.reliability_diagram(rel, min_count=2, gap=False, ece=False)
    (bars,) = [t for t in fig.data if type(t).__name__ == "Bar"]
    assert list(bars.y) == pytest.approx([0.5]) and bars.name == "model"  # only bin 3 holds 2 points
    g = viz.reliability_diagram(rel, style="gap")
    line = next(t for t in g.data if t.name.startswith("model"))
    assert list(line.x) == pytest.approx(HAND_CONF)
    assert list(line.y) == pytest.approx(np.subtract(HAND_ACC, HAND_CONF))
    zero = next(t for t in g.data if t.name == "perfect calibration")
    assert list(zero.y) == [0, 0] and g.layout.yaxis.range[0] < -0.65 < 0.65 < g.layout.yaxis.range[1]


def test_reliability_of_several_methods_one_colour_each_and_side_by_side():
    rel_a = ensembles.reliability(REL_PROBS, REL_Y, 10)
    rel_b = ensembles.reliability(REL_PROBS.flip(0), REL_Y, 10)
    fig = viz.reliability_diagram({"SGD": rel_a, "SWAG": rel_b}, histogram=True)
    by_group = {}
    for t in fig.data:
        if t.legendgroup:
            by_group.setdefault(t.legendgroup, []).append(t)
    assert set(by_group) == {"SGD", "SWAG"}
    for name, traces in by_group.items():   # bars, gap bars and histogram share the name's colour
        assert {t.marker.color for t in traces} == {viz.color(name)}
        assert sum(t.showlegend is not False for t in traces) == 1
    assert viz.color("SGD") != viz.color("SWAG")
    sgd, swag = by_group["SGD"][0], by_group["SWAG"][0]
    # within a shared bin the two slots do not overlap
    j = int(sgd.x[0] * 10)
    k = [int(x * 10) for x in swag.x].index(j)
    assert sgd.x[0] + sgd.width[0] / 2 <= swag.x[k] - swag.width[k] / 2 + 1e-12
    hist = by_group["SGD"][-1]
    assert list(hist.y) == rel_a["count"] and hist.yaxis == "y2"   # zero counts are true zeros


def test_reliability_traces_for_slider_frames_and_subplots():
    rel = ensembles.reliability(REL_PROBS, REL_Y, 10)
    tr = viz.reliability_traces({"SWAG": rel}, style="gap", xaxis="x2", yaxis="y2")
    assert [t.name for t in tr] == [f"SWAG · ECE {1.6 / 6:.3f}", "perfect calibration"]
    assert all(t.xaxis == "x2" and t.yaxis == "y2" for t in tr)
    assert list(tr[0].y) == pytest.approx(np.subtract(HAND_ACC, HAND_CONF))
    bars = viz.reliability_traces(rel, gap=False, reference=False)
    assert len(bars) == 1 and list(bars[0].y) == pytest.approx(HAND_ACC)


def test_colorbar_placement():
    right = viz.colorbar("log10 loss")
    assert right["x"] == 1.0 and right["xanchor"] == "left" and right["title"]["text"] == "log<sub>10</sub> loss"
    top = viz.colorbar("test error", above=(0.0, 0.42))
    assert top["orientation"] == "h" and top["x"] == pytest.approx(0.21) and top["len"] == pytest.approx(0.42)
    assert top["y"] > 1 and top["yanchor"] == "bottom"
    tr = viz.contour_trace(_bowl(), colorbar=viz.colorbar("loss", above=(0, 0.42)))
    assert tr.colorbar.orientation == "h" and len(tr.colorbar.tickvals) <= 5
    with pytest.raises(ValueError, match="x domain"):
        viz.colorbar("loss", above=(0.5, 0.2))


@pytest.mark.parametrize("results,match", [
    ({}, "non-empty mapping"),
    ({"SGD": {"edges": [0, 1]}}, "missing"),
    ({"edges": [0, 0.5, 1], "confidence": [0.3], "accuracy": [0.5], "count": [1]}, "2 bins"),
    ({"edges": [0, 0.5, 1], "confidence": [np.nan] * 2, "accuracy": [np.nan] * 2, "count": [0, 0]},
     "no points"),
    ({"a": {"edges": [0, 0.5, 1], "confidence": [0.3, 0.7], "accuracy": [0.5, 1], "count": [1, 1]},
      "b": {"edges": [0, 1], "confidence": [0.6], "accuracy": [0.5], "count": [2]}}, "same bins"),
])
def test_reliability_rejects_bad_input(results, match):
    with pytest.raises(ValueError, match=match):
        viz.reliability_diagram(results)


def test_reliability_rejects_bad_options():
    rel = ensembles.reliability(REL_PROBS, REL_Y, 10)
    with pytest.raises(ValueError, match="style must be"):
        viz.reliability_diagram(rel, style="line")
    with pytest.raises(ValueError, match="min_count"):
        viz.reliability_diagram(rel, min_count=0)


def _spectrum(shift=0.0):
    grid = np.linspace(-1, 12, 400)
    nodes = np.array([[0.0, 0.05, 4.0 + shift, 9.0 + shift]])
    weights = np.array([[0.9, 0.09, 0.007, 0.003]])
    return curvature.SpectralDensity(grid, curvature.gaussian_density(nodes, weights, grid, 0.1),
                                     nodes, weights, 0.1, 4)


def test_spectral_density_draws_the_density_itself_on_a_log_axis():
    d = _spectrum()
    fig = viz.spectral_density(d)
    (line,) = fig.data
    assert np.array_equal(np.asarray(line.x), d.grid) and np.array_equal(np.asarray(line.y), d.density)
    assert fig.layout.yaxis.type == "log"
    lo, hi = fig.layout.yaxis.range
    assert lo == pytest.approx(math.log10(d.density.max()) - 6) and hi > math.log10(d.density.max())
    assert fig.layout.xaxis.range == (d.grid[0], d.grid[-1])
    assert viz.spectral_density(d, floor=1e-3).layout.yaxis.range[0] == pytest.approx(-3)
    lin = viz.spectral_density(d, log_y=False)
    assert lin.layout.yaxis.type is None and np.array_equal(np.asarray(lin.data[0].y), d.density)
    fig.to_json()


def test_spectral_densities_overlaid_with_markers():
    ds = {"B = 16": _spectrum(1.0), "B = 256": (_spectrum().grid, _spectrum().density)}
    fig = viz.spectral_density(ds, markers={"λ_max(H_emp)": 9.0, "B = 16": [10.0, -0.2]})
    names = [t.name for t in fig.data]
    assert names == ["B = 16", "B = 256", "λ<sub>max</sub>(H<sub>emp</sub>)", "B = 16"]
    inputs = [(d.grid, d.density) if hasattr(d, "grid") else d for d in ds.values()]
    for t, (g, v) in zip(fig.data[:2], inputs):
        assert np.array_equal(np.asarray(t.x), g) and np.array_equal(np.asarray(t.y), v)
    lo, hi = (10 ** r for r in fig.layout.yaxis.range)
    emp, b16 = fig.data[2], fig.data[3]
    assert list(emp.x) == [9.0, 9.0, None] and list(emp.y) == pytest.approx([lo, hi, None]) and emp.showlegend
    assert list(b16.x) == [10.0, 10.0, None, -0.2, -0.2, None]
    # a marker named like a density: its colour, its legend entry
    assert b16.line.color == fig.data[0].line.color == viz.color("B = 16") and b16.showlegend is False
    assert b16.legendgroup == fig.data[0].legendgroup
    assert len({fig.data[0].line.color, fig.data[1].line.color, emp.line.color}) == 3
    traces = viz.spectral_density_traces(ds, markers={"λ_max": 9.0}, y_range=[-4, 1])
    assert len(traces) == 3 and list(traces[2].y) == pytest.approx([1e-4, 10, None])


@pytest.mark.parametrize("densities,match", [
    ({}, "non-empty mapping"),
    ((np.linspace(0, 1, 5), np.ones(4)), "differs from grid shape"),
    ((np.linspace(0, 1, 3), np.array([1.0, -0.1, 1.0])), "cannot be negative"),
    ((np.linspace(0, 1, 3), np.zeros(3)), "zero everywhere"),
    ((np.array([0.0, 1.0, 0.5]), np.ones(3)), "strictly increasing"),
    ((np.array([]), np.array([])), "empty"),
    ((np.linspace(0, 1, 3), np.array([1.0, np.inf, 1.0])), "NaN or infinite"),
])
def test_spectral_density_rejects_bad_input(densities, match):
    with pytest.raises(ValueError, match=match):
        viz.spectral_density(densities)


def test_spectral_density_rejects_bad_options():
    with pytest.raises(TypeError, match="SpectralDensity"):
        viz.spectral_density({"a": np.ones(3)})
    with pytest.raises(ValueError, match="floor must be positive and below"):
        viz.spectral_density(_spectrum(), floor=100.0)
    with pytest.raises(ValueError, match="marker 'λ'"):
        viz.spectral_density(_spectrum(), markers={"λ": [1.0, np.nan]})


def test_colour_registry_is_stable_and_distinct():
    names = [f"method {i}" for i in range(len(viz.PALETTE))]
    first = [viz.color(n) for n in names]
    assert len(set(first)) == len(viz.PALETTE)                 # distinct while the palette lasts
    assert [viz.color(n) for n in reversed(names)] == first[::-1]  # stable: asked again, same colour
    assert viz.color("method 3") == first[3]
    with pytest.warns(UserWarning, match="colours repeat"):
        viz.color("one too many")
    own = viz.Colors(["SWA", "SGD"])
    assert own("SGD") == viz.PALETTE[1] and own("SWA") == viz.PALETTE[0] and own.names() == ["SWA", "SGD"]
    assert viz.color("SGD", own) == viz.PALETTE[1] and "SGD" in own and "SWAG" not in own
    reg = viz.reset_colors(["SGD"])
    assert viz.color("SGD") == viz.PALETTE[0] and reg.names() == ["SGD"]
    with pytest.raises(ValueError, match="non-empty palette"):
        viz.Colors(palette=[])


def test_one_colour_per_method_across_a_chapters_figures():
    rel = ensembles.reliability(REL_PROBS, REL_Y, 10)
    viz.reliability_diagram({"SWA": rel, "SGD": rel})
    spec = viz.spectral_density({"SGD": _spectrum()})
    con = viz.contour(_bowl(), points={"SGD": (0, 0), "SWA": (0.1, 0)})
    assert spec.data[0].line.color == con.data[1].marker.color == viz.color("SGD") == viz.PALETTE[1]
    assert con.data[2].marker.color == viz.PALETTE[0]


def test_label_renders_notation_as_html_math():
    assert viz.label("λ_max(H_B)") == "λ<sub>max</sub>(H<sub>B</sub>)"
    assert viz.label("θ^ℓ(α)") == "θ<sup>ℓ</sup>(α)"
    assert viz.label("η_max") == "η<sub>max</sub>" and viz.label("α_SWA") == "α<sub>SWA</sub>"
    assert viz.label("log10 loss") == "log<sub>10</sub> loss"
    assert viz.label("x_{i+1}^{2}") == "x<sub>i+1</sub><sup>2</sup>"
    assert viz.label(r"file\_name") == "file_name" and viz.label("SGD") == "SGD"
    once = viz.label("2/λ_max(H_B), θ^*")
    assert viz.label(once) == once and once == "2/λ<sub>max</sub>(H<sub>B</sub>), θ<sup>*</sup>"


def test_theme_reads_on_light_and_dark_pages():
    import plotly.io as pio
    name = viz._theme()
    t = pio.templates[name].layout
    assert t.paper_bgcolor == t.plot_bgcolor == "rgba(0,0,0,0)"
    assert t.font.color == viz.INK and t.autosize

    def luminance(hexcolor):
        c = [int(hexcolor[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        c = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    ink = luminance(viz.INK)
    assert (1.05 / (ink + 0.05)) >= 4.4 and ((ink + 0.05) / 0.05) >= 4.4   # on white and on black
    with pytest.raises(ValueError, match="legend must be"):
        viz.apply_layout(go.Figure(), legend="left")


# the boxes of every text and plot element of a figure, and which of them overlap
_BOXES = """
const gd = document.getElementById('g');
const R = el => { const b = el.getBoundingClientRect(); return {x0: b.left, y0: b.top, x1: b.right, y1: b.bottom}; };
const items = [];
const add = (kind, sel) => gd.querySelectorAll(sel).forEach(el => {
  const b = R(el); if (b.x1 - b.x0 > 0.5 && b.y1 - b.y0 > 0.5) items.push({kind, ...b}); });
add('legend', '.legend .bg'); add('colorbar', '.colorbar .cbfills'); add('cbtick', '.colorbar .cbaxis text');
add('cbtitle', '.colorbar .cbtitle text'); add('xtitle', '[class^=g-x] text'); add('ytitle', '[class^=g-y] text');
add('xtick', '.xtick text, .x2tick text'); add('ytick', '.ytick text, .y2tick text');
add('plot', '.cartesianlayer .subplot .bg, .nsewdrag'); add('scene', '.gl-container');
const bad = [['legend','xtitle'],['legend','xtick'],['legend','plot'],['legend','colorbar'],['legend','cbtitle'],
  ['colorbar','ytick'],['colorbar','xtick'],['colorbar','plot'],['cbtick','plot'],['cbtitle','plot'],['xtitle','xtick'],
  ['ytitle','ytick'],['ytitle','plot'],['xtitle','plot'],['ytick','plot'],['xtick','plot'],
  ['legend','scene'],['colorbar','scene'],['cbtick','scene']];
const over = (a, b) => Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0) > 1
  && Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0) > 1;
const out = [];
for (const a of items) for (const b of items)
  if (a !== b && bad.some(([p, q]) => a.kind === p && b.kind === q) && over(a, b)) out.push(a.kind + ' × ' + b.kind);
const f = R(gd);
for (const a of items)
  if (a.x0 < f.x0 - 1 || a.x1 > f.x1 + 1 || a.y0 < f.y0 - 1 || a.y1 > f.y1 + 1) out.push(a.kind + ' outside');
return {overlaps: out, kinds: [...new Set(items.map(a => a.kind))], scroll: document.documentElement.scrollWidth};
"""


@pytest.mark.slow
def test_new_figures_have_no_overlapping_text_in_a_browser(tmp_path):
    """Draw each new figure in headless Chromium at 900 px and at a 390 px phone width: no legend,
    colorbar or axis title box covers a plot area, tick labels or another such box, nothing is
    drawn outside the figure, and the page does not scroll sideways."""
    import shutil
    import time

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("needs Chromium and ChromeDriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    gen = torch.Generator().manual_seed(0)
    rels = {name: ensembles.reliability(torch.softmax(t * torch.randn(500, 10, generator=gen), 1),
                                        torch.randint(0, 10, (500,), generator=gen), 15)
            for name, t in (("SGD", 3.0), ("SWA", 2.0), ("SWAG", 1.0))}
    figs = {"contour": viz.contour(_bowl(), title="a loss slice",
                                   points={"minimiser": (0, 0), "SGD": (0.2, 0.3), "SWA": (-0.1, 0.1)}),
            "contour3d": viz.contour(_bowl(), surface3d=True, equal_axes=True, points={"SGD": (0.2, 0.3)}),
            "reliability": viz.reliability_diagram(rels, histogram=True),
            "gap": viz.reliability_diagram(rels, style="gap"),
            "spectrum": viz.spectral_density({"B = 16": _spectrum(1.0), "B = 256": _spectrum()},
                                             markers={"λ_max(H_emp)": 9.0})}
    # two panels: a contour with its colorbar above it, and curves beside it (chapter 03's figure)
    two = go.Figure([viz.contour_trace(_bowl(), colorbar=viz.colorbar("test error", above=(0, 0.42))),
                     *viz.point_traces(paths={"Bezier curve": [[-0.5, 0], [0, 0.3], [0.5, 0]]}),
                     go.Scatter(x=[0, 0.5, 1], y=[0.1, 0.3, 0.1], name="Bezier curve", xaxis="x2", yaxis="y2",
                                line=dict(color=viz.color("Bezier curve")), showlegend=False)])
    viz.apply_layout(two, height=460)
    two.update_layout(xaxis=dict(domain=[0, 0.42], title="u"), yaxis=dict(title="v"),
                      xaxis2=dict(domain=[0.58, 1.0], title="t"), yaxis2=dict(anchor="x2", title="test error"))
    figs["two panels"] = two
    shutil.copy(viz.plotly_js_path(), tmp_path / "plotly.min.js")  # loaded once, from the disk cache after
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    problems = {}
    try:
        for name, fig in figs.items():
            # side-by-side panels do not fit a phone (stacking them is issue 16's business)
            for width in (900,) if name == "two panels" else (900, 390):
                page = tmp_path / f"{name}-{width}.html"
                page.write_text("<html><head><meta charset='utf-8'><script src='plotly.min.js'></script></head>"
                                f"<body style='margin:0'><div style='width:{width}px'>{viz.to_html(fig, 'g')}"
                                "</div></body></html>")
                driver.get(page.as_uri())
                for _ in range(50):
                    if driver.execute_script("return !!document.querySelector('#g .main-svg');"):
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
                r = driver.execute_script(_BOXES)
                assert {"plot", "xtick"} <= set(r["kinds"]), (name, width, r["kinds"])  # it drew
                if r["overlaps"] or r["scroll"] > 1000:
                    problems[f"{name} @ {width}px"] = r
    finally:
        driver.quit()
    assert not problems, problems


def test_slider_frames_carry_one_fixed_range_per_axis_covering_every_frame():
    frames = [[go.Scatter(x=[0, 1], y=[0.0, 1.0])], [go.Scatter(x=[0, 2], y=[-3.0, 10.0])]]
    fig = viz.slider_figure(frames, ["a", "b"], slider_title="k")
    for lay in [fig.layout] + [f.layout for f in fig.frames]:
        lo, hi = lay.yaxis.range
        assert lo <= -3.0 and hi >= 10.0 and lay.yaxis.autorange is False
        lo, hi = lay.xaxis.range
        assert lo <= 0 and hi >= 2
    # a one-sided range keeps its given end; the other comes from the data of every frame
    fig = viz.slider_figure(frames, ["a", "b"], slider_title="k",
                            layout=dict(yaxis=dict(range=[-1.0, None], autorange="max")))
    assert fig.layout.yaxis.range[0] == -1.0 and fig.layout.yaxis.range[1] >= 10.0
    assert all(f.layout.yaxis.range[0] == -1.0 for f in fig.frames)
    # log axes are ranged in log10, ranges a frame sets itself are left to it
    logf = viz.slider_figure([[go.Scatter(x=[1, 2], y=[1e-3, 1.0])], [go.Scatter(x=[1, 2], y=[1e-1, 1e2])]],
                             ["a", "b"], slider_title="k", layout=dict(yaxis=dict(type="log")),
                             frame_layouts=[dict(xaxis=dict(range=[0, 3])), dict(xaxis=dict(range=[0, 5]))])
    lo, hi = logf.layout.yaxis.range
    assert lo <= -3 and hi >= 2 and hi < 3
    assert [tuple(f.layout.xaxis.range) for f in logf.frames] == [(0, 3), (0, 5)]


def test_finalize_applies_the_layout_rules_to_any_figure():
    fig = go.Figure([go.Scatter(x=[0, 1], y=[1, 2], name="λ_max(H_B)"),
                     go.Scatter(x=[0, 1], y=[2, 1], name="SGD")])
    fig.update_layout(width=900, legend=dict(x=0.9, y=0.9), xaxis_title="η_max", template="plotly_white")
    viz.finalize(fig)
    assert fig.layout.width is None and fig.layout.autosize
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.yanchor == "bottom"
    assert fig.data[0].name == "λ<sub>max</sub>(H<sub>B</sub>)"
    assert fig.layout.xaxis.title.text == "η<sub>max</sub>"
    assert viz.finalize(fig).data[0].name == "λ<sub>max</sub>(H<sub>B</sub>)"  # idempotent


def test_side_by_side_panels_keep_a_readable_minimum_width():
    one = go.Figure([go.Scatter(x=[0, 1], y=[0, 1])])
    assert "min-width" not in viz.to_html(one, "a")
    two = go.Figure([go.Scatter(x=[0, 1], y=[0, 1]), go.Scatter(x=[0, 1], y=[0, 1], xaxis="x2", yaxis="y2")])
    two.update_layout(xaxis=dict(domain=[0, 0.45]), xaxis2=dict(domain=[0.55, 1]), yaxis2=dict(anchor="x2"))
    html = viz.to_html(two, "b")
    assert f"min-width: {2 * viz.PANEL_MIN_PX}px" in html and 'class="landscape-figure"' in html


def test_side_by_side_panels_get_room_for_the_right_panels_axis_labels():
    fig = go.Figure([go.Scatter(x=[0, 1], y=[0, 1]), go.Scatter(x=[0, 1], y=[0, 1], xaxis="x2", yaxis="y2")])
    fig.update_layout(xaxis=dict(domain=[0, 0.47]), xaxis2=dict(domain=[0.53, 1]),
                      yaxis2=dict(anchor="x2", title="test error"))
    viz.finalize(fig)
    assert fig.layout.xaxis2.domain[0] - fig.layout.xaxis.domain[1] >= viz.PANEL_GAP_TITLED - 1e-9
    wide = go.Figure([go.Scatter(x=[0, 1], y=[0, 1]), go.Scatter(x=[0, 1], y=[0, 1], xaxis="x2", yaxis="y2")])
    wide.update_layout(xaxis=dict(domain=[0, 0.4]), xaxis2=dict(domain=[0.6, 1]), yaxis2=dict(anchor="x2"))
    viz.finalize(wide)
    assert tuple(wide.layout.xaxis.domain) == (0, 0.4) and tuple(wide.layout.xaxis2.domain) == (0.6, 1)


def test_a_row_of_many_panels_still_fits_a_desktop_column():
    fig = go.Figure([go.Scatter(x=[0, 1], y=[0, 1], xaxis=f"x{i}" if i > 1 else "x", yaxis=f"y{i}" if i > 1 else "y")
                     for i in range(1, 6)])
    fig.update_layout(**{f"xaxis{i if i > 1 else ''}": dict(domain=[(i - 1) / 5, i / 5 - 0.02]) for i in range(1, 6)})
    assert f"min-width: {viz.PANEL_ROW_MAX_PX}px" in viz.to_html(fig, "c")
