"""The OpenAI-compatible API: Files, Batches, embeddings, chat and text
completions, in OpenAI's shapes, on BitingLip's jobs and infer batcher.

:mod:`.shapes` converts bodies and rows both ways (pure), :mod:`.batchfile`
checks and converts a batch file, :mod:`.files` and :mod:`.batches` keep
their records in Redis and their bytes under ``BITINGLIP_RESULTS_DIR``,
:mod:`.finalize` writes a finished batch's output and error files.  The
routes are in :mod:`bitinglip.gateway.routes` (``openai_*``).
"""
