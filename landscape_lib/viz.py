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
"""
from __future__ import annotations

import inspect
import itertools
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

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


def to_html(fig, div_id: str | None = None) -> str:
    """A figure as an HTML fragment that expects ``window.Plotly`` to be loaded already."""
    div_id = div_id or f"landscape-fig-{next(_ids)}"
    # auto_play=False: plotly would otherwise run through every slider frame on page load and
    # leave the figure on the last one.
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, auto_play=False,
                       config={"displaylogo": False, "responsive": True})


def show(fig) -> None:
    """Display a plotly figure: HTML for the book, plotly's renderer elsewhere."""
    if book_mode():
        from IPython.display import HTML, display

        display(HTML(to_html(fig)))
    else:
        fig.show()


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
    fig.frames = [go.Frame(data=list(f), traces=list(range(n)), name=str(i),
                           layout=frame_layouts[i] if frame_layouts is not None else None)
                  for i, f in enumerate(frames)]
    steps = [dict(method="animate", label=str(lab),
                  args=[[str(i)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                   "transition": {"duration": 0}}])
             for i, lab in enumerate(labels)]
    fig.update_layout(template=TEMPLATE,
                      sliders=[dict(active=active, steps=steps, pad={"t": 40},
                                    currentvalue={"prefix": f"{slider_title}: "})],
                      **(layout or {}))
    if frame_layouts is not None:
        fig.update_layout(frame_layouts[active])
    return fig


def line_figure(x, ys: dict, *, title: str = "", xaxis: str = "", yaxis: str = "",
                log_y: bool = False):
    """A plain multi-line figure: ``ys`` maps a legend name to its y values."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=np.asarray(x), y=np.asarray(v), mode="lines", name=k,
                                line=dict(color=COLORS[i % len(COLORS)]))
                     for i, (k, v) in enumerate(ys.items())])
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=xaxis, yaxis_title=yaxis)
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


def table_html(rows: Sequence[dict], digits: int = 4) -> str:
    """Rows of dicts (same keys) as an HTML table; floats shown with ``digits`` significant digits."""
    import html

    if not rows:
        return "<p>(no rows)</p>"
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.{digits}g}"
        return str(v)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c, '')))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    return f'<table class="results-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def table(rows: Sequence[dict], digits: int = 4) -> None:
    """Display rows of results as a table (HTML in notebooks and in the book)."""
    from IPython.display import HTML, display

    display(HTML(table_html(rows, digits)))
