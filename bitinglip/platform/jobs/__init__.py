"""The task manager: Platform and Job, the runner, inputs, outputs, placement, the Redis job store."""
