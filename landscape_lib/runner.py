"""Running the book's chapters: find them, execute each with papermill, cache what finished.

Chapters are the notebooks ``_toc.yml`` lists whose names start with two digits
(``01-visualizing-loss-landscapes``). :func:`run` executes the selected ones into a run directory,
``_build/runs/<profile>-seed<N>/`` by default, with PROFILE, SEED and DEVICE injected by papermill,
several at once (a thread pool, each chapter in its own process), each single-threaded in
``smoke``/``cpu``. A failing chapter is reported with its failing cell while the others go on, and
:func:`run` returns non-zero if any failed. The run directory's ``claims.json`` gathers every
chapter's claim records (:func:`gather_claims`, in book order).

**One chapter** (:func:`run_chapter`) runs the hidden ``python -m landscape_lib _execute``
sub-command (:func:`execute_notebook`) in a new process group, so chapters cannot take each other
down and a hung one can be killed with its kernel. That process writes a status file: ``ok``, or
the failing cell of the *source* notebook (1-based), its first code line and the error.

**Retries.** A chapter is started again only when the failure was not its own:

- its kernel died before answering (``Kernel died before replying to kernel_info``), up to
  :data:`KERNEL_STARTS` starts, with a random pause of 0.5-2 s between them. The known cause is a
  port race: jupyter_client picks free ports before the kernel binds them, so kernels started at
  the same moment can collide (seen once in CI with two chapters starting together, not reproduced
  in 96 parallel starts here);
- it stopped answering and was killed at the profile's timeout (:data:`DEFAULT_TIMEOUT`, or
  ``--timeout``), seen rarely with nbclient under heavy load: tried up to :data:`HANG_ATTEMPTS`
  times, since each costs a whole timeout.

A chapter that fails in a cell is the chapter's fault and is not retried. The retries taken are
noted in the chapter's status (``note``).

**The cache.** A finished chapter's status is kept in ``<run dir>/.cache/<slug>.json`` with its key
(:func:`cache_key`): a SHA-256 of the source notebook's bytes, its parameters (PROFILE, SEED,
DEVICE), :func:`library_digest` of the library and the versions of torch and numpy (both change
the numbers a chapter records). The library digest covers every file under ``landscape_lib/``,
subpackages included, in the order of their relative paths, ignoring ``__pycache__`` and ``*.pyc``.
A chapter whose key matches a finished (``ok``) entry, and whose executed notebook is present, is
not run again, so a re-run resumes where the last one stopped; ``force`` ignores the cache.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from . import claims as claims_mod
from .config import check_profile

CHAPTER_RE = re.compile(r"^(\d\d)-[\w-]+$")
PACKAGE_DIR = Path(__file__).resolve().parent


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


def select(all_chapters: list[Chapter], wanted: Sequence[str]) -> list[Chapter]:
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


def chapter_title(nb_path: Path) -> str:
    """The first Markdown heading of a notebook."""
    nb = json.loads(nb_path.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb_path.stem


def run_dir(root: Path, profile: str, seed: int) -> Path:
    return root / "_build" / "runs" / f"{profile}-seed{seed}"


def list_chapters(root: Path | None = None) -> int:
    """Print each chapter's number and notebook (``python -m landscape_lib list``)."""
    root = root or find_root()
    for c in chapters(root):
        print(f"{c.number}  {c.rel}")
    return 0


# --- the cache key ---------------------------------------------------------------------------

def library_digest(package: Path | None = None) -> str:
    """SHA-256 of the library's files: a change to any of them invalidates every cached chapter.

    ``package`` is the package directory (default: this one). Every file under it counts,
    subpackages included, in the order of their paths relative to it; ``__pycache__`` folders
    and ``*.pyc`` files do not (they change whenever Python imports the library). Each file
    contributes its relative path and its size before its bytes, so moving bytes from one file
    to the next, or renaming a file, changes the digest.
    """
    package = Path(package) if package is not None else PACKAGE_DIR
    files = sorted((f.relative_to(package).as_posix(), f) for f in package.rglob("*")
                   if f.is_file() and f.suffix != ".pyc"
                   and "__pycache__" not in f.relative_to(package).parts)
    h = hashlib.sha256()
    for rel, f in files:
        data = f.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _versions() -> str:
    """The versions of the libraries whose upgrades change recorded numbers."""
    import numpy
    import torch

    return f"torch {torch.__version__}; numpy {numpy.__version__}"


def cache_key(ch: Chapter, params: dict, lib: str) -> str:
    """The chapter's cache key: its notebook, its parameters, the library digest ``lib`` and the
    torch and numpy versions."""
    h = hashlib.sha256()
    h.update(ch.path.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(lib.encode())
    h.update(_versions().encode())
    return h.hexdigest()


# --- executing one chapter (in a subprocess, so chapters cannot take each other down) ---------

def execute_notebook(input: str, output: str, profile: str, seed: int, device: str,
                     status: str) -> int:
    """The hidden ``_execute`` sub-command: run one notebook with papermill and write a status
    file (``ok``, or the failing source cell, its first code line and the error)."""
    import papermill as pm

    result = {"status": "ok"}
    t0 = time.time()
    try:
        pm.execute_notebook(input, output, kernel_name="python3",
                            parameters={"PROFILE": profile, "SEED": seed, "DEVICE": device},
                            cwd=str(Path(input).parent), progress_bar=False,
                            log_output=False, request_save_on_cell_execute=False)
    except pm.PapermillExecutionError as exc:
        cell, line = _source_cell(Path(output), exc.cell_index)
        result = {"status": "failed", "cell": cell, "code": line,
                  "error": f"{exc.ename}: {exc.evalue}".strip()[:2000]}
    except Exception as exc:  # kernel died, notebook unreadable, ...
        result = {"status": "failed", "cell": None, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["seconds"] = round(time.time() - t0, 2)
    Path(status).write_text(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


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
                line = next((ln.strip() for ln in src.splitlines()
                             if ln.strip() and not ln.lstrip().startswith("#")), "")
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
    # the kernels import the same library as the runner (the one the cache key digests)
    root_pkg = str(PACKAGE_DIR.parent)
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


# Retries (see the module docstring): a kernel that died before answering, up to KERNEL_STARTS
# starts; a chapter killed at the timeout, up to HANG_ATTEMPTS tries.
KERNEL_STARTS = 3
HANG_ATTEMPTS = 2
_KERNEL_START_ERRORS = ("Kernel died before replying to kernel_info", "Kernel didn't respond")
DEFAULT_TIMEOUT = {"smoke": 300.0, "cpu": 900.0, "gpu": 3600.0}


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


# --- claims ----------------------------------------------------------------------------------

def gather_claims(root: Path, out: Path) -> list:
    """Collect every chapter's claim file (in book order) into ``claims.json``."""
    recs = []
    for ch in chapters(root):
        f = out / "claims" / f"{ch.number}.json"
        if f.exists():
            recs += claims_mod.load(f)
    claims_mod.save(recs, out / "claims.json")
    return recs


def show_claims(profile: str = "cpu", seed: int = 0, root: Path | None = None) -> int:
    """Print the scoreboard of a run (``python -m landscape_lib claims``); non-zero unless every
    claim holds."""
    root = root or find_root()
    out = run_dir(root, profile, seed)
    path = out / "claims.json"
    if not path.exists():
        print(f"no claims recorded for profile {profile}, seed {seed}: run "
              f"`python -m landscape_lib run --profile {profile} --seed {seed}` first")
        return 1
    recs = claims_mod.load(path)
    titles = {c.number: chapter_title(c.path) for c in chapters(root)}
    print(claims_mod.scoreboard_markdown(recs, titles))
    return 0 if all(r.holds for r in recs) else 1


# --- running chapters ------------------------------------------------------------------------

def _show(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def run(profile: str = "cpu", seed: int = 0, wanted: Sequence[str] = (), jobs: int | None = None,
        device: str = "auto", force: bool = False, timeout: float | None = None,
        out: str | Path | None = None, root: Path | None = None) -> int:
    """Execute the chapters ``wanted`` (all if empty) and gather their claims
    (``python -m landscape_lib run``); non-zero if any chapter failed.

    ``jobs`` chapters run at once (default: the number of cores); ``timeout`` is seconds per
    chapter (default :data:`DEFAULT_TIMEOUT` of the profile); ``out`` is the run directory
    (default :func:`run_dir`).
    """
    root = root or find_root()
    check_profile(profile)
    todo = select(chapters(root), wanted)
    if not todo:
        print("no chapters in _toc.yml")
        return 0
    out = Path(out).resolve() if out else run_dir(root, profile, seed)
    out.mkdir(parents=True, exist_ok=True)
    lib = library_digest()
    jobs = max(1, jobs or os.cpu_count() or 1)
    print(f"running {len(todo)} chapter(s), profile {profile}, seed {seed}, "
          f"{min(jobs, len(todo))} at a time -> {_show(out, root)}", flush=True)
    failed = []
    width = max(len(c.slug) for c in todo)
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_chapter, c, profile, seed, device, out, lib,
                               force, timeout or DEFAULT_TIMEOUT[profile]): c
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
