"""The cluster manager: local cluster, TLS, process supervision, the dev stack (up/down)."""
