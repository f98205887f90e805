"""The model manager: names, registry, sources, integrity, access log, residency."""
