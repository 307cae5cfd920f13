"""Side-by-side benchmark: the plain model, tilefn and lightstream, each case in its own process.

Every case (one model, image side, tile size, system and mode) runs in a fresh subprocess of
this script (``--worker``), so peak RSS is per case and nothing leaks from one case into the
next. A case builds the network (``weights=None``, fixed seed), a random float32 image of shape
(1, 3, S, S) with a fixed seed, a head (global average pool + ``Linear(C, 2)``) and a
cross-entropy loss on a fixed label, then times

* ``train``: trunk forward + head + loss + backward (parameter grads of trunk and head);
* ``infer``: trunk forward under ``torch.no_grad()``.

Setup (tilefn's planning, lightstream's statistics pass) is untimed for the step and recorded
separately as ``setup_s``; the step time is the minimum over ``--repeats``. Each finished case
is appended as one JSON line to ``--results`` (an interrupted run keeps what it finished) and
printed; at the end the table in ``--doc`` (between the ``results`` markers) and the plot
``--plot`` are re-rendered from the whole results file (``--no-doc``, ``--no-plot``: not
written; an empty path is an error).

Systems: ``plain`` (the model itself; skipped with a note when its estimated memory exceeds
``--max-plain-gb``), ``tilefn`` (``tilefn.streamify(trunk, tile, **options)``), ``tilefn:LABEL``
(a second tilefn configuration, options from ``--tilefn-options 'LABEL={...}'``) and
``lightstream`` (version 1.0.7, built on CPU around the same trunk; see
``_systems.build_lightstream``).

    python benchmarks/compare.py --models resnet18 --sizes 2048 --tiles 1024 --threads 1 \\
        --results benchmarks/results/resnet18.jsonl
    python benchmarks/compare.py --report --results benchmarks/results/resnet18.jsonl
    python benchmarks/compare.py --models tiny --sizes 256 --tiles 128 --no-doc --no-plot
    python benchmarks/compare.py --systems plain,tilefn,tilefn:budget \\
        --tilefn-options 'budget={"memory_budget": 8000000000}'

Not part of the test run (tests/test_benchmarks.py runs it once on a tiny model).
"""

# The code lives in sibling modules: _cases.py (case list, one subprocess per case, results
# file, RSS and machine facts), _systems.py (plain PyTorch, tilefn and lightstream: trunks and
# one timed case in the worker) and _report.py (table, doc block, plot).

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Run as a script, Python puts this folder first on sys.path already; imported any other way
# (or from a worker started with another sys.path), the sibling modules must still be found.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _cases import csv, run_all  # noqa: E402
from _report import report  # noqa: E402
from _systems import worker_main  # noqa: E402


def path_arg(off_flag: str | None = None) -> Callable[[str], str]:
    """An argparse ``type`` for a file path that refuses an empty one.

    An empty value (or one of only spaces and quotes, as a doubly quoted ``"''"`` arrives) would
    otherwise name a file like ``''`` in the current folder; argparse reports the error with
    the flag's name, and ``off_flag`` (``--no-doc``) is suggested for writing nothing.
    """

    def check(value: str) -> str:
        if not value.strip(" \t\n'\""):
            hint = f"; use {off_flag} to write none" if off_flag else ""
            raise argparse.ArgumentTypeError(f"empty path {value!r}{hint}")
        return value

    return check


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        type=csv(str),
        default=["resnet18", "resnet50"],
        help="comma-separated: tiny (a small test net) or torchvision model names; trunk = children()[:-2] (default: %(default)s)",
    )
    parser.add_argument(
        "--tiles",
        type=csv(int),
        default=[1024, 1536, 2048],
        help="tile sizes (px); tiles larger than the image are left out (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        type=csv(int),
        default=[2048, 3072, 4096, 8192],
        help="image sides S, image (1, 3, S, S) (default: %(default)s)",
    )
    parser.add_argument(
        "--systems",
        type=csv(str),
        default=["plain", "tilefn", "lightstream"],
        help="plain, tilefn, tilefn:LABEL, lightstream (default: %(default)s)",
    )
    parser.add_argument(
        "--modes",
        type=csv(str),
        default=["train", "infer"],
        help="train and/or infer (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch.set_num_threads and OMP_NUM_THREADS in each worker (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed steps per case; the minimum is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed steps before the timed ones, for every system (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per case (default: %(default)s)"
    )
    parser.add_argument(
        "--max-plain-gb",
        type=float,
        default=18,
        help="skip plain cases whose estimated memory exceeds this many GB (default: %(default)s)",
    )
    parser.add_argument(
        "--lightstream-min-tile",
        type=int,
        default=1024,
        help="skip lightstream below this tile (its backward crashed on CPU at tile 512) (default: %(default)s)",
    )
    parser.add_argument(
        "--lightstream-max-tiles",
        type=int,
        default=0,
        help="skip lightstream train cases whose backward would run more tiles than this, found "
        "after its statistics pass (ResNet-18 discards about 490 px of gradient per tile side, so "
        "tile 1024 on a 2048^2 image needs 1156 backward tiles); 0: no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--tilefn-options",
        action="append",
        metavar="[LABEL=]JSON",
        help="keyword arguments for tilefn.streamify: '{...}' for system tilefn, 'LABEL={...}' for system tilefn:LABEL; repeatable",
    )
    parser.add_argument(
        "--results",
        type=path_arg(),
        default="benchmarks/results/compare.jsonl",
        help="JSON-lines results file, appended to (default: %(default)s)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only render the table and plot from --results"
    )
    doc_group = parser.add_mutually_exclusive_group()
    doc_group.add_argument(
        "--doc",
        type=path_arg("--no-doc"),
        default="docs/benchmarks.md",
        help="markdown file whose results block is rewritten (default: %(default)s)",
    )
    doc_group.add_argument("--no-doc", action="store_true", help="write no markdown file")
    plot_group = parser.add_mutually_exclusive_group()
    plot_group.add_argument(
        "--plot",
        type=path_arg("--no-plot"),
        default="docs/img/benchmarks.png",
        help="PNG written with matplotlib (default: %(default)s)",
    )
    plot_group.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    for mode in args.modes:
        if mode not in ("train", "infer"):
            parser.error(f"--modes: unknown mode {mode!r}")
    if not args.report:
        run_all(args)
    report(args.results, None if args.no_doc else args.doc, None if args.no_plot else args.plot)


if __name__ == "__main__":
    main()
