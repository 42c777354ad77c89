"""Another revision's code next to this checkout's, so a benchmark compares both in the same run."""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
    return package
