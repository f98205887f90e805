"""The per-tenant caps on online generation in flight (gateway/tenants.py), without a server."""

from __future__ import annotations

import pytest

from bitinglip.errors import InputError, RateLimitedError
from bitinglip.gateway.tenants import InFlight
from bitinglip.settings import Settings


def test_tokens_and_grammars_are_held_per_tenant_and_given_back() -> None:
    caps = InFlight(max_tokens=100, max_grammars=1)
    with caps.hold("a", 60, grammar=True):
        with pytest.raises(RateLimitedError, match="BITINGLIP_TENANT_GENERATION_TOKENS") as over, \
                caps.hold("a", 41, grammar=False):
            pass
        assert over.value.headers["Retry-After"] == "1"
        with pytest.raises(RateLimitedError, match="BITINGLIP_TENANT_GRAMMARS"), caps.hold("a", 1, grammar=True):
            pass
        with caps.hold("a", 40, grammar=False), caps.hold("b", 100, grammar=True):  # b is counted apart
            assert caps.held("a") == (100, 1) and caps.held("b") == (100, 1)
    assert caps.held("a") == (0, 0) and caps.held("b") == (0, 0)
    with pytest.raises(ValueError), caps.hold("a", 10, grammar=False):  # given back on an error too
        raise ValueError
    assert caps.held("a") == (0, 0)


def test_a_request_over_the_whole_cap_is_invalid_not_busy() -> None:
    with pytest.raises(InputError, match=r"n x max_tokens \(over its rows\) is 101; .* at most 100"), \
            InFlight(100, 1).hold("a", 101, grammar=False):
        pass


def test_the_caps_come_from_the_environment() -> None:
    settings = Settings.from_env({"BITINGLIP_TENANT_GENERATION_TOKENS": "5000", "BITINGLIP_TENANT_GRAMMARS": "3"})
    assert (settings.tenant_generation_tokens, settings.tenant_grammars) == (5000, 3)
    assert (Settings().tenant_generation_tokens, Settings().tenant_grammars) == (32_768, 2)
