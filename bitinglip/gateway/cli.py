"""Command-line entries of the gateway (``bitinglip gateway``, ``bitinglip token``)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the gateway's subcommands to the ``bitinglip`` parser."""
