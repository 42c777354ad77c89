"""The base every configuration model shares: strict fields, frozen values, safe ids.

Budget files are written by people; an unknown key is far more often a typo
than an intention, so every model forbids extra fields.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_id(value: str) -> str:
    """Ids end up in Kafka keys, signal reasons and span attributes: keep them plain names."""
    if not _ID.match(value):
        raise ValueError("id must be letters, digits, '_', '-' or '.', starting with a letter or digit")
    return value
