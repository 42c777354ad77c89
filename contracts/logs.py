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
LOG_LEVEL_ENV = "BURNGUARD_LOG_LEVEL"
#: The loggers of the Kafka clients the components use.
CHATTY_LOGGERS = ("kafka", "aiokafka")


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_library_logs(verbose: bool | None = None) -> None:
    """Kafka clients' loggers at WARNING, or (verbose) following the root level again."""
    level = logging.NOTSET if (verbose_requested() if verbose is None else verbose) else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def env_log_level() -> str:
    """`BURNGUARD_LOG_LEVEL` in lower case (info if unset or blank), refused naming the variable
    if it is no level: the logging set-up would fail later with no hint of which setting it was
    (mode: "Unable to configure handler 'default'"; logging: "Unknown level")."""
    raw = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if not raw:
        return "info"
    if not isinstance(logging.getLevelName(raw.upper()), int):
        raise ValueError(f"{LOG_LEVEL_ENV} must be debug, info, warning, error or critical, not {raw!r}")
    return raw.lower()
