"""Where a running relay is found from its ``[relay]`` section: control socket, pid file."""

from __future__ import annotations

from pathlib import Path

from relay.config.schema import RelaySection


def control_path(relay: RelaySection) -> Path:
    """The control socket: ``[relay] control_socket`` or ``<spool>/control.sock``."""
    return relay.control_socket or relay.spool / "control.sock"


def pid_path(relay: RelaySection) -> Path:
    """The pid file: ``[relay] pid_file`` or ``<spool>/relay.pid``."""
    return relay.pid_file or relay.spool / "relay.pid"


def lock_path(relay: RelaySection) -> Path:
    """The spool lock the running relay holds for its whole life."""
    return relay.spool / "lock"
