"""Another revision's code next to this checkout's, so a benchmark compares both in the same run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


def export_revision(rev: str, into: Path, components: Sequence[str]) -> Path:
    """`burnguard` and `components` of `rev` laid out as `burnguard.*`: the folder to put first on
    PYTHONPATH (or sys.path) to import that revision's code."""
    archive = into / "old.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", rev, "burnguard", *components], cwd=REPO, stdout=out, check=True)
    source = into / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    package = into / "pkg"
    package.mkdir()
    (package / "burnguard").symlink_to(source / "burnguard")
    for component in components:
        (source / "burnguard" / component).symlink_to(source / component)
    build_native(source)
    return package


def build_native(source: Path) -> None:
    """The revision's native module (contracts/native), built as `make venv` builds it, into its
    `contracts/`: without it the revision's decoding would run pure-Python beside this checkout's
    native one, and the comparison would measure that. A revision without the crate, or a failed
    build: said on stderr, and that side runs pure-Python.

    In its own cargo target folder (`target/compare`: what changed since the last compared
    revision compiles), the exported files dated now. `git archive` dates them at the commit and
    cargo's dep-info names a crate's files relative to its root: in the checkout's folder, the
    revision counted as built by the checkout's newer build, whose library was copied as the old
    one (an old side calling this checkout's native classes; helper hC, 2026-12-03)."""
    crate = source / "contracts" / "native"
    if not (crate / "Cargo.toml").exists():
        return
    for path in crate.rglob("*"):
        os.utime(path)
    target = REPO / "contracts" / "native" / "target" / "compare"
    built = subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", str(crate / "Cargo.toml")],
        env={**os.environ, "CARGO_TARGET_DIR": str(target)},
        capture_output=True,
        text=True,
    )
    library = target / "release" / "lib_otlp_native.so"
    if built.returncode != 0 or not library.exists():
        print(
            f"[bench] the old revision's native module did not build; it runs pure-Python:\n{built.stderr}",
            file=sys.stderr,
        )
        return
    shutil.copyfile(library, source / "contracts" / f"_otlp_native{sysconfig.get_config_var('EXT_SUFFIX')}")


def add_compare_arguments(parser: argparse.ArgumentParser, rounds: int = 2) -> None:
    """`--compare REV` and `--rounds N`, as `alternating_runs` takes them."""
    parser.add_argument("--compare", default="none", help="git revision to measure too, or 'none'")
    parser.add_argument("--rounds", type=int, default=rounds, help="with --compare: old/new alternations")


def alternating_runs(
    compare: str,
    rounds: int,
    components: Sequence[str],
    run_new: Callable[[], T],
    run_old: Callable[[Path], T],
) -> dict[str, list[T]]:
    """{"new": [...], "old": [...]}: `compare`'s code (run_old, given its import path) and this
    checkout's (run_new), alternating `rounds` times, old first, so drift in the machine's load
    hits both alike; only one new run when `compare` is "none"."""
    runs: dict[str, list[T]] = {"new": [], "old": []}
    with tempfile.TemporaryDirectory() as scratch:
        old_path = export_revision(compare, Path(scratch), components) if compare != "none" else None
        for _ in range(rounds if old_path else 1):
            if old_path:
                runs["old"].append(run_old(old_path))
            runs["new"].append(run_new())
    return runs


def in_run_order(runs: dict[str, list[T]]) -> Iterator[tuple[str, T]]:
    """`alternating_runs`' results as ("old" | "new", result) in the order they ran: reports of a
    pair stay side by side."""
    for old, new in zip_longest(runs["old"], runs["new"]):
        if old is not None:
            yield "old", old
        yield "new", new


def paired_ratios(runs: dict[str, list[T]], figure: Callable[[T], float]) -> list[float]:
    """new / old of `figure` for each round of `alternating_runs` (its old run, then its new one).

    One run of the worker moves ±10% on this machine (BENCHMARKS.md, "Session 38 end to end"):
    a step of a few percent shows only in the spread of many rounds' pairs, each pair taken
    minutes apart under the same drift.
    """
    return [figure(new) / figure(old) for old, new in zip(runs["old"], runs["new"], strict=False)]


def ratio_summary(name: str, ratios: Sequence[float]) -> str:
    """`NAME_median=… NAME_low=… NAME_high=…` of per-round ratios, for a RESULT line."""
    median, low, high = statistics.median(ratios), min(ratios), max(ratios)
    return f"{name}_median={median:.3f} {name}_low={low:.3f} {name}_high={high:.3f}"


def child_result(command: Sequence[str], pythonpath: Path | None) -> dict[str, Any]:
    """Run a bench's `--child` with the exported revision at `pythonpath` (None: this checkout)
    first on its path; the JSON object its last line prints."""
    paths = [str(pythonpath), str(BENCH_DIR)] if pythonpath else [str(BENCH_DIR)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def parsed_or_child(
    parser: argparse.ArgumentParser, measure: Callable[[argparse.Namespace, Path], Any]
) -> Any:
    """The parsed arguments, or None once a `--child` run (a bench's child process) has printed
    `measure`'s JSON for the records' file it names."""
    args = parser.parse_args()
    logging.getLogger("faust").setLevel(logging.WARNING)
    if args.child:
        print(json.dumps(measure(args, Path(args.child))))
        return None
    return args
