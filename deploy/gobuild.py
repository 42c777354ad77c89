"""Builds the project's Go programs once and caches each binary under a hash of its sources.

The Collector distribution (`deploy/collector`) takes a minute or two to build and the
example signal subscriber (`examples/signal-subscriber`) a few seconds; both are rebuilt
only when a `.go` file, `go.mod` or `go.sum` changes. Modules come from the Go module
proxy (`go.sum` pins them); Go itself must be on the machine.

    python -m burnguard.deploy.gobuild collector|subscriber   # prints the binary's path
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
#: name -> source folder, for the make targets and the tests.
PROGRAMS: dict[str, Path] = {
    "collector": _REPO / "deploy" / "collector",
    "subscriber": _REPO / "examples" / "signal-subscriber",
}
CACHE = Path(os.environ.get("BURNGUARD_CACHE_DIR", Path.home() / ".cache" / "burnguard"))
#: Where a Go toolchain is often installed without being on PATH.
_GO_FALLBACKS = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")


class GoMissing(RuntimeError):
    """No usable Go toolchain: the message says what to install."""


def find_go() -> str:
    """The `go` command, or `GoMissing` naming the version the sources need."""
    found = shutil.which("go") or next((p for p in _GO_FALLBACKS if os.access(p, os.X_OK)), None)
    needed = _needed_go(PROGRAMS["collector"])
    if found is None:
        raise GoMissing(
            f"Go {needed} or newer is needed to build the Collector and the Go example "
            "(deploy/collector, examples/signal-subscriber): install it (e.g. `apt-get install golang-go` "
            "with a Go of 1.21+ fetches the newer toolchain by itself) and put `go` on PATH"
        )
    version = subprocess.run([found, "env", "GOVERSION"], capture_output=True, text=True).stdout.strip()
    if _version_tuple(version.removeprefix("go")) < (1, 21):
        raise GoMissing(f"{found} is {version}; Go {needed} or 1.21+ (which fetches {needed}) is needed")
    return found


def _needed_go(source: Path) -> str:
    match = re.search(r"^go (\S+)$", (source / "go.mod").read_text(), re.MULTILINE)
    return match.group(1) if match else "1.21"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def source_hash(source: Path) -> str:
    """A hash of everything that decides the binary: the Go files, go.mod and go.sum."""
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def binary_path(name: str) -> Path:
    """Where the binary of these sources is (or will be) cached."""
    return CACHE / name / source_hash(PROGRAMS[name]) / name


def build(name: str) -> Path:
    """The cached binary of program `name`, built first if its sources changed.

    A lock file keeps two test processes from building the same binary at once; the binary
    is written beside its final path and renamed, so a half-written one is never run.
    """
    if not (PROGRAMS[name] / "go.mod").exists():
        raise GoMissing(
            f"the Go sources of {name} are not at {PROGRAMS[name]}: build from a clone of burnguard"
        )
    target = binary_path(name)
    if target.exists():
        return target
    go = find_go()
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        partial = target.with_suffix(".partial")
        print(f"building {name} from {PROGRAMS[name]} (Go modules from the proxy; once)", file=sys.stderr)
        result = subprocess.run(
            [go, "build", "-trimpath", "-mod=readonly", "-ldflags=-s -w", "-o", str(partial), "."],
            cwd=PROGRAMS[name],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"go build of {PROGRAMS[name]} failed:\n{result.stderr[-4000:]}")
        partial.rename(target)
    return target


def main(argv: list[str]) -> int:
    """Build each named program and print its path (for `make collector` and `make subscriber`)."""
    names = argv or list(PROGRAMS)
    unknown = [name for name in names if name not in PROGRAMS]
    if unknown:
        print(f"unknown program {unknown[0]!r}; known: {', '.join(PROGRAMS)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            print(build(name))
    except GoMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
