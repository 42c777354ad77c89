"""How the components log: the Kafka clients' connection chatter stays below WARNING unless asked for.

kafka-python logs every metadata refresh ("Updated metadata ...") and connection step at INFO,
twice a second on a busy sink, burying what matters; aiokafka (under Faust) does the same. Their
warnings and errors (a broker down, a retry) still show. `--verbose` or `BURNGUARD_VERBOSE=1`
brings the chatter back for debugging; the variable reaches the processes `burnguard dev up` starts.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "BURNGUARD_VERBOSE"
#: The loggers of the Kafka clients the components use.
CHATTY_LOGGERS = ("kafka", "aiokafka")


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_library_logs(verbose: bool | None = None) -> None:
    """Kafka clients' loggers at WARNING, or (verbose) following the root level again."""
    level = logging.NOTSET if (verbose_requested() if verbose is None else verbose) else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
