"""Scheduler-side plugins: job status, metrics, the Jobs page."""
