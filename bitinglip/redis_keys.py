"""Every Redis key BitingLip uses, built here and nowhere else.

The prefix carries a schema version, so a change of layout can live beside
the old one during an upgrade.
"""

from __future__ import annotations

PREFIX = "bitinglip:v1:"


def job(job_id: str) -> str:
    """The hash of one job's status and progress."""
    return f"{PREFIX}job:{job_id}"


def job_index(state: str) -> str:
    """Sorted set of the jobs in one state, scored by when they entered it."""
    return f"{PREFIX}jobs:state:{state}"


def owner_jobs(owner: str) -> str:
    """Sorted set of one token subject's jobs, scored by creation time."""
    return f"{PREFIX}jobs:owner:{owner}"


def all_jobs() -> str:
    """Sorted set of every job, scored by creation time (for admins)."""
    return f"{PREFIX}jobs:all"


def idempotency(owner: str, key: str) -> str:
    """The job id created under a client-chosen idempotency key.

    The owner goes in length-prefixed: both may hold ``:``, and subject
    ``a:b`` with key ``c`` must not meet subject ``a`` with key ``b:c``."""
    return f"{PREFIX}idem:{len(owner)}:{owner}:{key}"


def rate_prefix() -> str:
    """What the rate limiter's keys start with; the ``limits`` package adds
    ``:<bucket>/<subject>/<count>/<period>/second``, a list of one subject's
    recent request times in one bucket."""
    return f"{PREFIX}rate"


def access_log() -> str:
    """The stream of model access events (add, download, verify, load, evict, remove)."""
    return f"{PREFIX}models:access"


def dataset() -> str:
    """A random stamp set once per Redis dataset; when it is gone or changed,
    Redis lost its data and the job records are rebuilt."""
    return f"{PREFIX}dataset"


def openai_file(file_id: str) -> str:
    """The hash of one file of the OpenAI-compatible Files API (owner, name, bytes, purpose, ...)."""
    return f"{PREFIX}oai:file:{file_id}"


def openai_files(owner: str) -> str:
    """Sorted set of one token subject's files, scored by creation time."""
    return f"{PREFIX}oai:files:{owner}"


def openai_file_bytes(owner: str) -> str:
    """Bytes of one token subject's uploaded files (purpose ``batch``), against its quota."""
    return f"{PREFIX}oai:filebytes:{owner}"


def openai_file_expiry() -> str:
    """Sorted set of every file that expires, scored by when (the sweep's worklist)."""
    return f"{PREFIX}oai:fileexpiry"


def openai_batch(job_id: str) -> str:
    """The hash of one OpenAI batch (its endpoint, input file, outcome); the batch is job ``job_id``."""
    return f"{PREFIX}oai:batch:{job_id}"


def openai_batches(owner: str) -> str:
    """Sorted set of one token subject's batches (their job ids), scored by creation time."""
    return f"{PREFIX}oai:batches:{owner}"


def openai_finalizing(job_id: str) -> str:
    """Held (with an expiry) by the one gateway writing a batch's output and error files."""
    return f"{PREFIX}oai:finalizing:{job_id}"
