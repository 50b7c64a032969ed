"""The book's command line: run chapters with papermill, build the book, print the scoreboard.

::

    python -m landscape_lib run    [--profile smoke|cpu|gpu] [--seed N] [--jobs N] [CHAPTER ...]
    python -m landscape_lib build  [--profile ...] [--seed N] [--jobs N]
    python -m landscape_lib claims [--profile ...] [--seed N]
    python -m landscape_lib list
    python -m landscape_lib sync   [--check]

``run`` executes chapter notebooks (PROFILE, SEED and DEVICE injected) into
``_build/runs/<profile>-seed<N>/``, several at once, each single-threaded in ``smoke``/``cpu``.
A failing chapter is reported with its failing cell while the others go on; the exit status
is non-zero if any failed. A finished chapter is cached under a hash of its notebook, its
parameters and the library's source, so a re-run resumes where it stopped. A chapter is
started again only when the failure was not its own: a kernel that died before answering (up
to three starts) or one that hung past the profile's timeout (killed, and tried once more).
The run directory's ``claims.json`` gathers every chapter's claim records.

``build`` runs (cached), stages the executed notebooks with ``_config.yml``/``_toc.yml``, the
generated scoreboard page and ``plotly.min.js`` in ``_build/src``, and calls
``jupyter-book build`` with warnings as errors; the site lands in ``_build/html``.

``sync`` rewrites every chapter's "Open in Colab" badge and Colab install cell from the
repository URL in ``_config.yml`` (``--check`` only reports notebooks that are out of date).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import claims as claims_mod
from .config import PROFILES, check_profile

CHAPTER_RE = re.compile(r"^(\d\d)-[\w-]+$")


# --- the project and its chapters ------------------------------------------------------------

def find_root(start: Path | None = None) -> Path:
    """The book's root: the nearest folder (from ``start`` up) holding ``_toc.yml``."""
    here = (start or Path.cwd()).resolve()
    for p in [here, *here.parents]:
        if (p / "_toc.yml").exists() and (p / "_config.yml").exists():
            return p
    raise SystemExit("no _toc.yml/_config.yml found here or above: run from the book's folder")


@dataclass(frozen=True)
class Chapter:
    number: str  # "01"
    slug: str  # "01-visualizing-loss-landscapes"
    path: Path  # absolute path of the source notebook
    rel: Path  # path relative to the root, e.g. book/part1/01-....ipynb


def _toc_files(node) -> list[str]:
    out = []
    if isinstance(node, dict):
        for k in ("root", "file"):
            if k in node:
                out.append(node[k])
        for k in ("parts", "chapters", "sections"):
            for child in node.get(k, []) or []:
                out.extend(_toc_files(child))
    elif isinstance(node, list):
        for child in node:
            out.extend(_toc_files(child))
    return out


def chapters(root: Path) -> list[Chapter]:
    """The chapter notebooks listed in ``_toc.yml``, in book order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    out = []
    for f in _toc_files(toc):
        nb = root / (f if f.endswith(".ipynb") else f + ".ipynb")
        if nb.exists() and CHAPTER_RE.match(nb.stem):
            out.append(Chapter(nb.stem[:2], nb.stem, nb, nb.relative_to(root)))
    return out


def select(all_chapters: list[Chapter], wanted: list[str]) -> list[Chapter]:
    """Chapters named by number (``01`` or ``1``) or slug prefix; error names the choices."""
    if not wanted:
        return all_chapters
    picked: list[Chapter] = []
    for w in wanted:
        hits = [c for c in all_chapters
                if (w.isdigit() and int(w) == int(c.number))
                or c.slug.startswith(w) or c.slug[3:].startswith(w)]
        if not hits:
            valid = ", ".join(c.slug for c in all_chapters)
            raise SystemExit(f"unknown chapter {w!r}; valid chapters: {valid}")
        picked += [c for c in hits if c not in picked]
    return picked


def run_dir(root: Path, profile: str, seed: int) -> Path:
    return root / "_build" / "runs" / f"{profile}-seed{seed}"


def library_digest() -> str:
    """Hash of the library's source: a change to the library invalidates every cached chapter."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(ch: Chapter, params: dict, lib: str) -> str:
    h = hashlib.sha256()
    h.update(ch.path.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(lib.encode())
    return h.hexdigest()


# --- executing one chapter (in a subprocess, so chapters cannot take each other down) ---------

def _execute(args) -> int:
    """Hidden sub-command: run one notebook with papermill and write a status file."""
    import papermill as pm

    status = {"status": "ok"}
    t0 = time.time()
    try:
        pm.execute_notebook(args.input, args.output, kernel_name="python3",
                            parameters={"PROFILE": args.profile, "SEED": args.seed,
                                        "DEVICE": args.device},
                            cwd=str(Path(args.input).parent), progress_bar=False,
                            log_output=False, request_save_on_cell_execute=False)
    except pm.PapermillExecutionError as exc:
        cell, line = _source_cell(Path(args.output), exc.cell_index)
        status = {"status": "failed", "cell": cell, "code": line,
                  "error": f"{exc.ename}: {exc.evalue}".strip()[:2000]}
    except Exception as exc:  # kernel died, notebook unreadable, ...
        status = {"status": "failed", "cell": None, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    status["seconds"] = round(time.time() - t0, 2)
    Path(args.status).write_text(json.dumps(status))
    return 0 if status["status"] == "ok" else 1


def _source_cell(executed: Path, index: int) -> tuple[int, str]:
    """1-based number of the failing cell in the *source* notebook, and its first code line.

    The executed notebook has cells the source lacks (papermill's injected parameters and, after
    an error, its error banner), so the failing cell is found by its error output.
    """
    try:
        cells = json.loads(executed.read_text())["cells"]
        added = ("injected-parameters", "papermill-error-cell-tag")
        source_cells = [c for c in cells
                        if not any(t in c.get("metadata", {}).get("tags", []) for t in added)]
        for i, c in enumerate(source_cells):
            if any(o.get("output_type") == "error" for o in c.get("outputs", [])):
                src = "".join(c.get("source", ""))
                line = next((l.strip() for l in src.splitlines()
                             if l.strip() and not l.lstrip().startswith("#")), "")
                return i + 1, line[:120]
    except (OSError, ValueError, KeyError):
        pass
    return index + 1, ""


def _chapter_env(profile: str, out: Path) -> dict:
    env = dict(os.environ)
    env.update(LANDSCAPE_QUIET="1", LANDSCAPE_BOOK="1",
               LANDSCAPE_CLAIMS_DIR=str(out / "claims"), PYTHONHASHSEED="0")
    if profile in ("smoke", "cpu"):
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LANDSCAPE_THREADS="1")
    root_pkg = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root_pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_chapter(ch: Chapter, profile: str, seed: int, device: str, out: Path, lib: str,
                force: bool, timeout: float) -> dict:
    """Execute one chapter unless its cache entry is current; return its status dict."""
    params = {"PROFILE": profile, "SEED": seed, "DEVICE": device}
    key = cache_key(ch, params, lib)
    target = out / ch.rel
    cache_file = out / ".cache" / f"{ch.slug}.json"
    if not force and cache_file.exists() and target.exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key and cached.get("status") == "ok":
            return {**cached, "cached": True}
    target.parent.mkdir(parents=True, exist_ok=True)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    status_file = out / ".cache" / f"{ch.slug}.status.json"
    cmd = [sys.executable, "-m", "landscape_lib", "_execute", str(ch.path), str(target),
           "--profile", profile, "--seed", str(seed), "--device", device,
           "--status", str(status_file)]
    t0 = time.time()
    notes, hangs, starts = [], 0, 0
    while True:
        status = _execute_once(cmd, _chapter_env(profile, out), status_file, timeout)
        if status.pop("timed_out", False):
            hangs += 1
            status["error"] = f"timed out after {timeout:.0f} s (attempt {hangs} of {HANG_ATTEMPTS})"
            if hangs < HANG_ATTEMPTS:
                notes.append(status["error"])
                continue
        elif _kernel_did_not_start(status):
            starts += 1
            if starts < KERNEL_STARTS:
                notes.append(f"kernel did not start (attempt {starts} of {KERNEL_STARTS})")
                time.sleep(random.uniform(0.5, 2.0))  # de-synchronise from the colliding kernel
                continue
        break
    if notes:
        status["note"] = "; ".join(notes)
    status["seconds"] = round(time.time() - t0, 2)
    status["key"] = key
    cache_file.write_text(json.dumps(status))
    return {**status, "cached": False}


# A chapter is tried again only when it failed for a reason that is not the chapter's:
# - its kernel died before answering ("Kernel died before replying to kernel_info"; seen once in
#   CI with two chapters starting together, not reproduced in 96 parallel starts here). The
#   known cause is a port race: jupyter_client picks free ports before the kernel binds them, so
#   kernels started at the same moment can collide (tried up to KERNEL_STARTS times);
# - it stopped answering and was killed at the timeout, seen rarely with nbclient under heavy
#   load (tried up to HANG_ATTEMPTS times, since each costs a whole timeout).
KERNEL_STARTS = 3
HANG_ATTEMPTS = 2
_KERNEL_START_ERRORS = ("Kernel died before replying to kernel_info", "Kernel didn't respond")


def _kernel_did_not_start(status: dict) -> bool:
    return (status["status"] != "ok" and status.get("cell") is None
            and any(e in status.get("error", "") for e in _KERNEL_START_ERRORS))


def _execute_once(cmd: list[str], env: dict, status_file: Path, timeout: float) -> dict:
    """Run the ``_execute`` sub-command in its own process group, killing the group
    (papermill and its kernel) if it outlasts ``timeout``."""
    status_file.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return {"status": "failed", "cell": None, "error": f"timed out after {timeout:.0f} s",
                "timed_out": True}
    if status_file.exists():
        status = json.loads(status_file.read_text())
        if status["status"] != "ok" and status.get("cell") is None and stderr.strip():
            # The chapter failed outside its cells (e.g. the kernel died while starting):
            # the kernel's own last words are in papermill's stderr.
            status["stderr"] = stderr.strip()[-2000:]
        return status
    return {"status": "failed", "cell": None,
            "error": (stderr or stdout or "no output").strip()[-2000:]}


DEFAULT_TIMEOUT = {"smoke": 300.0, "cpu": 900.0, "gpu": 3600.0}


def gather_claims(root: Path, out: Path) -> list:
    """Collect every chapter's claim file (in book order) into ``claims.json``."""
    recs = []
    for ch in chapters(root):
        f = out / "claims" / f"{ch.number}.json"
        if f.exists():
            recs += claims_mod.load(f)
    claims_mod.save(recs, out / "claims.json")
    return recs


def _show(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def cmd_run(args, root: Path | None = None) -> int:
    root = root or find_root()
    check_profile(args.profile)
    todo = select(chapters(root), args.chapters)
    if not todo:
        print("no chapters in _toc.yml")
        return 0
    out = Path(args.out).resolve() if getattr(args, "out", None) else run_dir(root, args.profile, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    lib = library_digest()
    jobs = max(1, args.jobs or os.cpu_count() or 1)
    print(f"running {len(todo)} chapter(s), profile {args.profile}, seed {args.seed}, "
          f"{min(jobs, len(todo))} at a time -> {_show(out, root)}", flush=True)
    failed = []
    width = max(len(c.slug) for c in todo)
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_chapter, c, args.profile, args.seed, args.device, out, lib,
                               args.force, args.timeout or DEFAULT_TIMEOUT[args.profile]): c
                   for c in todo}
        for fut in cf.as_completed(futures):
            ch = futures[fut]
            st = fut.result()
            if st["status"] == "ok":
                tag = "cached" if st.get("cached") else "ok"
                note = f"  ({st['note']})" if st.get("note") and not st.get("cached") else ""
                print(f"  {ch.slug:<{width}}  {tag:<7} {st['seconds']:7.1f} s{note}", flush=True)
            else:
                failed.append(ch.slug)
                where = "no cell"
                if st.get("cell") is not None:
                    where = f"cell {st['cell']}" + (f": {st['code']}" if st.get("code") else "")
                print(f"  {ch.slug:<{width}}  FAILED  {st['seconds']:7.1f} s  ({where}) "
                      f"{st['error']}", flush=True)
                if st.get("stderr"):
                    print(textwrap.indent(st["stderr"], "      | "), flush=True)
    recs = gather_claims(root, out)
    held = sum(r.holds for r in recs)
    print(f"{len(todo) - len(failed)} of {len(todo)} chapter(s) ran; {held} of {len(recs)} "
          f"claims hold; records in {_show(out / 'claims.json', root)}")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


# --- building the book -----------------------------------------------------------------------

def chapter_title(nb_path: Path) -> str:
    """The first Markdown heading of a notebook."""
    nb = json.loads(nb_path.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb_path.stem


def _hide_injected(nb_path: Path) -> None:
    nb = json.loads(nb_path.read_text())
    for cell in nb.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nb_path.write_text(json.dumps(nb, indent=1))


def stage(root: Path, out: Path, dest: Path, failed: list[str]) -> None:
    """Lay out the book source with executed notebooks and the generated pages in ``dest``."""
    from .viz import plotly_js_path

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, dest / name)
    shutil.copytree(root / "book", dest / "book",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    static = dest / "_static"
    static.mkdir(exist_ok=True)
    if (root / "_static").exists():
        shutil.copytree(root / "_static", static, dirs_exist_ok=True)
    shutil.copy2(plotly_js_path(), static / "plotly.min.js")
    titles = {}
    for ch in chapters(root):
        executed = out / ch.rel
        if executed.exists():
            shutil.copy2(executed, dest / ch.rel)
            _hide_injected(dest / ch.rel)
        titles[ch.number] = chapter_title(ch.path)
    recs = claims_mod.load(out / "claims.json") if (out / "claims.json").exists() else []
    page = dest / "book" / "scoreboard.md"
    page.write_text("# Scoreboard\n\nEvery claim the book checks, as measured by the latest run "
                    "of each chapter. Generated by `python -m landscape_lib build`.\n\n"
                    + claims_mod.scoreboard_markdown(recs, titles, failed))


def cmd_build(args) -> int:
    root = find_root()
    status = cmd_run(args, root)
    out = run_dir(root, args.profile, args.seed)
    failed = []
    for ch in chapters(root):
        f = out / ".cache" / f"{ch.slug}.json"
        if not f.exists() or json.loads(f.read_text()).get("status") != "ok":
            failed.append(ch.slug)
    src = root / "_build" / "src"
    stage(root, out, src, failed)
    html = root / "_build" / "html"
    cmd = [sys.executable, "-m", "jupyter_book", "build", str(src), "--path-output", str(root),
           "-W", "--keep-going"]
    jb = shutil.which("jupyter-book")
    if jb:
        cmd = [jb, *cmd[3:]]
    print("building the book: " + " ".join(cmd[-6:]), flush=True)
    proc = subprocess.run(cmd, cwd=root)
    if proc.returncode != 0:
        print("jupyter-book build failed (warnings count as errors)")
        return proc.returncode
    print(f"book built: {(html / 'index.html').relative_to(root)}")
    return status


def cmd_claims(args) -> int:
    root = find_root()
    out = run_dir(root, args.profile, args.seed)
    path = out / "claims.json"
    if not path.exists():
        print(f"no claims recorded for profile {args.profile}, seed {args.seed}: run "
              f"`python -m landscape_lib run --profile {args.profile} --seed {args.seed}` first")
        return 1
    recs = claims_mod.load(path)
    titles = {c.number: chapter_title(c.path) for c in chapters(root)}
    print(claims_mod.scoreboard_markdown(recs, titles))
    return 0 if all(r.holds for r in recs) else 1


def cmd_list(args) -> int:
    root = find_root()
    for c in chapters(root):
        print(f"{c.number}  {c.rel}")
    return 0


# --- Colab badge and install cell, derived from _config.yml ----------------------------------

BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
INSTALL_RE = re.compile(r"git\+https?://[^\s\"']+")


def colab_links(root: Path, ch: Chapter) -> tuple[str, str]:
    """The badge Markdown and the pip requirement for ``ch``, from ``repository`` in _config.yml."""
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    repo = cfg.get("repository", {})
    url = repo.get("url", "").rstrip("/")
    if not url.startswith("https://github.com/"):
        raise SystemExit("_config.yml needs repository.url = https://github.com/OWNER/REPO")
    branch = repo.get("branch", "main")
    book = repo.get("path_to_book", "").strip("/")
    path = "/".join(p for p in (book, ch.rel.as_posix()) if p)
    colab = cfg.get("launch_buttons", {}).get("colab_url", "https://colab.research.google.com")
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"({colab.rstrip('/')}/github/{url[len('https://github.com/'):]}/blob/{branch}/{path})")
    return badge, f"git+{url}.git@{branch}"


def cmd_sync(args) -> int:
    root = find_root()
    stale = []
    for ch in chapters(root):
        badge, req = colab_links(root, ch)
        nb = json.loads(ch.path.read_text())
        changed = False
        for cell in nb["cells"]:
            src = "".join(cell.get("source", ""))
            new = BADGE_RE.sub(lambda m: badge, src) if cell["cell_type"] == "markdown" else src
            if cell["cell_type"] == "code" and "remove-cell" in cell.get("metadata", {}).get("tags", []):
                new = INSTALL_RE.sub(lambda m: req, new)
            if new != src:
                cell["source"] = new.splitlines(keepends=True)
                changed = True
        text = "".join(c.get("source", "") if isinstance(c.get("source"), str)
                       else "".join(c["source"]) for c in nb["cells"])
        if badge not in text or req not in text:
            print(f"{ch.rel}: no Colab badge or install cell to update")
            stale.append(ch.slug)
            continue
        if changed:
            stale.append(ch.slug)
            if not args.check:
                ch.path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
                print(f"updated {ch.rel}")
    if args.check and stale:
        print("out of date with _config.yml: " + ", ".join(stale))
        return 1
    return 0


# --- argument parsing ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landscape_lib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, jobs=True):
        p.add_argument("--profile", default="cpu", choices=PROFILES,
                       help="smoke (CI, seconds), cpu (default, about a minute), gpu (paper scale)")
        p.add_argument("--seed", type=int, default=0)
        if jobs:
            p.add_argument("--jobs", type=int, default=None,
                           help="chapters at once (default: the number of cores)")
            p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
            p.add_argument("--force", action="store_true", help="ignore the cache")
            p.add_argument("--timeout", type=float, default=None,
                           help="seconds per chapter before it is killed (and tried once more); "
                                "default 300 in smoke, 900 in cpu, 3600 in gpu")

    p = sub.add_parser("run", help="execute chapters with papermill")
    common(p)
    p.add_argument("--out", default=None,
                   help="run directory (default _build/runs/<profile>-seed<N>)")
    p.add_argument("chapters", nargs="*", metavar="CHAPTER", help="number (01) or slug prefix")
    p = sub.add_parser("build", help="run (cached) and build the HTML book")
    common(p)
    p.set_defaults(chapters=[])
    common(sub.add_parser("claims", help="print the scoreboard of a run"), jobs=False)
    sub.add_parser("list", help="list the chapters")
    p = sub.add_parser("sync", help="derive Colab badges/install cells from _config.yml")
    p.add_argument("--check", action="store_true", help="only report what is out of date")
    p = sub.add_parser("_execute")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--profile", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--status", required=True)

    args = parser.parse_args(argv)
    return {"run": cmd_run, "build": cmd_build, "claims": cmd_claims, "list": cmd_list,
            "sync": cmd_sync, "_execute": _execute}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
