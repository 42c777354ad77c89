"""The premise of the warm worker processes (`tests/support/warm_worker.py`): importing the worker's
modules reads no `BURNGUARD_*` variable, so a process that imported them under one test's
environment runs a later test's worker exactly as a fresh `python -m burnguard.stream` would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.warm_worker import PRELOADED

#: Imports the preloaded module with `os.environ` recording every `BURNGUARD_*` key it is asked for.
WATCH_IMPORT = """
import json, os, sys
read = []

class Watched(os._Environ):
    def __getitem__(self, key):
        if str(key).startswith("BURNGUARD_"):
            read.append(key)
        return super().__getitem__(key)

os.environ.__class__ = Watched
import importlib
importlib.import_module(sys.argv[1])
print(json.dumps(read))
"""


def burnguard_variables_read_at_import(module: str) -> list[str]:
    """With no `BURNGUARD_*` variable set, so a library copying the whole environment reads none:
    every key recorded is one looked up by name."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BURNGUARD_")}
    done = subprocess.run(
        [sys.executable, "-c", WATCH_IMPORT, module],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_watch_sees_a_read_at_import() -> None:
    assert burnguard_variables_read_at_import("tests.support.reads_env_at_import") == ["BURNGUARD_PROBE"]


def test_importing_the_worker_reads_no_burnguard_variable() -> None:
    assert burnguard_variables_read_at_import(PRELOADED) == []
