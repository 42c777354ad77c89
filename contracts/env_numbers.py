"""Numbers read from BURNGUARD_* environment variables: a bad one is refused naming its variable.

Every component reads its tunables from the environment; `float("soon")` would fail with
"could not convert string to float" and no hint of which of thirty variables was wrong,
and a negative, NaN or infinite interval would make a timer spin or never fire.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar

N = TypeVar("N", int, float)


def env_number(
    name: str, default: N, kind: type[N] = float, most: float = math.inf, zero_ok: bool = False
) -> N:
    """`name`'s value as `kind`: finite, in (0, most] (0 too with `zero_ok`); `default` if unset or blank.

    Not clamped in silence: a value out of range is refused, with the variable and the range.
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value: N | None = kind(raw)
    except ValueError:
        value = None
    in_range = value is not None and (value >= 0 if zero_ok else value > 0) and value <= most
    if not in_range or not math.isfinite(value):  # NaN and infinity fail too
        least = "0 or more" if zero_ok else "above 0"
        what = "a whole number" if kind is int else "a finite number"
        most_text = "" if most == math.inf else f" and at most {most:g}"
        raise ValueError(f"{name} must be {what} {least}{most_text}, not {raw!r}")
    return value


_FLAGS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)


def env_flag(name: str, default: bool) -> bool:
    """`name`'s value as a switch (1/true/yes/on, 0/false/no/off); `default` if unset or blank.

    A typo is refused with the variable rather than read as "off".
    """
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in _FLAGS:
        raise ValueError(f"{name} must be true or false (1/0, yes/no, on/off), not {raw!r}")
    return _FLAGS[raw]
