"""Tasks: the task types and their pure compute (batching, encoders, precision, heads, options); no Dask, no Redis."""
