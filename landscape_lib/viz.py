"""Figures: plotly with sliders over precomputed frames, so they work in the static book.

Two places show a chapter's figures:

* **Jupyter / Colab** — :func:`show` calls ``fig.show()``: plotly's own renderer.
* **The static book** — Jupyter Book 1 drops plotly's bare mimetype output, so under the
  book's runner (``LANDSCAPE_BOOK=1``) :func:`show` emits an HTML ``<div>`` plus a
  ``Plotly.newPlot`` call, *without* plotly.js: the build ships ``plotly.min.js`` once as a
  static asset (:func:`plotly_js_path`), so pages stay small and work offline.

Interactivity that must survive without a kernel is a plotly slider over precomputed frames
(:func:`slider_figure`): each slider step swaps in one frame's traces in the browser. Live
``ipywidgets`` controls go in cells tagged ``remove-cell`` (they need a kernel).

The figures the chapters share, each a function returning a ``go.Figure`` (and a trace-level
builder for slider frames and subplots):

* :func:`contour` — a 2-D loss slice ``L(θ + α·δ + β·η)`` (Li et al. 2018, Fig. 1 and 5) with
  **log-scaled levels**: contour levels equally spaced in ``log10 L`` from the slice's minimum
  to its maximum (:func:`contour_levels`), the colorbar labelled in loss units; optionally the
  3-D surface beside it, equal axis scaling and markers for named points;
* :func:`reliability_diagram` — accuracy per confidence bin against the diagonal (Guo et al.
  2017, Fig. 1; the SWAG paper's "accuracy − confidence" form as ``style="gap"``), from
  :func:`landscape_lib.ensembles.reliability`;
* :func:`spectral_density` — a Hessian spectral density ``φ(λ)`` by stochastic Lanczos
  quadrature (Ghorbani et al. 2019; Granziol et al.'s batch-size spectra) on a log ``y`` axis,
  with vertical markers such as λ_max estimates.

The layout rules live here so chapters need not repeat them: one colour per method name
(:func:`color`, a per-chapter registry), the legend horizontal below the plot, the colorbar at the
right edge of the figure, axis titles as Unicode math with HTML sub/superscripts (:func:`label`:
``"λ_max(H_B)"`` → ``"λ<sub>max</sub>(H<sub>B</sub>)"``), and a template (:data:`THEME`) with
transparent backgrounds and mid-grey text and grid that read in light and dark mode.
"""
from __future__ import annotations

import inspect
import itertools
import math
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

TEMPLATE = "plotly_white"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]
_ids = itertools.count(1)


def book_mode() -> bool:
    """Whether figures are rendered for the static book (set by the runner)."""
    return os.environ.get("LANDSCAPE_BOOK", "0") not in ("", "0", "false", "False")


def plotly_js_path() -> Path:
    """The ``plotly.min.js`` shipped with the installed plotly package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():  # pragma: no cover - depends on the plotly build
        raise FileNotFoundError(f"plotly.min.js not found at {path}")
    return path


#: Minimum drawing width of one panel of a side-by-side figure: on a phone such a figure keeps
#: this width per panel and scrolls sideways inside its container instead of shrinking.
PANEL_MIN_PX = 300
#: ... up to this width for the whole row (a row of many small panels still fits a desktop column).
PANEL_ROW_MAX_PX = 720


def _panels(fig) -> int:
    """How many panels sit side by side (distinct x domains of the cartesian axes)."""
    doms = set()
    for name in fig.layout:
        if re.fullmatch(r"xaxis\d*", name):
            d = fig.layout[name].domain
            doms.add(tuple(round(float(v), 3) for v in d) if d is not None else (0.0, 1.0))
    return max(1, len(doms))


def _label_titles(obj) -> None:
    """:func:`label` on an axis's or colorbar's title text, in place."""
    t = getattr(obj, "title", None)
    if t is not None and getattr(t, "text", None):
        t.text = label(t.text)


#: Gap between side-by-side panels, as a fraction of the figure width: room for the right
#: panel's tick labels, and its axis title when it has one, at :data:`PANEL_MIN_PX` per panel.
PANEL_GAP = 0.12
PANEL_GAP_TITLED = 0.2


def _space_panels(fig) -> None:
    """Widen the gaps between side-by-side panels where the right panel's y tick labels (and
    title) would otherwise reach into the panel on its left."""
    lay = fig.layout
    xs = {}
    for name in lay:
        m = re.fullmatch(r"xaxis(\d*)", name)
        if m and lay[name].domain is not None:
            xs["x" + m.group(1)] = name
    if len(xs) < 2:
        return
    titled = {}
    for name in lay:
        if re.fullmatch(r"yaxis\d*", name):
            ax = lay[name]
            anchor = ax.anchor or ("x" + name[5:])
            if ax.overlaying is None and ax.side != "right" and ax.showticklabels is not False:
                titled[anchor] = titled.get(anchor, False) or bool(ax.title and ax.title.text)
    doms = sorted({tuple(lay[n].domain) for n in xs.values()})
    if len(doms) < 2 or any(b[0] < a[1] - 1e-9 for a, b in zip(doms, doms[1:])):
        return  # overlapping domains: not a row of panels
    new = {d: list(d) for d in doms}
    for a, b in zip(doms, doms[1:]):
        right = [k for k, n in xs.items() if tuple(lay[n].domain) == b]
        need = PANEL_GAP_TITLED if any(titled.get(k) for k in right) else PANEL_GAP
        if not any(k in titled for k in right):
            continue  # no left-side y axis on the right panel
        gap = new[b][0] - new[a][1]
        if gap < need:
            mid = (new[a][1] + new[b][0]) / 2
            new[a][1] = max(new[a][0] + 0.05, mid - need / 2)
            new[b][0] = min(new[b][1] - 0.05, mid + need / 2)
    for n in xs.values():
        d = tuple(lay[n].domain)
        if list(d) != new[d]:
            lay[n].domain = new[d]


def finalize(fig):
    """The layout rules every figure gets when it is shown (:func:`show`), so no chapter can
    get them wrong: the book's template (:data:`THEME`), a responsive width (no fixed pixel
    width), the legend horizontal below the plot (:data:`LEGEND_BELOW`, below the slider of a
    slider figure), and notation rendered by :func:`label` in axis titles, colorbar titles,
    legend entries and the title, in the figure and in every slider frame. Returns ``fig``."""
    lay = fig.layout
    fig.update_layout(template=_theme(), autosize=True, width=None)
    _space_panels(fig)
    if lay.showlegend is not False:
        fig.update_layout(legend=LEGEND_BELOW)
        if lay.margin.b is None or lay.margin.b < 40:
            fig.update_layout(margin=dict(b=40))
    if lay.title is not None and lay.title.text:
        lay.title.text = label(lay.title.text)
    for name in lay:
        if re.fullmatch(r"[xy]axis\d*", name):
            _label_titles(lay[name])
    if lay.scene is not None:
        for ax in (lay.scene.xaxis, lay.scene.yaxis, lay.scene.zaxis):
            _label_titles(ax)
    traces = list(fig.data) + [t for f in (fig.frames or ()) for t in (f.data or ())]
    for t in traces:
        if getattr(t, "name", None):
            t.name = label(t.name)
        cb = getattr(t, "colorbar", None)
        if cb is not None:
            _label_titles(cb)
    for f in fig.frames or ():
        if f.layout is not None and f.layout.title is not None and f.layout.title.text:
            f.layout.title.text = label(f.layout.title.text)
    return fig


def to_html(fig, div_id: str | None = None) -> str:
    """A figure as an HTML fragment that expects ``window.Plotly`` to be loaded already, in a
    ``landscape-figure`` container that never overflows the text column; side-by-side panels
    keep :data:`PANEL_MIN_PX` each (the container scrolls sideways on a phone)."""
    div_id = div_id or f"landscape-fig-{next(_ids)}"
    # auto_play=False: plotly would otherwise run through every slider frame on page load and
    # leave the figure on the last one.
    inner = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, auto_play=False,
                        config={"displaylogo": False, "responsive": True})
    n = _panels(fig)
    style = f' style="min-width: {min(n * PANEL_MIN_PX, PANEL_ROW_MAX_PX)}px"' if n > 1 else ""
    return f'<div class="landscape-figure"><div{style}>{inner}</div></div>'


def show(fig) -> None:
    """Display a plotly figure (after :func:`finalize`): HTML for the book, plotly's renderer
    elsewhere."""
    finalize(fig)
    if book_mode():
        from IPython.display import HTML, display

        display(HTML(to_html(fig)))
    else:
        fig.show()


def _axis_values(t, letter: str) -> np.ndarray:
    """The finite numeric values a trace puts on its ``x`` or ``y`` axis (empty if categorical,
    or if the trace type's extent is not its data, e.g. a histogram's counts)."""
    if t.type not in ("scatter", "scattergl", "contour", "heatmap", "bar"):
        return np.zeros(0)
    if t.type == "bar" and letter == ("y" if (t.orientation or "v") == "v" else "x"):
        v = np.asarray(t[letter] if t[letter] is not None else [], dtype=object)
        base = t.base if t.base is not None else 0.0
        try:
            top = v.astype(np.float64) + np.asarray(base, dtype=np.float64)
        except (TypeError, ValueError):
            return np.zeros(0)
        return np.concatenate([top.ravel(), np.atleast_1d(np.asarray(base, dtype=np.float64)).ravel()])
    v = t[letter]
    if v is None:
        return np.zeros(0)
    try:
        a = np.asarray([np.nan if x is None else x for x in np.asarray(v, dtype=object).ravel()], dtype=np.float64)
    except (TypeError, ValueError):
        return np.zeros(0)  # categorical
    return a[np.isfinite(a)]


def _fixed_ranges(fig, frames, static, frame_layouts) -> dict:
    """Explicit ``range`` for every cartesian axis that the layout leaves to autorange and no
    frame layout sets: the extent of that axis's data over **all** frames and the static traces
    (5 % padding; in log10 for a log axis). Animated frames then cannot rescale or collapse an
    axis (plotly's animation does not keep autorange settings), and every frame shows the same
    scale, so what moves is the data."""
    set_by_frames = set()
    for fl in frame_layouts or ():
        for k, v in (fl or {}).items():
            if isinstance(v, dict) and "range" in v:
                set_by_frames.add(k)
            elif k.endswith("_range"):
                set_by_frames.add(k[:-len("_range")])
    values: dict[str, list[np.ndarray]] = {}
    for t in [tr for f in frames for tr in f] + list(static):
        for letter in ("x", "y"):
            ref = getattr(t, letter + "axis", None) or letter
            axis = letter + "axis" + ref[1:]
            values.setdefault(axis, []).append(_axis_values(t, letter))
    out = {}
    for axis, vs in values.items():
        ax = fig.layout[axis] if axis in fig.layout else None
        if axis in set_by_frames or ax is None:
            continue
        given = tuple(ax.range) if ax.range is not None else (None, None)
        if None not in given:
            continue
        if ax.type in ("category", "multicategory", "date"):
            continue
        v = np.concatenate(vs) if vs else np.zeros(0)
        if ax.type == "log":
            v = np.log10(v[v > 0])
        if v.size == 0:
            continue
        lo, hi = float(v.min()), float(v.max())
        pad = 0.05 * (hi - lo) if hi > lo else max(0.5 * abs(lo), 0.5)
        rng = [lo - pad, hi + pad]
        if isinstance(ax.autorange, str) and "reversed" in ax.autorange:
            rng = rng[::-1]
        # a one-sided range (e.g. ``autorange="max"`` with ``range=[0, None]``) keeps its given end
        rng = [g if g is not None else r for g, r in zip(given, rng)]
        out[axis] = dict(range=rng, autorange=False)
    return out


def _merge_layouts(base: dict, extra: dict | None) -> dict:
    """``base`` updated by ``extra`` one axis deep (a frame's own ranges win)."""
    out = {k: dict(v) for k, v in base.items()}
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def slider_figure(frames: Sequence[Sequence], labels: Sequence[str], *, slider_title: str,
                  static: Sequence = (), active: int = 0, layout: dict | None = None,
                  frame_layouts: Sequence[dict] | None = None):
    """A figure whose slider swaps between precomputed frames.

    ``frames[i]`` is the list of traces to show at slider position ``i`` (every frame has the
    same number of traces, in the same roles); ``static`` traces stay fixed underneath.
    ``frame_layouts[i]``, if given, is a layout update applied with frame ``i`` (e.g. axis
    ranges that change with a radius). The slider animates between named plotly frames with
    zero duration, which plotly.js does in the browser without a kernel.
    """
    import plotly.graph_objects as go

    if not frames:
        raise ValueError("a slider needs at least one frame")
    if len(frames) != len(labels):
        raise ValueError(f"{len(frames)} frames but {len(labels)} labels")
    n = len(frames[0])
    if any(len(f) != n for f in frames):
        raise ValueError("every frame must have the same number of traces")
    if not 0 <= active < len(frames):
        raise ValueError(f"active frame {active} out of range 0..{len(frames) - 1}")
    if frame_layouts is not None and len(frame_layouts) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(frame_layouts)} frame layouts")
    fig = go.Figure(data=list(frames[active]) + list(static))
    fig.update_layout(**(layout or {}))
    fixed = _fixed_ranges(fig, frames, static, frame_layouts)
    fig.update_layout(fixed)
    fig.frames = [go.Frame(data=list(f), traces=list(range(n)), name=str(i),
                           layout=_merge_layouts(fixed, frame_layouts[i] if frame_layouts is not None else None))
                  for i, f in enumerate(frames)]
    steps = [dict(method="animate", label=str(lab),
                  args=[[str(i)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                   "transition": {"duration": 0}}])
             for i, lab in enumerate(labels)]
    fig.update_layout(template=TEMPLATE,
                      sliders=[dict(active=active, steps=steps, pad={"t": 40},
                                    currentvalue={"prefix": f"{slider_title}: "})])
    if frame_layouts is not None:
        fig.update_layout(frame_layouts[active])
    return fig


def line_figure(x, ys: dict, *, title: str = "", xaxis: str = "", yaxis: str = "",
                log_y: bool = False):
    """A plain multi-line figure: ``ys`` maps a legend name to its y values (one colour per name,
    :func:`color`; the layout rules of :func:`apply_layout`)."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=np.asarray(x), y=np.asarray(v), mode="lines", name=label(k),
                                line=dict(color=color(k)))
                     for k, v in ys.items()])
    apply_layout(fig, title=title, height=420, xaxis=xaxis, yaxis=yaxis)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def interact(fn: Callable, **controls):
    """``ipywidgets.interact(fn, **controls)`` for a chapter's live cell in Jupyter or Colab.

    Under the book's runner (:func:`book_mode`) it calls ``fn`` once with the controls' initial
    values (what ``interact`` shows first: a widget's ``value``, a list's first item, a plain
    value as it is) and creates no interactive widget. The live cells are removed from the
    static book anyway, and nbclient lost the reply of an ``interact`` cell in about 1 of 20
    executions under load (2 of 40 runs of a three-cell notebook hung; 0 of 40 without
    ``interact``), which stalled a chapter until its timeout. The function still runs, so the
    runner still tests it.
    """
    if not book_mode():
        import ipywidgets

        return ipywidgets.interact(fn, **controls)

    def initial(name, control):
        if hasattr(control, "value"):
            return control.value
        if isinstance(control, (list, dict)):
            if not control:
                raise ValueError(f"control {name!r} has no options")
            return next(iter(control))
        if isinstance(control, tuple):
            raise TypeError(f"control {name!r}: pass a widget instead of a (min, max, step) tuple")
        return control

    return fn(**{k: initial(k, v) for k, v in controls.items()})


def show_source(obj: Callable | type) -> None:
    """Show the source of a library function or class (the reader sees what runs)."""
    from IPython.display import Code, display

    display(Code(inspect.getsource(obj), language="python"))


def provenance(start: float, device) -> str:
    """One line: the profile and seed the page's figures come from (and whether the data were
    stand-ins), library, torch and Python versions, device, and wall time since ``start``."""
    import torch

    from . import __version__
    from .config import current
    from .data import stand_in

    s = current()
    run = "" if s is None else (f"profile {s.profile} · seed {s.seed}"
                                f"{' · stand-in data' if stand_in() else ''} · ")
    line = (f"{run}landscape_lib {__version__} · torch {torch.__version__} · Python "
            f"{platform.python_version()} · device {device} · {torch.get_num_threads()} thread(s) · "
            f"wall time {time.time() - start:.1f} s")
    print(line)
    return line


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def table_html(rows: Sequence[dict], digits: int = 4) -> str:
    """Rows of dicts (same keys) as an HTML table in a horizontally scrolling container.

    Floats are shown with ``digits`` significant digits; numeric cells are right-aligned
    (``class="num"``) so that columns of numbers line up; the book's stylesheet gives the table
    padding, rules and a header row, the same as the claims tables.
    """
    import html

    if not rows:
        return "<p>(no rows)</p>"
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.{digits}g}"
        return str(v)

    def cell(v):
        cls = ' class="num"' if _is_number(v) else ""
        return f"<td{cls}>{html.escape(fmt(v))}</td>"

    numeric = {c: all(_is_number(r.get(c)) for r in rows) for c in cols}
    num = ' class="num"'
    head = "".join(f"<th{num if numeric[c] else ''}>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in cols) + "</tr>" for r in rows)
    return (f'<div class="table-scroll"><table class="results-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def table(rows: Sequence[dict], digits: int = 4) -> None:
    """Display rows of results as a table (HTML in notebooks and in the book)."""
    from IPython.display import HTML, display

    display(HTML(table_html(rows, digits)))


# --- the look: one template for light and dark pages -----------------------------------------

#: Template of the figures below: ``plotly_white`` with transparent paper and plot backgrounds,
#: so the page's own background (light or dark) shows through, and text, axis lines and grid in a
#: mid-grey that reads on both (``#777``: contrast 4.5:1 on white, 4.7:1 on black).
THEME = "landscape"
INK = "#777777"
GRID = "rgba(128, 128, 128, 0.28)"
#: Colour of reference marks that belong to no method (the diagonal, a zero line).
NEUTRAL = "#999999"


def _theme() -> str:
    """Register :data:`THEME` with plotly once and return its name."""
    import plotly.graph_objects as go
    import plotly.io as pio

    if THEME not in pio.templates:
        t = go.layout.Template(pio.templates["plotly_white"])
        axis = dict(gridcolor=GRID, linecolor=GRID, zerolinecolor=GRID, tickcolor=INK,
                    title=dict(font=dict(color=INK)))
        scene_axis = dict(gridcolor=GRID, linecolor=GRID, zerolinecolor=GRID, showbackground=False,
                          title=dict(font=dict(color=INK)))
        t.layout.update(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
                        font=dict(color=INK), colorway=PALETTE, autosize=True,
                        xaxis=axis, yaxis=axis, legend=dict(bgcolor="rgba(0,0,0,0)"),
                        scene=dict(xaxis=scene_axis, yaxis=scene_axis, zaxis=scene_axis,
                                   bgcolor="rgba(0,0,0,0)"),
                        hoverlabel=dict(font=dict(color="#111111")))
        pio.templates[THEME] = t
    return THEME


# --- notation ---------------------------------------------------------------------------------

_SUB = re.compile(r"_\{([^{}]*)\}|_([^\W_]+)")
_SUP = re.compile(r"\^\{([^{}]*)\}|\^(-?[^\W_]+|[*′+−-])")
_LOG10 = re.compile(r"\blog10\b")


def label(text: str) -> str:
    """Plain math notation as plotly's HTML subset, the same way in every figure.

    ``x_ab`` / ``x_{a b}`` → ``x<sub>ab</sub>``, ``x^2`` / ``x^{n+1}`` → ``x<sup>2</sup>``,
    ``log10`` → ``log<sub>10</sub>``; ``\\_`` and ``\\^`` stay literal. A subscript runs over
    letters and digits (Greek too): ``λ_max(H_B)`` → ``λ<sub>max</sub>(H<sub>B</sub>)``. Text
    that is already HTML passes through unchanged, so applying it twice changes nothing.
    """
    text = str(text).replace(r"\_", "\x00").replace(r"\^", "\x01")
    text = _SUB.sub(lambda m: f"<sub>{m.group(1) if m.group(1) is not None else m.group(2)}</sub>", text)
    text = _SUP.sub(lambda m: f"<sup>{m.group(1) if m.group(1) is not None else m.group(2)}</sup>", text)
    text = _LOG10.sub("log<sub>10</sub>", text)
    return text.replace("\x00", "_").replace("\x01", "^")


def _fmt(v: float, digits: int = 3) -> str:
    """A number for a tick label: ``0.05``, ``2.5``, ``10<sup>−5</sup>``, ``2×10<sup>−5</sup>``."""
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.{digits}g}"
    s = re.sub(r"\.?0+e", "e", f"{v:.{digits - 1}e}")  # 2.50e-07 → 2.5e-07, 1.00e+05 → 1e+05
    mant, exp = s.split("e")
    power = f"10<sup>{int(exp)}</sup>".replace("-", "−")
    return power if mant in ("1", "1.0") else f"{mant}×{power}"


# --- one colour per method name -------------------------------------------------------------

#: :data:`COLORS` first (the chapters' colours so far), then fourteen more distinct ones.
PALETTE = COLORS + ["#393b79", "#e7969c", "#637939", "#ad494a", "#3182bd", "#e6550d", "#31a354",
                    "#756bb1", "#636363", "#843c39", "#7b4173", "#bd9e39", "#6baed6", "#fd8d3c"]


class Colors:
    """A registry that gives each name its own colour, the first time it is asked, and the same
    one afterwards: SGD is the same blue in every figure of a chapter.

    Names get :data:`PALETTE` colours in the order they are first seen (``Colors(["SGD",
    "SWA"])`` fixes an order up front). Past the palette's length colours repeat, with a
    warning. Use the name of the method, not of a trace (``"SGD"``, not ``"SGD, seed 0"``).
    """

    def __init__(self, names: Sequence[str] = (), palette: Sequence[str] = PALETTE):
        if not palette:
            raise ValueError("a colour registry needs a non-empty palette")
        self.palette = list(palette)
        self._map: dict[str, str] = {}
        for n in names:
            self(n)

    def __call__(self, name: str) -> str:
        name = str(name)
        if name not in self._map:
            i = len(self._map)
            if i == len(self.palette):
                warnings.warn(f"more than {len(self.palette)} names in one colour registry: colours "
                              f"repeat from {name!r} on", stacklevel=2)
            self._map[name] = self.palette[i % len(self.palette)]
        return self._map[name]

    def __contains__(self, name: object) -> bool:
        return str(name) in self._map

    def names(self) -> list[str]:
        """The names seen so far, in the order their colours were given."""
        return list(self._map)


_colors = Colors()


def color(name: str, colors: Colors | None = None) -> str:
    """The colour of ``name``: from ``colors``, or from the chapter's registry (one per kernel,
    so one per chapter; :func:`reset_colors` starts it over)."""
    return (colors if colors is not None else _colors)(name)


def reset_colors(names: Sequence[str] = ()) -> Colors:
    """Start the chapter's colour registry over, optionally fixing the order of ``names``."""
    global _colors
    _colors = Colors(names)
    return _colors


# --- layout rules -----------------------------------------------------------------------------

#: The legend horizontal below the plot, left-aligned: it never covers data or a colorbar, and
#: on a phone it wraps into rows instead of taking half the width. ``yref="container"`` anchors
#: it to the bottom of the figure; plotly enlarges the bottom margin to hold it, below the x-axis
#: title.
LEGEND_BELOW = dict(orientation="h", xref="container", x=0.02, xanchor="left",
                    yref="container", y=0.01, yanchor="bottom", bgcolor="rgba(0,0,0,0)")


def colorbar(title: str = "", *, above: Sequence[float] | None = None, **kw) -> dict:
    """Where a colorbar goes so that it covers no plot area and no tick labels.

    By default a vertical bar at the right edge of the figure (past every plot area), as long as
    the plot area, its title written along it. ``above=(x0, x1)``, the x domain of one panel of
    a multi-panel figure: a horizontal bar just above that panel and as wide as it, its title
    on its left (so a neighbouring panel's tick labels stay free; give that panel no subplot
    title). ``kw`` overrides any of these.
    """
    if above is None:
        base = dict(title=dict(text=label(title), side="right"), x=1.0, xref="paper", xanchor="left",
                    xpad=12, len=1.0, lenmode="fraction", y=0.5, yanchor="middle", thickness=14,
                    outlinewidth=0)
    else:
        x0, x1 = (float(v) for v in above)
        if not 0.0 <= x0 < x1 <= 1.0:
            raise ValueError("above must be a panel's x domain (x0, x1) with 0 <= x0 < x1 <= 1, "
                             f"got {above!r}")
        base = dict(title=dict(text=label(title), side="top"), orientation="h", x=(x0 + x1) / 2,
                    xref="paper", xanchor="center", len=x1 - x0, lenmode="fraction", y=1.02,
                    yref="paper", yanchor="bottom", ypad=4, thickness=10, outlinewidth=0)
    return {**base, **kw}


def apply_layout(fig, *, title: str = "", height: int | None = None, legend: str = "below",
                 xaxis: str | None = None, yaxis: str | None = None):
    """The layout rules: :data:`THEME`, responsive width, the legend below the plot
    (``legend="below"``; ``"none"`` hides it), clean titles (:func:`label`)."""
    if legend not in ("below", "none"):
        raise ValueError(f"legend must be 'below' or 'none', got {legend!r}")
    fig.update_layout(template=_theme(), autosize=True, height=height,
                      title=dict(text=label(title)) if title else None,
                      margin=dict(l=60, r=30, t=50 if title else 20, b=40),
                      showlegend=legend == "below", legend=LEGEND_BELOW)
    if xaxis is not None:
        fig.update_layout(xaxis_title=label(xaxis))
    if yaxis is not None:
        fig.update_layout(yaxis_title=label(yaxis))
    return fig


# --- contour / surface of a 2-D slice -------------------------------------------------------

@dataclass(frozen=True)
class Levels:
    """Equally spaced contour levels in the drawing scale ``s``: ``s = log10 v`` when ``log``,
    else ``s = v``. Levels at ``start, start + size, …, end`` (plotly's contour takes exactly
    this form)."""

    start: float
    end: float
    size: float
    log: bool

    @property
    def n(self) -> int:
        return round((self.end - self.start) / self.size) + 1

    def scaled(self) -> np.ndarray:
        """The levels in the drawing scale."""
        return np.linspace(self.start, self.end, self.n)

    def values(self) -> np.ndarray:
        """The levels in the data's own units (loss values)."""
        return 10.0 ** self.scaled() if self.log else self.scaled()

    def transform(self, v) -> np.ndarray:
        """Data values into the drawing scale."""
        v = np.asarray(v, dtype=np.float64)
        return np.log10(v) if self.log else v


def _finite_values(v, what: str = "values") -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        raise ValueError(f"no {what} to draw (empty array)")
    bad = int((~np.isfinite(v)).sum())
    if bad:
        raise ValueError(f"{bad} of {v.size} {what} are NaN or infinite: replace or clip them before "
                         f"drawing (e.g. np.minimum(v, cap) for diverged points)")
    return v


def _log_ready(v: np.ndarray, floor: float | None, what: str = "values") -> np.ndarray:
    """Values ready for log10: all positive, or raised to ``floor`` when the caller gave one."""
    if floor is not None:
        if not (math.isfinite(floor) and floor > 0):
            raise ValueError(f"floor must be a positive number, got {floor!r}")
        return np.maximum(v, floor)
    bad = int((v <= 0).sum())
    if bad:
        raise ValueError(f"log-scaled levels need positive {what}: {bad} of {v.size} are <= 0 (min "
                         f"{v.min():.3g}); pass floor=<a positive value> to draw them at that floor, "
                         f"or log=False for linear levels")
    return v


def contour_levels(values, n_levels: int = 20, *, log: bool = True, lo: float | None = None,
                   hi: float | None = None, clip: float = 0.0, floor: float | None = None) -> Levels:
    """``n_levels`` contour levels equally spaced in ``log10`` of the values (``log=True``) or in
    the values themselves.

    By default the first level is the minimum and the last the maximum of ``values`` (one array
    or several surfaces' values together, for levels shared by slider frames): spaced in log10,
    levels crowd where the loss is small, so the basin around the minimum gets contours, and the
    walls get about as many per decade. ``lo``/``hi`` set the ends explicitly; ``clip`` (a
    fraction in [0, 0.5)) puts the top level at the ``1 − clip`` quantile, so a few diverged
    corners do not take most of the levels (points above it are drawn in the top colour).
    A constant slice gets levels half a decade (or half a unit) either side of its value.
    With ``log=True`` every value must be positive, unless ``floor`` raises the smaller ones to
    it (say so in the figure's text if you do).
    """
    if isinstance(n_levels, bool) or not isinstance(n_levels, (int, np.integer)) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"clip must be a fraction in [0, 0.5), got {clip!r}")
    v = _finite_values(values).ravel()
    if log:
        v = _log_ready(v, floor)
    lo = float(v.min()) if lo is None else float(lo)
    hi = float(np.quantile(v, 1.0 - clip)) if hi is None else float(hi)
    if log and not (lo > 0 and hi > 0):
        raise ValueError(f"log-scaled levels need positive ends, got lo={lo:.3g}, hi={hi:.3g}")
    if hi < lo:
        raise ValueError(f"the top level {hi:.3g} lies below the bottom level {lo:.3g}")
    s0, s1 = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
    if s1 - s0 <= 1e-12 * max(1.0, abs(s0)):
        s0, s1 = s0 - 0.5, s1 + 0.5
    return Levels(s0, s1, (s1 - s0) / (n_levels - 1), bool(log))


def _explicit_levels(levels, log: bool) -> Levels:
    lv = _finite_values(levels, "levels").ravel()
    if lv.size < 2 or np.any(np.diff(lv) <= 0):
        raise ValueError("explicit levels must be at least two increasing values")
    if log and lv[0] <= 0:
        raise ValueError(f"log-scaled levels must be positive, got {lv[0]:.3g}")
    s = np.log10(lv) if log else lv
    steps = np.diff(s)
    if not np.allclose(steps, steps.mean(), rtol=1e-6, atol=0):
        raise ValueError("plotly draws equally spaced contour levels only: give levels equally spaced "
                         + ("in log10 (e.g. np.logspace(-2, 1, 13))" if log else "(e.g. np.linspace(...))")
                         + ", or n_levels with lo/hi")
    return Levels(float(s[0]), float(s[-1]), float(steps.mean()), log)


def log_ticks(start: float, end: float, max_ticks: int = 8) -> tuple[list[float], list[str]]:
    """Colorbar ticks for a log10 scale from ``start`` to ``end`` (in log10): positions in log10
    and labels in the data's units, at the densest of 1-2-…-9, 1-2-3-5-7, 1-2-5, 1-3 and powers of
    ten that gives at most ``max_ticks`` (powers of ten thinned if still too many), at least
    three (else five evenly spaced ticks with three significant digits)."""
    a, b = min(start, end), max(start, end)

    def ticks(mantissas):
        vals = [m * 10.0 ** k for k in range(math.floor(a) - 1, math.ceil(b) + 1) for m in mantissas]
        return [x for x in vals if a - 1e-9 <= math.log10(x) <= b + 1e-9]

    for mantissas in (tuple(range(1, 10)), (1, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,)):
        vals = ticks(mantissas)
        if mantissas == (1,) and len(vals) > max_ticks:
            vals = vals[::math.ceil(len(vals) / max_ticks)]
        if len(vals) <= max_ticks:
            break
    if len(vals) < 3:
        pos = list(np.linspace(a, b, 5))
        return pos, [_fmt(10.0 ** p) for p in pos]
    return [math.log10(x) for x in vals], [_fmt(x) for x in vals]


_FIELDS = {"loss": "loss", "acc": "accuracy", "error": "error"}


def _slice(data, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, z[j, i])`` from a :class:`landscape.Surface` (``field`` picks loss, acc or
    ``error = 1 − acc``) or from an ``(alphas, betas, values)`` triple; shapes checked."""
    if field not in _FIELDS:
        raise ValueError(f"field must be one of {sorted(_FIELDS)}, got {field!r}")
    if all(hasattr(data, k) for k in ("alphas", "betas", "loss")):
        x, y = data.alphas, data.betas
        z = data.loss if field == "loss" else getattr(data, "acc", None)
        if z is None:
            raise ValueError(f"field {field!r} needs a surface with an 'acc' array")
        if field == "error":
            z = 1.0 - np.asarray(z, dtype=np.float64)
    elif isinstance(data, (tuple, list)) and len(data) == 3:
        x, y, z = data
    else:
        raise TypeError("expected a landscape.Surface (alphas, betas, loss) or an (alphas, betas, "
                        f"values) triple, got {type(data).__name__}")
    x = _finite_values(x, "alphas")
    y = _finite_values(y, "betas")
    z = _finite_values(z, field if field != "loss" else "loss values")
    for name, a in (("alphas", x), ("betas", y)):
        if a.ndim != 1 or a.size < 2:
            raise ValueError(f"{name} must be a 1-D grid of at least 2 points, got shape {a.shape}")
        d = np.diff(a)
        if not (np.all(d > 0) or np.all(d < 0)):
            raise ValueError(f"{name} must be strictly monotonic")
    if z.shape != (y.size, x.size):
        raise ValueError(f"values must have shape (len(betas), len(alphas)) = ({y.size}, {x.size}) "
                         f"(rows are β), got {z.shape}")
    return x, y, z


def _resolve_levels(z: np.ndarray, field: str, log: bool | None, levels, n_levels: int,
                    clip: float, floor: float | None) -> Levels:
    if isinstance(levels, Levels):
        if log is not None and bool(log) != levels.log:
            raise ValueError(f"log={log} contradicts the given Levels (log={levels.log})")
        return levels
    log = (field == "loss") if log is None else bool(log)
    if levels is not None:
        return _explicit_levels(levels, log)
    return contour_levels(z, n_levels, log=log, clip=clip, floor=floor)


def contour_trace(data, *, field: str = "loss", log: bool | None = None, levels=None,
                  n_levels: int = 20, clip: float = 0.0, floor: float | None = None,
                  colorscale: str = "Viridis", colorbar_title: str | None = None,
                  showscale: bool = True, hover: tuple[str, str] = ("α", "β"), **trace):
    """One ``go.Contour`` of a 2-D slice, levels as :func:`contour` draws them (for slider frames
    and subplots: pass the same ``levels=contour_levels(all values)`` to every frame that must
    share a colour scale). ``trace`` goes to ``go.Contour`` (``xaxis="x2"``); a ``colorbar``
    dict updates :func:`colorbar`'s placement (in a panel of a multi-panel figure:
    ``colorbar=viz.colorbar("loss", above=(0, 0.42))``)."""
    import plotly.graph_objects as go

    x, y, raw = _slice(data, field)
    lv = _resolve_levels(raw, field, log, levels, n_levels, clip, floor)
    z = lv.transform(_log_ready(raw, floor, _FIELDS[field] + " values") if lv.log else raw)
    title = _FIELDS[field] if colorbar_title is None else colorbar_title
    cb = colorbar(title)
    cb.update(trace.pop("colorbar", {}))
    if lv.log and "tickvals" not in cb:
        cb["tickvals"], cb["ticktext"] = log_ticks(lv.start, lv.end,
                                                   max_ticks=5 if cb.get("orientation") == "h" else 8)
    hx, hy = (label(h) for h in hover)
    return go.Contour(x=x, y=y, z=z, zmin=lv.start, zmax=lv.end, autocontour=False,
                      contours=dict(start=lv.start, end=lv.end, size=lv.size, coloring="fill",
                                    showlines=True),
                      line=dict(width=0.6, color="rgba(255,255,255,0.45)"), colorscale=colorscale,
                      showscale=showscale, colorbar=cb, customdata=raw,
                      hovertemplate=f"{hx} %{{x:.3g}}, {hy} %{{y:.3g}}<br>{label(title)} "
                                    "%{customdata:.4g}<extra></extra>",
                      **trace)


_SYMBOLS = ["circle", "x", "star", "diamond", "square", "triangle-up", "cross", "pentagon"]


def _xy(v, name: str) -> np.ndarray:
    a = _finite_values(v, f"coordinates of {name!r}")
    a = a.reshape(1, 2) if a.shape == (2,) else a
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"point {name!r} must be (x, y) or an array of shape [n, 2], got {a.shape}")
    return a


def point_traces(points: Mapping[str, Any] | None = None, paths: Mapping[str, Any] | None = None, *,
                 colors: Colors | None = None, **trace) -> list:
    """Markers for named points (``{"SWA": (x, y)}``, or ``[n, 2]`` clouds) and lines through
    named paths (``{"SGD": array [n, 2]}``), each in its name's colour with a white outline."""
    import plotly.graph_objects as go

    out = []
    for i, (name, v) in enumerate((points or {}).items()):
        a = _xy(v, name)
        out.append(go.Scatter(x=a[:, 0], y=a[:, 1], mode="markers", name=label(name),
                              marker=dict(color=color(name, colors), symbol=_SYMBOLS[i % len(_SYMBOLS)],
                                          size=12 if len(a) == 1 else 6,
                                          line=dict(color="white", width=1.2)), **trace))
    for name, v in (paths or {}).items():
        a = _xy(v, name)
        out.append(go.Scatter(x=a[:, 0], y=a[:, 1], mode="lines+markers", name=label(name),
                              line=dict(color=color(name, colors), width=2),
                              marker=dict(size=5, color=color(name, colors)), **trace))
    return out


def contour(data, *, field: str = "loss", log: bool | None = None, levels=None, n_levels: int = 20,
            clip: float = 0.0, floor: float | None = None, points: Mapping[str, Any] | None = None,
            paths: Mapping[str, Any] | None = None, surface3d: bool = False, equal_axes: bool = False,
            title: str = "", xaxis: str = "α", yaxis: str = "β", colorbar_title: str | None = None,
            colorscale: str = "Viridis", height: int | None = None, colors: Colors | None = None):
    """A contour figure of a 2-D slice, optionally with its 3-D surface beside it.

    ``data``: a :class:`landscape.Surface` (``loss[j, i]`` at ``(alphas[i], betas[j])``) or an
    ``(alphas, betas, values)`` triple; ``field`` picks ``"loss"`` (default), ``"acc"`` or
    ``"error"`` (1 − acc) of a Surface. ``log`` (default: on for loss, off otherwise) spaces the
    levels equally in log10 of the values and labels the colorbar in the values' own units;
    ``n_levels``, ``clip`` and ``floor`` as in :func:`contour_levels`; ``levels`` is a
    :class:`Levels` (shared between figures) or explicit values, equally spaced in the drawing
    scale (``np.logspace`` for log). ``points``/``paths`` mark named points and paths
    (:func:`point_traces`; the contour panel only). ``equal_axes`` draws one unit of α as long as
    one of β.
    """
    import plotly.graph_objects as go

    base = contour_trace(data, field=field, log=log, levels=levels, n_levels=n_levels, clip=clip,
                         floor=floor, colorscale=colorscale, colorbar_title=colorbar_title,
                         hover=(xaxis, yaxis))
    marks = point_traces(points, paths, colors=colors)
    if not surface3d:
        fig = go.Figure([base, *marks])
        apply_layout(fig, title=title, height=height or 480, xaxis=xaxis, yaxis=yaxis,
                     legend="below" if marks else "none")
    else:
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, specs=[[{"type": "xy"}, {"type": "scene"}]],
                            horizontal_spacing=0.1)
        fig.add_trace(base, row=1, col=1)
        for m in marks:
            fig.add_trace(m, row=1, col=1)
        c = base.contours
        fig.add_trace(go.Surface(x=base.x, y=base.y, z=base.z, cmin=base.zmin, cmax=base.zmax,
                                 colorscale=colorscale, showscale=False, customdata=base.customdata,
                                 hovertemplate=base.hovertemplate,
                                 contours=dict(z=dict(show=True, start=c.start, end=c.end, size=c.size,
                                                      usecolormap=False, color="rgba(255,255,255,0.5)",
                                                      width=1))), row=1, col=2)
        apply_layout(fig, title=title, height=height or 480, legend="below" if marks else "none")
        fig.update_xaxes(title_text=label(xaxis), row=1, col=1)
        fig.update_yaxes(title_text=label(yaxis), row=1, col=1)
        zaxis = dict(title=dict(text=base.colorbar.title.text))
        if base.colorbar.tickvals is not None:
            zaxis["tickvals"], zaxis["ticktext"] = log_ticks(c.start, c.end, max_ticks=5)
        x, y = np.asarray(base.x), np.asarray(base.y)
        ratio = float(np.ptp(y) / np.ptp(x)) if equal_axes else 1.0
        fig.update_scenes(xaxis_title_text=label(xaxis), yaxis_title_text=label(yaxis), zaxis=zaxis,
                          aspectmode="manual", aspectratio=dict(x=1, y=ratio, z=0.7))
    if equal_axes:
        fig.update_yaxes(scaleanchor="x", scaleratio=1, constrain="domain")
    return fig


# --- reliability diagram ----------------------------------------------------------------------

_REL_KEYS = ("edges", "confidence", "accuracy", "count")


def _reliabilities(results) -> dict[str, dict[str, np.ndarray]]:
    """``{name: bins}`` from one :func:`ensembles.reliability` dict or a mapping of them."""
    if isinstance(results, Mapping) and "edges" in results:
        results = {"model": results}
    if not isinstance(results, Mapping) or not results:
        raise ValueError("expected ensembles.reliability(...) output, or a non-empty mapping from "
                         "method name to such output")
    out, edges0 = {}, None
    for name, r in results.items():
        missing = [k for k in _REL_KEYS if k not in r]
        if missing:
            raise ValueError(f"{name!r}: not ensembles.reliability output (missing {missing})")
        e = np.asarray(r["edges"], dtype=np.float64)
        conf, acc = (np.asarray(r[k], dtype=np.float64) for k in ("confidence", "accuracy"))
        cnt = np.asarray(r["count"], dtype=np.int64)
        nb = e.size - 1
        if nb < 1 or not all(a.shape == (nb,) for a in (conf, acc, cnt)):
            raise ValueError(f"{name!r}: {e.size} edges need {max(nb, 0)} bins of confidence, accuracy "
                             f"and count, got {conf.shape}, {acc.shape}, {cnt.shape}")
        if cnt.sum() == 0:
            raise ValueError(f"{name!r}: the bins hold no points")
        if edges0 is not None and (e.shape != edges0.shape or not np.allclose(e, edges0)):
            raise ValueError(f"{name!r}: every method must use the same bins (n_bins)")
        edges0 = e
        out[str(name)] = dict(edges=e, confidence=conf, accuracy=acc, count=cnt, raw=r)
    return out


def _check_style(style: str, min_count) -> None:
    if style not in ("bars", "gap"):
        raise ValueError(f"style must be 'bars' or 'gap', got {style!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")


def _slots(edges: np.ndarray, m: int, n_methods: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres and widths of method ``m``'s bars: in each bin a 5 % margin either side, the
    methods' slots side by side in the middle 90 %."""
    width = 0.9 * np.diff(edges) / n_methods
    return edges[:-1] + 0.05 * np.diff(edges) + (m + 0.5) * width, width


def reliability_traces(results, *, style: str = "bars", gap: bool = True, min_count: int = 1,
                       ece: bool = True, reference: bool = True, colors: Colors | None = None,
                       **trace) -> list:
    """The main panel of :func:`reliability_diagram` as traces (for slider frames and subplots):
    per method its accuracy bars (and gap bars) or its accuracy − confidence line, then, with
    ``reference``, the line of perfect calibration. ``trace`` goes to every trace
    (``xaxis="x2"``)."""
    import plotly.graph_objects as go

    from .ensembles import ece_from_bins

    _check_style(style, min_count)
    rels = _reliabilities(results)
    out = []
    for m, (name, r) in enumerate(rels.items()):
        e, conf, acc, cnt = r["edges"], r["confidence"], r["accuracy"], r["count"]
        keep = cnt >= min_count                     # never a bar for an empty bin
        xs, width = _slots(e, m, len(rels))
        c = color(name, colors)
        shown = label(name) + (f" · ECE {ece_from_bins(r['raw']):.3f}" if ece else "")
        info = np.stack([e[:-1], e[1:], cnt, conf, acc], 1)[keep]
        hover = ("bin %{customdata[0]:.2f}–%{customdata[1]:.2f}: %{customdata[2]} points<br>"
                 "confidence %{customdata[3]:.3f}, accuracy %{customdata[4]:.3f}<extra>" + label(name)
                 + "</extra>")
        if style == "bars":
            out.append(go.Bar(x=xs[keep], y=acc[keep], width=width[keep], name=shown, legendgroup=name,
                              marker=dict(color=c, line=dict(width=0)), customdata=info,
                              hovertemplate=hover, **trace))
            if gap:  # from the bin's accuracy to its mean confidence
                out.append(go.Bar(x=xs[keep], y=(conf - acc)[keep], base=acc[keep], width=width[keep],
                                  name=f"{label(name)}: gap to confidence", legendgroup=name,
                                  showlegend=False,
                                  marker=dict(color=c, opacity=0.3, pattern=dict(shape="/", fgcolor=c),
                                              line=dict(color=c, width=1)),
                                  customdata=info, hovertemplate=hover, **trace))
        else:
            out.append(go.Scatter(x=conf[keep], y=(acc - conf)[keep], mode="lines+markers", name=shown,
                                  legendgroup=name, line=dict(color=c), marker=dict(color=c, size=7),
                                  customdata=info, hovertemplate=hover, **trace))
    if reference:  # last, so it lies on top of the bars
        out.append(go.Scatter(x=[0, 1], y=[0, 1] if style == "bars" else [0, 0], mode="lines",
                              name="perfect calibration", line=dict(color=NEUTRAL, dash="dot", width=2),
                              hoverinfo="skip", **trace))
    return out


def reliability_diagram(results, *, style: str = "bars", gap: bool = True, min_count: int = 1,
                        histogram: bool = False, ece: bool = True, title: str = "",
                        height: int | None = None, colors: Colors | None = None):
    """A reliability diagram from :func:`landscape_lib.ensembles.reliability` output.

    ``results``: one reliability dict, or ``{method name: reliability dict}`` (same bins).
    ``style="bars"``: per bin a bar of accuracy (several methods side by side within the bin),
    the diagonal of perfect calibration and, with ``gap``, a translucent hatched bar from the
    accuracy to the bin's mean confidence. ``style="gap"``: accuracy − confidence against mean
    confidence, one line per method, against the zero line (the SWAG paper's form, which shows
    small gaps at high confidence). Bins with fewer than ``min_count`` points (empty ones always)
    are not drawn at all: no bar claims an accuracy a bin does not have. ``histogram`` adds the
    points per bin in a panel below; ``ece`` writes each method's ECE (over all bins, as
    :func:`ensembles.ece`) in its legend entry. One colour per method name (:func:`color`).
    """
    import plotly.graph_objects as go

    main = reliability_traces(results, style=style, gap=gap, min_count=min_count, ece=ece,
                              colors=colors)
    rels = _reliabilities(results)
    if histogram:
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.74, 0.26],
                            vertical_spacing=0.06)
        for t in main:
            fig.add_trace(t, row=1, col=1)
        for m, (name, r) in enumerate(rels.items()):
            xs, width = _slots(r["edges"], m, len(rels))
            c = color(name, colors)  # zero counts are true zeros: every bin is drawn here
            fig.add_trace(go.Bar(x=xs, y=r["count"], width=width, name=f"{label(name)}: points",
                                 legendgroup=name, showlegend=False, marker=dict(color=c, line=dict(width=0)),
                                 hovertemplate="%{y} points<extra>" + label(name) + "</extra>"),
                          row=2, col=1)
    else:
        fig = go.Figure(main)
    apply_layout(fig, title=title, height=height or (560 if histogram else 460))
    fig.update_layout(barmode="overlay", bargap=0)
    if style == "bars":
        yrange, ytitle = [0, 1], "accuracy"
    else:
        worst = max([float(np.abs(np.asarray(t.y, dtype=float)).max(initial=0.0))
                     for t in main if t.name != "perfect calibration"] + [0.05])
        yrange, ytitle = [-1.15 * worst, 1.15 * worst], "accuracy − confidence"
    if histogram:
        fig.update_xaxes(range=[0, 1], row=1, col=1)
        fig.update_xaxes(range=[0, 1], title_text="confidence", row=2, col=1)
        fig.update_yaxes(range=yrange, title_text=ytitle, row=1, col=1)
        fig.update_yaxes(title_text="points", rangemode="tozero", row=2, col=1)
    else:
        fig.update_layout(xaxis=dict(range=[0, 1], title="confidence"),
                          yaxis=dict(range=yrange, title=ytitle))
    return fig


# --- spectral density -------------------------------------------------------------------------

def _densities(densities) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (grid, density)}`` from a SpectralDensity, a ``(grid, density)`` pair or a
    mapping from name to either."""
    def one(name, d):
        if hasattr(d, "grid") and hasattr(d, "density"):
            g, v = d.grid, d.density
        elif isinstance(d, (tuple, list)) and len(d) == 2:
            g, v = d
        else:
            raise TypeError(f"{name!r}: expected a curvature.SpectralDensity or a (grid, density) pair, "
                            f"got {type(d).__name__}")
        g = _finite_values(g, f"grid points of {name!r}")
        v = _finite_values(v, f"density values of {name!r}")
        if g.ndim != 1 or g.size < 2:
            raise ValueError(f"{name!r}: the grid must be 1-D with at least 2 points, got shape {g.shape}")
        if v.shape != g.shape:
            raise ValueError(f"{name!r}: density shape {v.shape} differs from grid shape {g.shape}")
        if np.any(np.diff(g) <= 0):
            raise ValueError(f"{name!r}: the grid must be strictly increasing")
        if np.any(v < 0):
            raise ValueError(f"{name!r}: a density cannot be negative (min {v.min():.3g})")
        if not np.any(v > 0):
            raise ValueError(f"{name!r}: the density is zero everywhere")
        return g, v

    if hasattr(densities, "density") or (isinstance(densities, (tuple, list)) and len(densities) == 2
                                          and not isinstance(densities[0], (tuple, list, str))
                                          and np.ndim(densities[0]) == 1):
        densities = {"density": densities}
    if not isinstance(densities, Mapping) or not densities:
        raise ValueError("expected a SpectralDensity, a (grid, density) pair, or a non-empty mapping "
                         "from name to one of them")
    return {str(k): one(k, d) for k, d in densities.items()}


def spectral_range(densities, *, floor: float | None = None, decades: float = 6.0) -> list[float]:
    """The log10 ``y`` range of :func:`spectral_density`: from ``floor`` (default: the highest
    peak over ``10**decades``) to a little above the highest peak. Values below the floor stay in
    the traces and run off the bottom of the axis."""
    peak = max(float(v.max()) for _, v in _densities(densities).values())
    if floor is None:
        if not decades > 0:
            raise ValueError(f"decades must be positive, got {decades!r}")
        floor = peak / 10.0 ** decades
    if not (math.isfinite(floor) and 0 < floor < peak):
        raise ValueError(f"floor must be positive and below the highest peak {peak:.3g}, got {floor!r}")
    return [math.log10(floor), math.log10(peak) + 0.25]


def spectral_density_traces(densities, *, markers: Mapping[str, Any] | None = None,
                            y_range: Sequence[float] | None = None, log_y: bool = True,
                            colors: Colors | None = None, **trace) -> list:
    """The traces of :func:`spectral_density`: one line per density (``y`` is the density itself,
    unchanged), then one trace of vertical dashed lines per marker name, spanning ``y_range``
    (log10 when ``log_y``). A fixed number of traces per call, so slider frames can use them."""
    import plotly.graph_objects as go

    dens = _densities(densities)
    if y_range is None:
        y_range = spectral_range(dens) if log_y else [0.0, 1.05 * max(v.max() for _, v in dens.values())]
    lo, hi = (10.0 ** y_range[0], 10.0 ** y_range[1]) if log_y else tuple(y_range)
    out = [go.Scatter(x=g, y=v, mode="lines", name=label(n), legendgroup=n,
                      line=dict(color=color(n, colors), width=2),
                      hovertemplate="λ %{x:.4g}: φ %{y:.3g}<extra>" + label(n) + "</extra>", **trace)
           for n, (g, v) in dens.items()]
    for n, vals in (markers or {}).items():
        v = _finite_values(np.atleast_1d(np.asarray(vals, dtype=np.float64)), f"marker {n!r}").ravel()
        xs = [p for x in v for p in (x, x, None)]
        ys = [p for _ in v for p in (lo, hi, None)]
        out.append(go.Scatter(x=xs, y=ys, mode="lines", name=label(n), legendgroup=n,
                              showlegend=n not in dens, line=dict(color=color(n, colors), dash="dash",
                                                                 width=1.5),
                              hovertemplate="λ = %{x:.4g}<extra>" + label(n) + "</extra>", **trace))
    return out


def spectral_density(densities, *, markers: Mapping[str, Any] | None = None,
                     floor: float | None = None, decades: float = 6.0, log_y: bool = True,
                     title: str = "", xaxis: str = "eigenvalue λ",
                     yaxis: str = "spectral density φ(λ)", height: int | None = None,
                     colors: Colors | None = None):
    """A spectral density figure, e.g. of :func:`curvature.slq_density`'s output.

    ``densities``: a ``SpectralDensity``, a ``(grid, density)`` pair, or ``{name: either}`` to
    overlay several (one colour per name). The ``y`` axis is logarithmic (``log_y``), since the
    outliers' mass is orders of magnitude below the bulk's, from ``floor`` (default: the highest
    peak / 10**``decades``; :func:`spectral_range`) up. ``markers``: ``{name: λ or [λ, ...]}``
    vertical dashed lines, e.g. λ_max estimates; a marker named like a density takes its colour
    and legend entry.
    """
    import plotly.graph_objects as go

    dens = _densities(densities)
    y_range = spectral_range(dens, floor=floor, decades=decades) if log_y else None
    fig = go.Figure(spectral_density_traces(dens, markers=markers, y_range=y_range, log_y=log_y,
                                            colors=colors))
    apply_layout(fig, title=title, height=height or 420, xaxis=xaxis, yaxis=yaxis)
    lo = min(g[0] for g, _ in dens.values())
    hi = max(g[-1] for g, _ in dens.values())
    fig.update_xaxes(range=[lo, hi])
    if log_y:
        fig.update_yaxes(type="log", range=y_range, exponentformat="power")
    else:
        fig.update_yaxes(rangemode="tozero")
    return fig
