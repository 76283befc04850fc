"""Who can reach what we serve: the loopback check and ``--auth USER:PASS``, shared by ``serve``,
``webui`` and ``board`` (kept light: loaded for every ``--help``)."""

from __future__ import annotations

import ipaddress

from .config import ConfigError


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``--auth USER:PASS`` as ``(user, password)``; ``None`` when not given.

    Raises:
        ConfigError: not ``USER:PASS`` with both parts non-empty.
    """
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: expected USER:PASS")
    return user, password
