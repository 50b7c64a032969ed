"""book.polish: the built pages work offline and load only what they use."""
from landscape_lib import book

THEBE = '    <script>const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"; const x = 1</script>\n'
PLOTLY = '    <script src="../../_static/plotly.min.js?v=ab5aad05"></script>\n'
MODE = '<script>document.documentElement.dataset.mode = localStorage.getItem("mode") || "";</script>\n'


def _page(body: str) -> str:
    return f"<html><head>\n{PLOTLY}{THEBE}{THEBE}{MODE}</head><body>{body}</body></html>"


def test_polish_ships_the_badge_keeps_thebe_once_and_plotly_only_where_figures_are(tmp_path):
    html = tmp_path / "html"
    (html / "book" / "part1").mkdir(parents=True)
    chapter = html / "book" / "part1" / "01-x.html"
    text_page = html / "book" / "intro.html"
    badge = f'<img src="{book.COLAB_BADGE_URL}" alt="Open In Colab"/>'
    chapter.write_text(_page(badge + "<script>Plotly.newPlot('g', [], {})</script>"))
    text_page.write_text(_page("<p>words</p>"))
    book.polish(html)
    ch, tx = chapter.read_text(), text_page.read_text()
    assert book.COLAB_BADGE_URL not in ch and 'src="../../_static/colab-badge.svg"' in ch
    assert ch.count("THEBE_JS_URL") == 1 and tx.count("THEBE_JS_URL") == 1
    assert "plotly.min.js" in ch and "plotly.min.js" not in tx
    assert 'localStorage.getItem("mode") || "auto"' in ch
    book.polish(html)  # idempotent
    assert chapter.read_text() == ch


def test_the_badge_asset_exists():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    assert (root / "_static" / "colab-badge.svg").read_text().startswith("<svg")
