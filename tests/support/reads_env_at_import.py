"""A module that reads a `BURNGUARD_*` variable at import: what `tests/test_warm_worker.py` must catch."""

import os

PROBE = os.environ.get("BURNGUARD_PROBE", "")
