"""The Starlette REST gateway (see the gateway issue)."""
