"""The bibliography parses, and every work a chapter cites is in it (a broken entry fails the
book build only at its very end; this fails in seconds)."""
import json
import re
from pathlib import Path

from landscape_lib import runner

ROOT = Path(__file__).resolve().parent.parent
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")


def test_every_cited_key_is_in_the_parsed_bibliography():
    from pybtex.database import parse_file

    entries = parse_file(str(ROOT / "book" / "references.bib")).entries
    cited = set()
    pages = [c.path for c in runner.chapters(ROOT)] + sorted((ROOT / "book").glob("*.md"))
    for page in pages:
        text = page.read_text()
        if page.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "markdown")
        for keys in CITE.findall(text):
            cited.update(k.strip() for k in keys.split(","))
    assert cited, "no citations found"
    missing = sorted(cited - set(entries))
    assert not missing, f"cited but not in book/references.bib: {missing}"
