"""The runner on a throw-away book of three tiny chapters: one passes, one raises, one records a
failing claim. Each run starts real Jupyter kernels through papermill."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from landscape_lib import claims, colab, runner


def _nb(cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell("# 9. A test chapter"))
    params = nbformat.v4.new_code_cell('PROFILE = "cpu"\nSEED = 0\nDEVICE = "auto"')
    params.metadata["tags"] = ["parameters"]
    nb.cells.append(params)
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


START = "from landscape_lib import claims\nclaims.start('{n}', PROFILE, SEED)"


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    (root / "book" / "part").mkdir(parents=True)
    (root / "_config.yml").write_text("title: t\nrepository:\n  url: https://github.com/o/r\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                                   "- file: book/part/91-ok\n- file: book/part/92-raises\n"
                                   "- file: book/part/93-claim-fails\n- file: book/part/94-hangs\n")
    (root / "book" / "intro.md").write_text("# intro\n")
    chapters = {
        "91-ok": [START.format(n="91"), "claims.check('c ok', 1.0, '>', 0.5)\nclaims.report();"],
        "92-raises": ["x = 1", "raise ValueError('boom in cell three')"],
        "93-claim-fails": [START.format(n="93"), "claims.check('c bad', 1.0, '<', 0.5)\nclaims.report();"],
        "94-hangs": ["import time\ntime.sleep(600)"],
    }
    for name, cells in chapters.items():
        nbformat.write(_nb(cells), root / "book" / "part" / f"{name}.ipynb")
    return root


# The throw-away book lies outside the repository, so `python -m landscape_lib` run there would
# import whatever landscape_lib is installed; point it at the package under test.
TREE_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(runner.PACKAGE_DIR.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def _run(root, *args):
    return subprocess.run([sys.executable, "-m", "landscape_lib", *args], cwd=root, env=TREE_ENV,
                          capture_output=True, text=True, timeout=600)


def test_the_runner_under_test_is_this_tree(book):
    proc = subprocess.run([sys.executable, "-c", "import landscape_lib.runner as r; print(r.__file__)"],
                          cwd=book, env=TREE_ENV, capture_output=True, text=True)
    assert Path(proc.stdout.strip()) == Path(runner.__file__).resolve(), proc.stdout + proc.stderr


def test_failures_are_reported_and_the_others_go_on(book):
    proc = _run(book, "run", "--profile", "cpu", "--jobs", "2", "91", "92", "93")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert " ok " in lines["91-ok"]
    assert "FAILED" in lines["92-raises"] and "(cell 4: raise ValueError(" in lines["92-raises"]
    assert "boom in cell three" in lines["92-raises"]
    assert "FAILED" in lines["93-claim-fails"] and "ClaimsFailed" in lines["93-claim-fails"]
    recs = json.loads((book / "_build/runs/cpu-seed0/claims.json").read_text())
    assert [(r["chapter"], r["claim"], r["holds"]) for r in recs] == [("91", "c ok", True), ("93", "c bad", False)]
    assert all(list(r) == list(claims.KEYS) for r in recs)
    assert {"gated", "reason", "values"} <= set(claims.KEYS)
    assert (book / "_build/runs/cpu-seed0/book/part/91-ok.ipynb").exists()

    # a re-run resumes: the finished chapter is cached, the failed ones run again
    again = _run(book, "run", "--profile", "cpu", "--jobs", "2", "91", "92", "93")
    lines = {ln.split()[0]: ln for ln in again.stdout.splitlines() if ln.startswith("  ")}
    assert "cached" in lines["91-ok"] and "FAILED" in lines["92-raises"]

    # in smoke the failing claim is recorded, not enforced
    smoke = _run(book, "run", "--profile", "smoke", "93")
    assert smoke.returncode == 0, smoke.stdout
    rec = json.loads((book / "_build/runs/smoke-seed0/claims.json").read_text())
    assert rec[0]["holds"] is False and rec[0]["profile"] == "smoke"


def test_cache_key_depends_on_notebook_parameters_and_library(book):
    ch = runner.chapters(book)[0]
    k = runner.cache_key(ch, {"PROFILE": "cpu", "SEED": 0, "DEVICE": "auto"}, "lib")
    assert k != runner.cache_key(ch, {"PROFILE": "cpu", "SEED": 1, "DEVICE": "auto"}, "lib")
    assert k != runner.cache_key(ch, {"PROFILE": "cpu", "SEED": 0, "DEVICE": "auto"}, "lib2")
    assert k == runner.cache_key(ch, {"SEED": 0, "PROFILE": "cpu", "DEVICE": "auto"}, "lib")


def test_cache_key_depends_on_torch_and_numpy_versions(book, monkeypatch):
    import numpy
    import torch

    ch = runner.chapters(book)[0]
    params = {"PROFILE": "cpu", "SEED": 0, "DEVICE": "auto"}
    k = runner.cache_key(ch, params, "lib")
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", torch.__version__ + ".changed")
        assert runner.cache_key(ch, params, "lib") != k
    with monkeypatch.context() as m:
        m.setattr(numpy, "__version__", numpy.__version__ + ".changed")
        assert runner.cache_key(ch, params, "lib") != k
    assert runner.cache_key(ch, params, "lib") == k


def _package(where, files):
    for rel, text in files.items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_text(text)
    return where


def test_library_digest_covers_subpackages_and_ignores_bytecode(tmp_path):
    files = {"__init__.py": "x = 1\n", "a.py": "a = 1\n", "sub/__init__.py": "",
             "sub/deep/b.py": "b = 1\n", "sub/deep/table.csv": "1,2\n"}
    pkg = _package(tmp_path / "one", files)
    d = runner.library_digest(pkg)
    # the same files written in the opposite order give the same digest
    assert runner.library_digest(_package(tmp_path / "two", dict(reversed(files.items())))) == d
    # bytecode is not source
    _package(pkg, {"__pycache__/a.cpython-311.pyc": "junk", "sub/deep/__pycache__/b.pyc": "junk",
                   "sub/stray.pyc": "junk"})
    assert runner.library_digest(pkg) == d
    # an edit two levels down, a new file, a rename, and bytes moved between files all count
    (pkg / "sub/deep/b.py").write_text("b = 2\n")
    assert runner.library_digest(pkg) != d
    (pkg / "sub/deep/b.py").write_text("b = 1\n")
    assert runner.library_digest(pkg) == d
    (pkg / "sub/deep/table.csv").write_text("1,3\n")
    assert runner.library_digest(pkg) != d
    (pkg / "sub/deep/table.csv").write_text("1,2\n")
    (pkg / "sub/new.py").write_text("")
    assert runner.library_digest(pkg) != d
    (pkg / "sub/new.py").unlink()
    (pkg / "a.py").rename(pkg / "a2.py")
    assert runner.library_digest(pkg) != d
    (pkg / "a2.py").rename(pkg / "a.py")
    (pkg / "__init__.py").write_text("x = 1\na")
    (pkg / "a.py").write_text(" = 1\n")
    assert runner.library_digest(pkg) != d
    # the default is the runner's own package
    assert runner.library_digest() == runner.library_digest(runner.PACKAGE_DIR)


def test_an_edit_in_a_subpackage_of_the_library_reruns_the_chapter(book, tmp_path):
    """The runner digests the library it runs from: here a copy of it, with a subpackage added."""
    lib = tmp_path / "lib"
    shutil.copytree(runner.PACKAGE_DIR, lib / "landscape_lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    probe = lib / "landscape_lib" / "_probe_sub" / "__init__.py"
    probe.parent.mkdir()
    probe.write_text('"""a subpackage only this test has"""\n')
    env = {**os.environ, "PYTHONPATH": str(lib)}
    where = subprocess.run([sys.executable, "-c", "import landscape_lib; print(landscape_lib.__file__)"],
                           cwd=book, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(lib / "landscape_lib" / "__init__.py"), where.stdout + where.stderr

    def tag():
        proc = subprocess.run([sys.executable, "-m", "landscape_lib", "run", "--profile", "cpu",
                               "--out", str(tmp_path / "run"), "91"],
                              cwd=book, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("  91-ok"))
        return line.split()[1]

    assert tag() == "ok"
    (probe.parent / "__pycache__").mkdir()
    (probe.parent / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"junk")
    assert tag() == "cached"
    probe.write_text('"""a subpackage only this test has, edited"""\n')
    assert tag() == "ok"
    assert tag() == "cached"


def test_chapter_selection(book):
    all_ch = runner.chapters(book)
    assert [c.slug for c in all_ch] == ["91-ok", "92-raises", "93-claim-fails", "94-hangs"]
    assert [c.slug for c in runner.select(all_ch, ["91"])] == ["91-ok"]
    assert [c.slug for c in runner.select(all_ch, ["93-claim"])] == ["93-claim-fails"]
    assert [c.slug for c in runner.select(all_ch, ["raises"])] == ["92-raises"]
    with pytest.raises(SystemExit, match="valid chapters: 91-ok, 92-raises, 93-claim-fails, 94-hangs"):
        runner.select(all_ch, ["07"])


def test_a_hanging_chapter_is_killed_and_retried_once(book):
    t0 = time.time()
    proc = _run(book, "run", "--profile", "cpu", "--timeout", "8", "94")
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and "timed out after 8 s (attempt 2 of 2)" in proc.stdout
    assert time.time() - t0 < 120
    # nothing is left running: neither papermill nor its kernel (found by the environment the
    # runner gave them, which names this book's run directory)
    marker = str(book / "_build" / "runs").encode()
    left = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in env.read_bytes():
                left.append(env.parent.name)
        except OSError:
            pass
    assert not left, f"processes still running: {left}"


def test_unknown_profile_is_rejected(book):
    proc = _run(book, "run", "--profile", "laptop")
    assert proc.returncode == 2 and "invalid choice: 'laptop'" in proc.stderr and "smoke" in proc.stderr


def test_colab_links_derive_from_the_config(root):
    ch = runner.chapters(root)[0]
    badge, req = colab.colab_links(root, ch)
    assert badge.endswith(f"/blob/main/{ch.rel.as_posix()})")
    assert req.startswith("git+https://github.com/") and req.endswith(".git@main")


def test_every_notebook_is_in_sync_with_the_config(root):
    proc = subprocess.run([sys.executable, "-m", "landscape_lib", "sync", "--check"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_chapter_notebooks_follow_the_template(root):
    for ch in runner.chapters(root):
        nb = json.loads(ch.path.read_text())
        cells = nb["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), ch.slug
        tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
        assert tags.count("parameters") == 1, ch.slug
        params = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        src = "".join(params["source"])
        assert [ln.split("=")[0].strip() for ln in src.splitlines() if ln.strip()] == ["PROFILE", "SEED", "DEVICE"]
        text = "".join("".join(c["source"]) for c in cells)
        assert ("claims.check(" in text or "claims.check_seeds(" in text) and "claims.report()" in text, ch.slug
        assert "viz.slider_figure(" in text, ch.slug
        assert "## Reproduction" in text and "## Summary" in text and "## Exercises" in text, ch.slug
        assert ":class: dropdown" in text and "viz.provenance(" in text, ch.slug
        assert "".join(cells[0]["source"]).startswith(f"# {int(ch.number)}. "), ch.slug


def test_a_kernel_that_does_not_start_is_tried_again_but_a_failing_cell_is_not(book, monkeypatch, tmp_path):
    """Kernels started at the same moment can collide on their ports; that is retried, with the
    attempts noted. A chapter that fails in a cell is the chapter's fault and is not retried."""
    died = {"status": "failed", "cell": None,
            "error": "RuntimeError: Kernel died before replying to kernel_info"}
    ok = {"status": "ok"}
    raised = {"status": "failed", "cell": 4, "code": "raise ValueError(", "error": "ValueError: boom"}
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    ch = runner.chapters(book)[0]

    def run_with(outcomes):
        calls = iter(outcomes)
        monkeypatch.setattr(runner, "_execute_once", lambda *a: dict(next(calls)))
        st = runner.run_chapter(ch, "cpu", 0, "auto", tmp_path, "lib", True, 10.0)
        return st, len(outcomes) - sum(1 for _ in calls)

    st, used = run_with([died, ok])
    assert st["status"] == "ok" and used == 2 and "kernel did not start (attempt 1 of 3)" in st["note"]
    st, used = run_with([died, died, died, ok])
    assert st["status"] == "failed" and used == 3 and "kernel_info" in st["error"]
    st, used = run_with([raised, ok])
    assert st["status"] == "failed" and used == 1 and st["cell"] == 4


# --- seeds, executors, stand-in data, the scoreboard of several runs ---------------------------

@pytest.mark.parametrize("text,seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,3,7", [0, 3, 7]),
                                        ("0-2,7", [0, 1, 2, 7]), ("5", [5]), ("1,1-2", [1, 2])])
def test_seed_ranges(text, seeds):
    assert runner.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["3-1", "a", "-1", "0-", "1,,2", "0-4x", ""])
def test_bad_seed_ranges_name_the_forms(text):
    with pytest.raises(ValueError, match="N-M|comma-separated"):
        runner.parse_seeds(text)


def _rec(chapter, claim, measured, holds, seed, gated=True, profile="cpu", stand_in=False):
    return claims.Record(chapter, claim, measured, ">", 0.5, holds, gated, None, "", "", profile, seed,
                         stand_in)


def test_the_seeds_summary_counts_holds_on_a_hand_made_pair_of_runs(tmp_path):
    a = [_rec("01", "robust", 0.9, True, 0), _rec("01", "lucky", 0.8, True, 0),
         _rec("02", "fails", 0.1, False, 0), _rec("02", "only on seed 0", 0.7, True, 0)]
    b = [_rec("01", "robust", 0.7, True, 1), _rec("01", "lucky", 0.2, False, 1),
         _rec("02", "fails", 0.3, False, 1)]
    for seed, recs in ((0, a), (1, b)):
        claims.save(recs, tmp_path / f"{seed}.json")
    by_seed = {s: claims.load(tmp_path / f"{s}.json") for s in (0, 1)}
    rows = {r["claim"]: r for r in claims.seeds_summary(by_seed)}
    assert (rows["robust"]["held"], rows["robust"]["flag"]) == (2, False)
    assert rows["robust"]["mean"] == pytest.approx(0.8) and rows["robust"]["low"] == pytest.approx(0.7)
    assert (rows["lucky"]["held"], rows["lucky"]["flag"]) == (1, True)  # holds on seed 0 only
    assert (rows["fails"]["held"], rows["fails"]["flag"]) == (0, False)
    assert rows["only on seed 0"]["missing"] == [1] and rows["only on seed 0"]["flag"]
    md = claims.seeds_markdown(by_seed)
    assert "1 of 4 claims hold on every seed base; 2 hold on seed 0 but not on every one" in md
    assert "| 01 | lucky | yes | 1/2 ⚠ |" in md


def test_the_scoreboard_shows_each_profile_side_by_side(tmp_path):
    from landscape_lib import book as book_mod

    root = tmp_path
    (root / "book" / "part").mkdir(parents=True)
    (root / "_config.yml").write_text("title: t\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n- file: book/part/01-a\n")
    (root / "book" / "intro.md").write_text("# intro\n")
    (root / "book" / "scoreboard.md").write_text("# placeholder\n")
    nbformat.write(_nb(["x = 1"]), root / "book" / "part" / "01-a.ipynb")
    runs = root / "_build" / "runs"
    layout = {"cpu-seed0": [_rec("01", "c1", 0.9, True, 0)],
              "smoke-seed0": [_rec("01", "c1", 0.2, False, 0, profile="smoke")],
              "gpu-standin-seed0": [_rec("01", "c1", 0.3, False, 0, profile="gpu", stand_in=True)],
              "cpu-seed1": [_rec("01", "c1", 0.4, False, 1)]}
    for name, recs in layout.items():
        (runs / name).mkdir(parents=True)
        claims.save(recs, runs / name / "claims.json")
    book_mod.stage(root, runs / "cpu-seed0", root / "_build" / "src", failed=[])
    page = (root / "_build" / "src" / "book" / "scoreboard.md").read_text()
    head = next(ln for ln in page.splitlines() if ln.startswith("| claim |"))
    assert head == "| claim | test | cpu, seed 0 | gpu stand-in, seed 0 | smoke, seed 0 | seeds | paper | note |"
    row = next(ln for ln in page.splitlines() if "c1" in ln and "reproduction" in ln)
    assert '<span class="claim-holds">✓ holds</span> 0.9' in row
    assert '<span class="claim-fails">✗ fails</span> 0.2' in row and "1/2 ⚠" in row
    assert "[9. A test chapter](part/01-a.ipynb)" in page and "(part/01-a.ipynb#reproduction)" in page
    assert "stand-in" in page and "never enforced" in page


def test_stand_in_claims_are_recorded_apart_and_not_enforced(book):
    proc = _run(book, "run", "--profile", "gpu", "--stand-in-data", "--device", "cpu", "93")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # its gated claim fails, unenforced
    assert "(stand-in data)" in proc.stdout
    rec = json.loads((book / "_build/runs/gpu-standin-seed0/claims.json").read_text())
    assert rec[0]["holds"] is False and rec[0]["stand_in"] is True and rec[0]["profile"] == "gpu"
    assert not (book / "_build/runs/gpu-seed0/claims.json").exists()
    shown = _run(book, "claims", "--profile", "gpu", "--stand-in-data")
    assert "c bad" in shown.stdout


def test_several_seeds_run_and_are_summarised(book):
    proc = _run(book, "run", "--profile", "smoke", "--seeds", "0-1", "91", "93")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("  ")]
    assert sorted(ln.split()[0] + " " + ln.split()[2] for ln in lines) == [
        "91-ok 0", "91-ok 1", "93-claim-fails 0", "93-claim-fails 1"]
    for s in (0, 1):
        recs = json.loads((book / f"_build/runs/smoke-seed{s}/claims.json").read_text())
        assert [r["seed"] for r in recs] == [s, s]
    assert "Over seed bases 0, 1" in proc.stdout and "| 9. A test chapter | c ok | yes | 2/2 |" in proc.stdout
    shown = _run(book, "claims", "--profile", "smoke", "--seeds", "0,1")
    assert "| 9. A test chapter | c bad | yes | 0/2 |" in shown.stdout and shown.returncode == 1
    assert "--out names the run directory of one seed" in _run(
        book, "run", "--profile", "smoke", "--seeds", "0-1", "--out", "x").stdout + _run(
        book, "run", "--profile", "smoke", "--seeds", "0-1", "--out", "x").stderr


def test_executor_and_address_errors_name_the_choices(book):
    bad = _run(book, "run", "--executor", "dask", "91")
    assert bad.returncode == 2 and "choose from 'local', 'ray'" in bad.stderr
    lone = _run(book, "run", "--address", "auto", "91")
    assert lone.returncode == 2 and "--address goes with --executor ray" in lone.stderr
    pytest.importorskip("ray")
    far = _run(book, "run", "--executor", "ray", "--address", "10.255.255.1:6379", "91")
    assert far.returncode != 0 and "could not connect to the Ray cluster" in far.stdout + far.stderr


def test_ray_without_ray_installed_says_how_to_get_it(book, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SystemExit, match=r"needs Ray: pip install 'landscape_lib\[cluster\]'"):
        runner.run("smoke", 0, ["91"], root=book, executor="ray")


@pytest.mark.slow
def test_a_local_ray_cluster_gives_the_local_runs_claims(book, tmp_path):
    """Two chapters × two seeds as Ray tasks on a local instance write the same run directories as
    the local executor (claims identical, executed notebooks present)."""
    pytest.importorskip("ray")
    local = _run(book, "run", "--profile", "smoke", "--seeds", "0-1", "--force", "91", "93")
    assert local.returncode == 0, local.stdout + local.stderr
    before = {s: json.loads((book / f"_build/runs/smoke-seed{s}/claims.json").read_text()) for s in (0, 1)}
    for s in (0, 1):
        shutil.rmtree(book / f"_build/runs/smoke-seed{s}")
    ray_run = _run(book, "run", "--profile", "smoke", "--seeds", "0-1", "--executor", "ray",
                   "--jobs", "2", "91", "93")
    assert ray_run.returncode == 0, ray_run.stdout + ray_run.stderr
    assert "on Ray (local instance)" in ray_run.stdout
    for s in (0, 1):
        out = book / f"_build/runs/smoke-seed{s}"
        assert json.loads((out / "claims.json").read_text()) == before[s]
        assert (out / "book/part/91-ok.ipynb").exists() and (out / ".cache/91-ok.json").exists()
    # cached results are not sent to the cluster again
    again = _run(book, "run", "--profile", "smoke", "--seeds", "0-1", "--executor", "ray", "91", "93")
    assert again.stdout.count("cached") == 4, again.stdout
