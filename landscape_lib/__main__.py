"""The book's command line: run chapters with papermill, build the book, print the scoreboard.

::

    python -m landscape_lib run    [--profile smoke|cpu|gpu] [--seed N | --seeds 0-4] [--jobs N]
                                   [--executor local|ray [--address A]] [--stand-in-data] [CHAPTER ...]
    python -m landscape_lib build  [--profile ...] [--seed N] [--jobs N] [--stand-in-data]
    python -m landscape_lib claims [--profile ...] [--seed N | --seeds 0-4] [--stand-in-data]
    python -m landscape_lib list
    python -m landscape_lib sync   [--check]
    python -m landscape_lib check  [CHAPTER ...]
    python -m landscape_lib student [CHAPTER ...] --out DIR
    python -m landscape_lib grade  SUBMISSIONS_DIR [--profile smoke|cpu] [--out grades.csv]

This module only parses arguments and dispatches; each sub-command is one function elsewhere:

- ``run``: :func:`landscape_lib.runner.run` executes chapter notebooks (PROFILE, SEED and DEVICE
  injected) into ``_build/runs/<profile>-seed<N>/``, caching finished chapters and retrying those
  whose kernel died at start or hung (the rules are in ``runner``'s docstring), and gathers their
  claims into the run directory's ``claims.json``;
- ``build``: :func:`landscape_lib.book.build` runs (cached), stages the executed notebooks and
  generated pages in ``_build/src`` and calls ``jupyter-book build`` (site in ``_build/html``);
- ``claims``: :func:`landscape_lib.runner.show_claims` prints a run's scoreboard;
- ``list``: :func:`landscape_lib.runner.list_chapters`;
- ``sync``: :func:`landscape_lib.colab.sync` rewrites every chapter's "Open in Colab" badge and
  Colab install cell from the repository URL in ``_config.yml`` (``--check`` only reports);
- ``check``: :func:`landscape_lib.check.main` lints the chapters against the template and the
  library against its rules;
- ``student``: :func:`landscape_lib.coursework.student` writes student copies (solutions out);
- ``grade``: :func:`landscape_lib.coursework.grade` runs submissions and writes a CSV of points;
- ``_execute`` (hidden, used by the runner): :func:`landscape_lib.runner.execute_notebook` runs
  one notebook with papermill in its own process.
"""
from __future__ import annotations

import argparse
import sys

from . import book, check, colab, coursework, runner
from .config import PROFILES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landscape_lib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, jobs=True, seeds=True):
        p.add_argument("--profile", default="cpu", choices=PROFILES,
                       help="smoke (CI, seconds), cpu (default, about a minute), gpu (paper scale)")
        p.add_argument("--seed", type=int, default=0, help="the seed base (default 0)")
        if seeds:
            p.add_argument("--seeds", default=None, metavar="RANGE",
                           help="several seed bases: N-M, a comma-separated list (0,3,7) or both "
                                "(0-2,7); replaces --seed")
        p.add_argument("--stand-in-data", action="store_true",
                       help="random images of CIFAR's shapes instead of CIFAR (gpu code paths "
                            "without the data); claims recorded apart and never enforced")
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
    p.add_argument("--executor", default="local", choices=runner.EXECUTORS,
                   help="local (processes on this machine, default) or ray (tasks on a Ray cluster)")
    p.add_argument("--address", default=None,
                   help="with --executor ray: 'auto' (the cluster this machine belongs to) or "
                        "HOST:PORT of a head node; default: a local Ray instance")
    p.add_argument("--out", default=None,
                   help="run directory (default _build/runs/<profile>-seed<N>)")
    p.add_argument("chapters", nargs="*", metavar="CHAPTER", help="number (01) or slug prefix")
    p = sub.add_parser("build", help="run (cached) and build the HTML book")
    common(p, seeds=False)
    common(sub.add_parser("claims", help="print the scoreboard of a run (or of several seed bases)"),
           jobs=False)
    sub.add_parser("list", help="list the chapters")
    p = sub.add_parser("sync", help="derive Colab badges/install cells from _config.yml")
    p.add_argument("--check", action="store_true", help="only report what is out of date")
    p = sub.add_parser("check", help="lint the chapters against the template, and the library")
    p.add_argument("chapters", nargs="*", metavar="CHAPTER", help="number (01) or slug prefix")
    p = sub.add_parser("student", help="student copies of chapters: graded solutions and dropdowns out")
    p.add_argument("chapters", nargs="*", metavar="CHAPTER", help="number (01) or slug prefix")
    p.add_argument("--out", required=True, help="folder for the copies and a README")
    p = sub.add_parser("grade", help="run submitted chapters and write a CSV of points per exercise")
    p.add_argument("submissions", help="folder of submissions: <folder>/<student>/<chapter>.ipynb")
    p.add_argument("--profile", default="smoke", choices=("smoke", "cpu"),
                   help="the scale the submissions run at (default smoke)")
    p.add_argument("--out", default="grades.csv", help="the CSV to write (default grades.csv)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per notebook")
    p = sub.add_parser("_execute")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--profile", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--allow-errors", action="store_true")

    a = parser.parse_args(argv)
    seeds = getattr(a, "seed", 0)
    if getattr(a, "seeds", None) is not None:
        try:
            seeds = runner.parse_seeds(a.seeds)
        except ValueError as exc:
            parser.error(str(exc))
    if a.command == "run":
        if a.address and a.executor != "ray":
            parser.error("--address goes with --executor ray")
        return runner.run(a.profile, seeds, a.chapters, jobs=a.jobs, device=a.device,
                          force=a.force, timeout=a.timeout, out=a.out, executor=a.executor,
                          address=a.address, stand_in=a.stand_in_data)
    if a.command == "build":
        return book.build(a.profile, a.seed, jobs=a.jobs, device=a.device, force=a.force,
                          timeout=a.timeout, stand_in=a.stand_in_data)
    if a.command == "claims":
        return runner.show_claims(a.profile, seeds, stand_in=a.stand_in_data)
    if a.command == "list":
        return runner.list_chapters()
    if a.command == "sync":
        return colab.sync(check=a.check)
    if a.command == "check":
        return check.main(a.chapters)
    if a.command == "student":
        return coursework.student(a.chapters, a.out)
    if a.command == "grade":
        return coursework.grade(a.submissions, a.profile, a.out, timeout=a.timeout)
    return runner.execute_notebook(a.input, a.output, profile=a.profile, seed=a.seed,
                                   device=a.device, status=a.status, allow_errors=a.allow_errors)


if __name__ == "__main__":
    sys.exit(main())
