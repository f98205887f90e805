"""The task manager: Platform and Job, the job's contract (:mod:`.spec`), the runner, inputs, outputs,
placement, the Redis job store, and the one vocabulary (job states, the Dask key format, event topics) in :mod:`.vocabulary`.

The names below are the package's public API; code outside the platform imports them from here.
Modules inside the platform import each other by module path (``bitinglip.platform.jobs.runner``),
so that this file never takes part in an import cycle.  ``connect()`` sits one level up, in
:mod:`bitinglip.platform.connect`: it assembles this package with the cluster and the plugins.
"""

from bitinglip.platform.jobs.client import Platform
from bitinglip.platform.jobs.inputs import require_column
from bitinglip.platform.jobs.job import Job, Progress
from bitinglip.platform.jobs.jobstore import MISSING, MOVED, REFUSED, UPDATED, JobStore
from bitinglip.platform.jobs.online import predict_counted, predict_generation
from bitinglip.platform.jobs.outputs import (
    MANIFEST,
    RECORD,
    column_sum,
    committed_parts,
    committed_summary,
    fingerprint,
    read_json,
)
from bitinglip.platform.jobs.runner import predict_texts
from bitinglip.platform.jobs.sample import sample_chats, sample_corpus
from bitinglip.platform.jobs.spec import JobRecord, JobSpec, WorkerSettings, read_record
from bitinglip.platform.jobs.vocabulary import (
    ANNOTATION,
    JOB_ID,
    PROGRESS_TOPIC,
    STATES,
    SUMMARY_TOPIC,
    TERMINAL,
    TOKENS_TOPIC,
    TRANSITIONS,
    JobState,
    job_keys,
    new_job_id,
    parse_task_key,
    rate_and_eta,
    task_key,
)

__all__ = ["ANNOTATION", "JOB_ID", "MANIFEST", "MISSING", "MOVED", "PROGRESS_TOPIC", "RECORD", "REFUSED", "STATES",
           "SUMMARY_TOPIC", "TERMINAL", "TOKENS_TOPIC", "TRANSITIONS", "UPDATED", "Job", "JobRecord", "JobSpec", "JobState", "JobStore", "Platform", "Progress",
           "WorkerSettings",
           "column_sum", "committed_parts", "committed_summary", "fingerprint", "job_keys", "new_job_id", "parse_task_key",
           "predict_counted", "predict_generation", "predict_texts",
           "rate_and_eta", "read_json", "read_record", "require_column", "sample_chats", "sample_corpus", "task_key"]
