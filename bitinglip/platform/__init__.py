"""Settings, cluster, jobs, models and the client: the platform's core."""
