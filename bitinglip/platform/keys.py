"""Every Redis key BitingLip uses, built here and nowhere else.

The prefix carries a schema version, so a change of layout can live beside
the old one during an upgrade.
"""

from __future__ import annotations

PREFIX = "bitinglip:v1:"


def job(job_id: str) -> str:
    """The hash of one job's status and progress."""
    return f"{PREFIX}job:{job_id}"
