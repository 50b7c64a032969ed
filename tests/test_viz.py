import plotly.graph_objects as go
import pytest

from landscape_lib import viz


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
