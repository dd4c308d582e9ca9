"""What every subcommand shares: the default config path ($RELAY_CONFIG or conf/relay.toml)."""

from __future__ import annotations

import os

DEFAULT_CONFIG = os.environ.get("RELAY_CONFIG", "conf/relay.toml")
