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


def run_dir(root: Path, profile: str, seed: int, stand_in: bool = False) -> Path:
    """``_build/runs/<profile>-seed<N>`` (``<profile>-standin-seed<N>`` for stand-in data)."""
    return root / "_build" / "runs" / f"{profile}{'-standin' if stand_in else ''}-seed{seed}"


RUN_DIR_RE = re.compile(r"^(smoke|cpu|gpu)(-standin)?-seed(\d+)$")


def run_dirs(root: Path) -> dict[tuple[str, bool, int], Path]:
    """Every run directory under ``_build/runs`` with a ``claims.json``, keyed by
    ``(profile, stand_in, seed)``."""
    found = {}
    base = root / "_build" / "runs"
    for d in sorted(base.iterdir()) if base.exists() else []:
        m = RUN_DIR_RE.match(d.name)
        if m and (d / "claims.json").exists():
            found[(m.group(1), bool(m.group(2)), int(m.group(3)))] = d
    return found


SEEDS_RE = re.compile(r"^\d+(-\d+)?$")


def parse_seeds(text: str) -> list[int]:
    """Seed bases from ``"0-4"``, ``"0,3,7"`` or a mix (``"0-2,7"``), in order, without repeats."""
    seeds: list[int] = []
    parts = [p.strip() for p in str(text).split(",")]
    for part in parts:
        if not SEEDS_RE.match(part):
            raise ValueError(f"bad seed range {text!r}: use N, N-M or a comma-separated list of "
                             f"them, e.g. 0-4 or 0,3,7 (non-negative integers)")
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if hi_i < lo_i:
            raise ValueError(f"bad seed range {part!r} in {text!r}: N-M needs N <= M, e.g. 0-4")
        seeds += [s for s in range(lo_i, hi_i + 1) if s not in seeds]
    return seeds


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
                     status: str, allow_errors: bool = False) -> int:
    """The hidden ``_execute`` sub-command: run one notebook with papermill and write a status
    file (``ok``, or the failing source cell, its first code line and the error).

    ``allow_errors=True`` (grading) runs every cell even after one fails; the status then names
    the first failing cell and the executed notebook holds every cell's error.
    """
    import papermill as pm

    result = {"status": "ok"}
    t0 = time.time()
    try:
        pm.execute_notebook(input, output, kernel_name="python3",
                            parameters={"PROFILE": profile, "SEED": seed, "DEVICE": device},
                            cwd=str(Path(input).parent), progress_bar=False,
                            log_output=False, request_save_on_cell_execute=False,
                            **({"allow_errors": True} if allow_errors else {}))
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


def chapter_env(profile: str, out: Path, stand_in: bool = False) -> dict:
    env = dict(os.environ)
    env.update(LANDSCAPE_QUIET="1", LANDSCAPE_BOOK="1",
               LANDSCAPE_CLAIMS_DIR=str(out / "claims"), PYTHONHASHSEED="0")
    env.pop("LANDSCAPE_STAND_IN", None)
    if stand_in:  # data.load serves random CIFAR-shaped stand-ins; claims.start marks the records
        env["LANDSCAPE_STAND_IN"] = "1"
    if profile in ("smoke", "cpu"):
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LANDSCAPE_THREADS="1")
    # the kernels import the same library as the runner (the one the cache key digests)
    root_pkg = str(PACKAGE_DIR.parent)
    env["PYTHONPATH"] = root_pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cache_file(out: Path, ch: Chapter) -> Path:
    return out / ".cache" / f"{ch.slug}.json"


def cached_status(ch: Chapter, key: str, out: Path) -> dict | None:
    """The chapter's finished status in ``out`` if its cache entry has ``key`` (else ``None``)."""
    cache_file = _cache_file(out, ch)
    if cache_file.exists() and (out / ch.rel).exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key and cached.get("status") == "ok":
            return {**cached, "cached": True}
    return None


def execute_chapter(ch: Chapter, profile: str, seed: int, device: str, out: Path, timeout: float,
                    stand_in: bool = False) -> dict:
    """Execute one chapter into the run directory ``out`` (its notebook at ``out/<rel>``, its
    claims in ``out/claims``), retrying as the module docstring says; return its status."""
    target = out / ch.rel
    target.parent.mkdir(parents=True, exist_ok=True)
    (out / ".cache").mkdir(parents=True, exist_ok=True)
    status_file = out / ".cache" / f"{ch.slug}.status.json"
    return execute_file(ch.path, target, profile, seed, device, status_file,
                        chapter_env(profile, out, stand_in), timeout)


def execute_file(input: Path, output: Path, profile: str, seed: int, device: str,
                 status_file: Path, env: dict, timeout: float, allow_errors: bool = False) -> dict:
    """Execute the notebook ``input`` into ``output`` in its own process (the ``_execute``
    sub-command), retrying a kernel that did not start or hung; return the status."""
    cmd = [sys.executable, "-m", "landscape_lib", "_execute", str(input), str(output),
           "--profile", profile, "--seed", str(seed), "--device", device,
           "--status", str(status_file)] + (["--allow-errors"] if allow_errors else [])
    t0 = time.time()
    notes, hangs, starts = [], 0, 0
    while True:
        status = _execute_once(cmd, env, status_file, timeout)
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
    return status


def write_status(ch: Chapter, out: Path, status: dict, key: str) -> dict:
    """Record a chapter's status (with its cache key) in the run directory."""
    status = {**status, "key": key}
    _cache_file(out, ch).parent.mkdir(parents=True, exist_ok=True)
    _cache_file(out, ch).write_text(json.dumps(status))
    return {**status, "cached": False}


def run_chapter(ch: Chapter, profile: str, seed: int, device: str, out: Path, lib: str,
                force: bool, timeout: float, stand_in: bool = False) -> dict:
    """Execute one chapter unless its cache entry is current; return its status dict."""
    key = cache_key(ch, _params(profile, seed, device, stand_in), lib)
    if not force:
        cached = cached_status(ch, key, out)
        if cached is not None:
            return cached
    return write_status(ch, out, execute_chapter(ch, profile, seed, device, out, timeout, stand_in),
                        key)


def _params(profile: str, seed: int, device: str, stand_in: bool) -> dict:
    params = {"PROFILE": profile, "SEED": seed, "DEVICE": device}
    if stand_in:
        params["STAND_IN"] = True
    return params


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


def show_claims(profile: str = "cpu", seed: int | Sequence[int] = 0, root: Path | None = None,
                stand_in: bool = False) -> int:
    """Print the scoreboard of a run (``python -m landscape_lib claims``), or with several seed
    bases the per-claim summary over them; non-zero unless every gated claim holds (on every seed
    base)."""
    root = root or find_root()
    seeds = [seed] if isinstance(seed, int) else list(seed)
    by_seed = {}
    for s in seeds:
        path = run_dir(root, profile, s, stand_in) / "claims.json"
        if not path.exists():
            flag = " --stand-in-data" if stand_in else ""
            print(f"no claims recorded for profile {profile}, seed {s}: run "
                  f"`python -m landscape_lib run --profile {profile} --seed {s}{flag}` first")
            return 1
        by_seed[s] = claims_mod.load(path)
    titles = {c.number: chapter_title(c.path) for c in chapters(root)}
    if len(seeds) == 1:
        print(claims_mod.scoreboard_markdown(by_seed[seeds[0]], titles))
    else:
        print(claims_mod.seeds_markdown(by_seed, titles))
    return 0 if all(r.holds for recs in by_seed.values() for r in recs if r.gated) else 1


# --- running chapters ------------------------------------------------------------------------

def _show(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


EXECUTORS = ("local", "ray")


def _ray_execute(rel: str, number: str, slug: str, profile: str, seed: int, device: str,
                 timeout: float, stand_in: bool) -> tuple[dict, str | None, str | None]:
    """One chapter on a Ray worker, in the book's working directory as Ray shipped it: execute it
    into a temporary run directory and return its status, executed notebook and claim file."""
    import tempfile

    root = Path.cwd()
    ch = Chapter(number, slug, root / rel, Path(rel))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        status = execute_chapter(ch, profile, seed, device, out, timeout, stand_in)
        nb, cl = out / rel, out / "claims" / f"{number}.json"
        return (status, nb.read_text() if nb.exists() else None,
                cl.read_text() if cl.exists() else None)


class _LocalExecutor:
    """Chapters as processes on this machine, ``jobs`` at a time."""

    def __init__(self, jobs: int):
        self.pool = cf.ThreadPoolExecutor(max_workers=jobs)

    def submit(self, ch, profile, seed, device, out, lib, force, timeout, stand_in):
        return self.pool.submit(run_chapter, ch, profile, seed, device, out, lib, force, timeout,
                                stand_in)

    def close(self):
        self.pool.shutdown()


class _RayExecutor:
    """Every (chapter, seed) as a Ray task: one GPU in ``gpu``, one CPU otherwise. The book's
    directory is shipped to the workers (``runtime_env`` ``working_dir``, without ``_build`` and
    ``.git``); the executed notebook and claims come back and are written to the same run
    directory as a local run's. Cached chapters are not sent."""

    def __init__(self, root: Path, profile: str, address: str | None, jobs: int):
        try:
            import ray
        except ImportError:
            raise SystemExit("--executor ray needs Ray: pip install 'landscape_lib[cluster]' "
                             "(or pip install ray); valid executors: " + ", ".join(EXECUTORS)) from None
        self.ray, self.pool = ray, cf.ThreadPoolExecutor(max_workers=64)
        env = {"working_dir": str(root),
               "excludes": ["_build", ".git", ".cache", ".ci/node", "**/__pycache__"]}
        try:
            if address:
                ray.init(address=address, runtime_env=env, ignore_reinit_error=True,
                         log_to_driver=False)
            else:  # a Ray instance on this machine, for this run
                ray.init(num_cpus=jobs, runtime_env=env, ignore_reinit_error=True,
                         include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError, ... from ray.init
            raise SystemExit(f"could not connect to the Ray cluster at {address!r} ({exc}); "
                             f"valid addresses: 'auto' (the cluster this machine belongs to), "
                             f"HOST:PORT of a running head node (ray start --head), or none for "
                             f"a local Ray instance") from None
        resources = {"num_gpus": 1} if profile == "gpu" else {"num_cpus": 1}
        self.task = ray.remote(max_retries=1, **resources)(_ray_execute)

    def submit(self, ch, profile, seed, device, out, lib, force, timeout, stand_in):
        key = cache_key(ch, _params(profile, seed, device, stand_in), lib)
        cached = None if force else cached_status(ch, key, out)
        if cached is not None:
            done: cf.Future = cf.Future()
            done.set_result(cached)
            return done
        ref = self.task.remote(ch.rel.as_posix(), ch.number, ch.slug, profile, seed, device,
                               timeout, stand_in)
        return self.pool.submit(self._collect, ref, ch, out, key)

    def _collect(self, ref, ch: Chapter, out: Path, key: str) -> dict:
        t0 = time.time()
        try:
            status, nb, cl = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the worker died, the node went away, ...
            status, nb, cl = ({"status": "failed", "cell": None,
                               "error": f"Ray worker died ({type(exc).__name__}: {exc})"[:2000],
                               "seconds": round(time.time() - t0, 2)}, None, None)
        if nb is not None:
            (out / ch.rel).parent.mkdir(parents=True, exist_ok=True)
            (out / ch.rel).write_text(nb)
        if cl is not None:
            (out / "claims").mkdir(parents=True, exist_ok=True)
            (out / "claims" / f"{ch.number}.json").write_text(cl)
        return write_status(ch, out, status, key)

    def close(self):
        self.pool.shutdown()
        self.ray.shutdown()


def run(profile: str = "cpu", seed: int | Sequence[int] = 0, wanted: Sequence[str] = (),
        jobs: int | None = None, device: str = "auto", force: bool = False,
        timeout: float | None = None, out: str | Path | None = None, root: Path | None = None,
        executor: str = "local", address: str | None = None, stand_in: bool = False) -> int:
    """Execute the chapters ``wanted`` (all if empty) for every seed base in ``seed`` (an int or a
    list) and gather their claims (``python -m landscape_lib run``); non-zero if any (chapter,
    seed) failed.

    ``jobs`` chapters run at once locally (default: the number of cores); ``timeout`` is seconds
    per chapter (default :data:`DEFAULT_TIMEOUT` of the profile); ``out`` is the run directory of a
    single seed (default :func:`run_dir`). ``executor="ray"`` runs each (chapter, seed) as a Ray
    task on the cluster at ``address`` (``"auto"``, ``HOST:PORT``, or ``None`` for a local Ray
    instance). ``stand_in=True`` gives the chapters random CIFAR-shaped data (``data.load``), so
    every ``gpu`` code path runs without the real data; their claims are marked and never
    enforced, in their own run directories.
    """
    root = root or find_root()
    check_profile(profile)
    if executor not in EXECUTORS:
        raise SystemExit(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise SystemExit(f"seeds must be non-negative integers, got {seeds!r}")
    if out and len(seeds) > 1:
        raise SystemExit("--out names the run directory of one seed; with several seeds each "
                         "goes to _build/runs/<profile>-seed<N>")
    todo = select(chapters(root), wanted)
    if not todo:
        print("no chapters in _toc.yml")
        return 0
    outs = {s: (Path(out).resolve() if out else run_dir(root, profile, s, stand_in)) for s in seeds}
    for o in outs.values():
        o.mkdir(parents=True, exist_ok=True)
    lib = library_digest()
    jobs = max(1, jobs or os.cpu_count() or 1)
    where = (f"{min(jobs, len(todo) * len(seeds))} at a time" if executor == "local"
             else f"on Ray ({address or 'local instance'})")
    dest = _show(outs[seeds[0]], root) if len(seeds) == 1 else _show(outs[seeds[0]].parent, root)
    print(f"running {len(todo)} chapter(s) × {len(seeds)} seed(s), profile {profile}"
          f"{' (stand-in data)' if stand_in else ''}, seed{'s' if len(seeds) > 1 else ''} "
          f"{', '.join(map(str, seeds))}, {where} -> {dest}", flush=True)
    pool = _LocalExecutor(jobs) if executor == "local" else _RayExecutor(root, profile, address, jobs)
    failed = []
    label = (lambda c, s: c.slug) if len(seeds) == 1 else (lambda c, s: f"{c.slug} seed {s}")
    width = max(len(label(c, s)) for c in todo for s in seeds)
    try:
        futures = {pool.submit(c, profile, s, device, outs[s], lib, force,
                               timeout or DEFAULT_TIMEOUT[profile], stand_in): (c, s)
                   for s in seeds for c in todo}
        for fut in cf.as_completed(futures):
            ch, s = futures[fut]
            st = fut.result()
            name = label(ch, s)
            if st["status"] == "ok":
                tag = "cached" if st.get("cached") else "ok"
                note = f"  ({st['note']})" if st.get("note") and not st.get("cached") else ""
                print(f"  {name:<{width}}  {tag:<7} {st['seconds']:7.1f} s{note}", flush=True)
            else:
                failed.append(name)
                where = "no cell"
                if st.get("cell") is not None:
                    where = f"cell {st['cell']}" + (f": {st['code']}" if st.get("code") else "")
                print(f"  {name:<{width}}  FAILED  {st['seconds']:7.1f} s  ({where}) "
                      f"{st['error']}", flush=True)
                if st.get("stderr"):
                    print(textwrap.indent(st["stderr"], "      | "), flush=True)
    finally:
        pool.close()
    by_seed = {s: gather_claims(root, outs[s]) for s in seeds}
    for s, recs in by_seed.items():
        held = sum(r.holds for r in recs)
        ran = len(todo) - sum(1 for c in todo if label(c, s) in failed)
        print(f"{'' if len(seeds) == 1 else f'seed {s}: '}{ran} of {len(todo)} chapter(s) ran; "
              f"{held} of {len(recs)} claims hold; records in {_show(outs[s] / 'claims.json', root)}")
    if len(seeds) > 1:
        titles = {c.number: chapter_title(c.path) for c in chapters(root)}
        print(claims_mod.seeds_markdown(by_seed, titles))
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0
